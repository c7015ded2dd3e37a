"""The adapter directory's on-disk basics: file names, the error class, hashing, atomic file
helpers and ``qtulu.json`` parsing. `qtulu.adapters.store` (save, verify, load) and `qtulu.adapters.swap` build
on it; it imports nothing of theirs.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from qtulu.errors import AdapterError  # noqa: F401 - part of the adapter format API

FORMAT_VERSION = 1
META_NAME = "qtulu.json"
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
BASE_NAME = "base"  # in adapter_names: this row runs with adapters disabled (peft's "__base__")




AUTO = "auto"  # load_model(quantize=AUTO): the base precision the adapters trained against


# --------------------------------------------------------------------------------------------
# hashing and small file helpers


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            block = f.read(chunk)
            if not block:
                break
            h.update(block)
    return h.hexdigest()


def _json_default(obj: Any):
    # recipes/manifests may carry Paths, tuples, sets or numpy scalars: make them JSON-able
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if isinstance(obj, (set, frozenset)):
        return sorted(obj)
    if hasattr(obj, "item"):
        return obj.item()
    if hasattr(obj, "to_dict"):
        return obj.to_dict()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True, default=_json_default) + "\n")


def _safetensors_layout(path: Path) -> dict[str, dict[str, Any]]:
    """{key: {"shape", "dtype"}} read from a safetensors header (no tensor data loaded)."""
    from safetensors import safe_open

    out: dict[str, dict[str, Any]] = {}
    # "numpy": only the header is read, and "pt" would import torch (5 s) in checks meant to run
    # before it (a re-run of a finished `qtulu eval` loads nothing)
    with safe_open(str(path), framework="numpy") as f:
        for key in f.keys():
            sl = f.get_slice(key)
            out[key] = {"shape": list(sl.get_shape()), "dtype": str(sl.get_dtype())}
    return out


def read_meta(adapter_dir: str | os.PathLike) -> dict:
    """The parsed ``qtulu.json`` of an adapter dir (no checks beyond JSON validity)."""
    path = Path(adapter_dir) / META_NAME
    from qtulu.files import check_input_path

    check_input_path(path, "adapter file")
    if not path.is_file():
        raise AdapterError(f"{path}: missing (not a qtulu adapter dir, or saved by plain peft)")
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(meta, dict) or "files" not in meta:
        raise AdapterError(f"{path}: not a qtulu adapter manifest (no 'files' key)")
    check_meta_values(meta, path)  # its file list stays inside the folder; its values have their types
    return meta


def recorded_compute_dtype(meta: dict) -> str | None:
    """The compute dtype an adapter was trained with (qtulu.json, else its recipe), or None."""
    return meta.get("compute_dtype") or ((meta.get("recipe") or {}).get("model") or {}).get("compute_dtype")



def recorded_chat_format(adapter_dirs) -> str | None:
    """The prompt format the adapters in ``adapter_dirs`` were trained with (``data.chat_format`` of
    the recipe in their ``qtulu.json``: "tulu" or "tokenizer"), so that chat and eval prompt them as
    training rendered their rows. None when no adapter records one (plain PEFT adapters); adapters
    trained with different formats are refused (the caller must choose one: ``--chat-format``)."""
    seen: dict[str, str] = {}
    for d in adapter_dirs:
        if not (Path(d) / META_NAME).is_file():
            continue  # a plain PEFT adapter records nothing
        recipe = read_meta(d).get("recipe") or {}
        fmt = (recipe.get("data") or {}).get("chat_format", "tulu") if recipe else None
        if fmt is not None:
            seen.setdefault(str(fmt), str(d))
    if len(seen) > 1:
        named = ", ".join(f"{d} ({f})" for f, d in seen.items())
        raise AdapterError(f"the adapters were trained with different prompt formats: {named}; "
                           "choose one with --chat-format")
    return next(iter(seen), None)

# --------------------------------------------------------------------------------------------
# adapter_config.json and qtulu.json values, checked before peft (or qtulu) acts on them

_NAME = r"[A-Za-z0-9_][A-Za-z0-9_.\-]*"  # a module name or dotted path: no '/', no '..' component
# LoraConfig keys that would make peft do more than add LoRA factors on load (train other modules,
# copy layers, change the base weights at init, add bias or magnitude vectors): qtulu's formats
# (merge, export, integrity checks) are LoRA factors only, so such an adapter is refused.
_OFF_KEYS = ("megatron_config", "loftq_config", "eva_config", "corda_config", "lora_ga_config", "velora_config",
             "monteclora_config", "layer_replication", "trainable_token_indices", "alora_invocation_tokens",
             "arrow_config", "kasa_config", "target_parameters", "modules_to_save")
_OFF_FLAGS = ("use_dora", "use_qalora", "lora_bias", "use_bdlora")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    import math

    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)


def _module_name_problem(name) -> str | None:
    import re

    if not isinstance(name, str) or not re.fullmatch(_NAME, name) or ".." in name:
        return f"{name!r} is not a module name"
    return None


def check_adapter_config(adapter_dir: str | os.PathLike) -> dict:
    """The parsed ``adapter_config.json`` when every value qtulu and peft act on is of the right type
    and a plain LoRA; `AdapterError` naming the file and key otherwise (issue 25: a hostile value
    is one line, never a traceback inside peft)."""
    path = Path(adapter_dir) / CONFIG_NAME
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise AdapterError(f"{path}: expected a JSON object, got {type(cfg).__name__}")

    def bad(key: str, why: str):
        raise AdapterError(f"{path}: {key}: {why}")

    if cfg.get("peft_type", "LORA") != "LORA":
        bad("peft_type", f"{cfg.get('peft_type')!r} is not supported (qtulu loads LoRA adapters: 'LORA')")
    if not _is_int(cfg.get("r")) or cfg["r"] < 1:
        bad("r", f"expected an integer >= 1, got {cfg.get('r')!r}")
    if "lora_alpha" in cfg and (not _is_num(cfg["lora_alpha"]) or cfg["lora_alpha"] <= 0):
        bad("lora_alpha", f"expected a finite number > 0, got {cfg['lora_alpha']!r}")
    if "lora_dropout" in cfg and (not _is_num(cfg["lora_dropout"]) or not 0 <= cfg["lora_dropout"] < 1):
        bad("lora_dropout", f"expected a number in [0, 1), got {cfg['lora_dropout']!r}")
    for key in ("fan_in_fan_out", "use_rslora", "inference_mode"):
        if key in cfg and not isinstance(cfg[key], bool):
            bad(key, f"expected true or false, got {cfg[key]!r}")
    if cfg.get("bias", "none") != "none":
        bad("bias", f"{cfg['bias']!r} is not supported (qtulu adapters carry no bias: 'none')")
    for key in _OFF_FLAGS:
        if cfg.get(key) not in (None, False):
            bad(key, f"{cfg[key]!r} is not supported (a plain LoRA adapter has it false)")
    for key in _OFF_KEYS:
        if cfg.get(key) not in (None, [], {}):
            bad(key, f"{cfg[key]!r} is not supported (it makes peft change more than LoRA factors; expected null)")
    if "init_lora_weights" in cfg and not (isinstance(cfg["init_lora_weights"], bool)
                                           or cfg["init_lora_weights"] in ("gaussian", "orthogonal")):
        # "pissa", "olora", "loftq", "corda", "eva", ... rewrite the base weights when peft builds the layer
        bad("init_lora_weights", f"{cfg['init_lora_weights']!r}: only true, false, gaussian or orthogonal "
            "(inits that leave the base weights alone)")
    _check_targets(cfg, bad)
    for key, ok, want in (("rank_pattern", lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
                          ("alpha_pattern", lambda v: _is_num(v) and v > 0, "a number > 0")):
        pat = cfg.get(key)
        if pat in (None, {}):
            continue
        if not isinstance(pat, dict):
            bad(key, f"expected a mapping of module names to {want}, got {pat!r}")
        for k, v in pat.items():
            problem = _module_name_problem(k)
            if problem or not ok(v):
                bad(f"{key}.{k}", problem or f"expected {want}, got {v!r}")
    ltt = cfg.get("layers_to_transform")
    if ltt is not None:
        items = [ltt] if not isinstance(ltt, list) else ltt
        if not items or not all(_is_int(i) and i >= 0 for i in items):
            bad("layers_to_transform", f"expected a layer index or a list of them (integers >= 0), got {ltt!r}")
    lp = cfg.get("layers_pattern")
    if lp is not None:
        for name in [lp] if not isinstance(lp, list) else lp:
            if _module_name_problem(name):
                bad("layers_pattern", _module_name_problem(name))
    for key in ("task_type", "base_model_name_or_path", "revision", "peft_version"):
        if cfg.get(key) is not None and not isinstance(cfg[key], str):
            bad(key, f"expected a string or null, got {cfg[key]!r}")
    return cfg


def _check_targets(cfg: dict, bad) -> None:
    """``target_modules`` / ``exclude_modules``: module names, or one regex string (as peft reads it)."""
    import re

    for key in ("target_modules", "exclude_modules"):
        tm = cfg.get(key)
        if tm is None:  # peft's default targets for the architecture / nothing excluded
            continue
        if isinstance(tm, str):
            if "/" in tm or "\\" in tm:
                bad(key, f"{tm!r} looks like a path, not a module name or pattern")
            try:
                re.compile(tm)
            except re.error as e:
                bad(key, f"{tm!r} is not a valid pattern ({e})")
        elif isinstance(tm, list) and (tm or key == "exclude_modules"):
            for name in tm:
                problem = _module_name_problem(name)
                if problem:
                    bad(key, problem)
        else:
            bad(key, f"expected a list of module names or a pattern string, got {tm!r}")


def check_meta_values(meta: dict, where: Path) -> None:
    """``qtulu.json``'s file list names files inside the adapter folder only (a bare file name: no
    path, no ``..``), with a SHA-256 and a size each; its other values have the types qtulu reads."""
    files, sizes = meta.get("files"), meta.get("sizes", {})
    if not isinstance(files, dict) or not files:
        raise AdapterError(f"{where}: files: expected a mapping of file names to sha256 digests")
    for name, digest in files.items():
        if (not isinstance(name, str) or name in ("", ".", "..") or "/" in name or "\\" in name
                or "\0" in name or os.path.isabs(name)):
            raise AdapterError(f"{where}: files: {name!r} is not a file name inside the adapter folder "
                               "(paths and '..' are refused)")
        if not isinstance(digest, str) or len(digest) != 64:
            raise AdapterError(f"{where}: files.{name}: expected a sha256 hex digest, got {digest!r}")
    if not isinstance(sizes, dict) or not all(_is_int(v) and v >= 0 for v in sizes.values()):
        raise AdapterError(f"{where}: sizes: expected a mapping of file names to byte counts")
    for key, types in (("tensors", (dict, type(None))), ("base", (dict, type(None))), ("recipe", (dict, type(None))),
                       ("extra", (dict, type(None))), ("quantization", (dict, type(None))),
                       ("name", (str, type(None))), ("trained_on", (str, type(None)))):
        if key in meta and not isinstance(meta[key], types):
            raise AdapterError(f"{where}: {key}: expected {' or '.join(t.__name__ for t in types)}, "
                               f"got {type(meta[key]).__name__}")
    cd = meta.get("compute_dtype")
    if cd is not None and cd not in ("bfloat16", "float16", "float32"):
        raise AdapterError(f"{where}: compute_dtype: expected bfloat16, float16 or float32, got {cd!r}")
