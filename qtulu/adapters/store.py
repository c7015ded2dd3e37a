"""LoRA adapters: save (PEFT format + qtulu metadata), verify, load several on one base. Swapping
and mixed-adapter batches live in `qtulu.adapters.swap`, the directory's file basics in
`qtulu.adapters.files`; both are re-exported here.

An adapter directory is exactly what vanilla ``peft.PeftModel.from_pretrained`` loads
(``adapter_config.json`` + ``adapter_model.safetensors``) plus ``qtulu.json``::

    {"format_version": 1,
     "name": "dolly",                   # the run's name (recipe name or `qtulu train --name`): the
                                        # adapter's default name in chat/eval/merge (else the dir name)
     "base": {"id", "revision", "weights_sha256", "quantization"},   # from qtulu.model.load.base_info
     "quantization": {...} | null,      # what the adapter was trained against (NF4 blocksize, ...)
     "recipe": {...} | null,            # the resolved recipe (Recipe.to_dict())
     "data_manifest": {...} | null,     # the data build manifest
     "extra": {...},
     "files": {name: sha256},           # every other file of the directory
     "sizes": {name: bytes},
     "tensors": {key: {"shape": [...], "dtype": "F32"}}}   # of adapter_model.safetensors

safetensors alone happily loads a file with a flipped byte in a tensor's data; the SHA-256
manifest is what catches it. ``verify_adapter`` checks in an order that names the problem:
missing file, truncated file, unreadable header, renamed key, changed shape, checksum, then the
base's quantization and identity (``weights_sha256``: what the adapter trained against, the NF4
codes and quant state or the weights' values, see ``qtulu.model.load.state_dict_sha256``).

A plain PEFT adapter (no ``qtulu.json``: ``peft.save_pretrained``, the Hub) loads once the user
says what it was trained against (``trained_on=``, CLI ``--trained-on``; see `qtulu.adapters.trained_on`):
never guessed, refused without it.

Example::

    model, tok = load_model("path/to/base", ["adapters/lima", "code=adapters/code_alpaca"])
    set_active(model, "code")
    logits = forward_mixed(model, ids, mask, ["lima", "code", "base"])   # one row per adapter
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
import warnings
from pathlib import Path
from typing import Any, Iterable, Sequence

from qtulu.adapters.trained_on import _TRAINED_ON_DTYPE, adapter_record, trained_on_of
from qtulu.adapters.trained_on import TRAINED_ON, plain_peft_record  # noqa: F401 - re-exported

from qtulu.adapters.files import (  # noqa: F401 - the format's names are part of this module's API
    AUTO,
    BASE_NAME,
    CONFIG_NAME,
    FORMAT_VERSION,
    META_NAME,
    WEIGHTS_NAME,
    AdapterError,
    _json_default,
    _safetensors_layout,
    _write_json,
    check_adapter_config,
    read_meta,
    recorded_compute_dtype,
    sha256_file,
)
from qtulu.files import check_input_tree, disk_full_is_one_line, replace_dir
from qtulu.adapters.swap import (  # noqa: F401 - re-exported: qtulu.adapters.store.set_active etc.
    adapter_names_of,
    adapters_disabled,
    forward_mixed,
    generate_mixed,
    set_active,
)


# --------------------------------------------------------------------------------------------
# save


def save_adapter(
    peft_model,
    out_dir: str | os.PathLike,
    *,
    adapter_name: str = "default",
    base_info: dict,
    recipe: dict | None = None,
    manifest: dict | None = None,
    extra: dict | None = None,
    state_dict: dict | None = None,
    name: str | None = None,
) -> Path:
    """Save one adapter of ``peft_model`` as a PEFT adapter dir plus ``qtulu.json``; return its path.

    The directory is written under a staging name in the same parent and renamed into place
    last, so a crash never leaves a half-written adapter under ``out_dir`` (an existing
    ``out_dir`` is replaced). Refuses (``AdapterError``) to save NaN/inf weights.
    ``base_info`` is ``qtulu.model.load.base_info(model)``: it binds the adapter to its base.
    ``state_dict``: the model's state dict to save from, when ``peft_model.state_dict()`` would not
    give full tensors (FSDP2 serves local shards: `qtulu.train.run` passes the gathered ones).
    ``name``: the adapter's name for chat/eval/merge (`parse_adapter_spec`), e.g. the run's name.
    """
    from safetensors.torch import load_file

    if not isinstance(base_info, dict):
        raise AdapterError(f"save_adapter: base_info must be a dict, got {type(base_info).__name__}")
    if adapter_name not in getattr(peft_model, "peft_config", {}):
        known = sorted(getattr(peft_model, "peft_config", {}))
        raise AdapterError(f"save_adapter: no adapter named {adapter_name!r} (have {known})")
    if recipe is not None and hasattr(recipe, "to_dict"):
        recipe = recipe.to_dict()

    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # a full disk (safetensors' own error, torch's, ENOSPC) is one line; the stage is removed
    with disk_full_is_one_line(out_dir.parent, f"saving the adapter to {out_dir}"):
        stage = out_dir.with_name(f".{out_dir.name}.tmp-{uuid.uuid4().hex[:8]}")
        try:
            stage.mkdir()
            peft_model.save_pretrained(
                str(stage), selected_adapters=[adapter_name], safe_serialization=True, state_dict=state_dict
            )
            if adapter_name != "default":
                # peft nests non-default adapters in a sub-folder; an adapter dir holds one adapter
                sub = stage / adapter_name
                for item in sub.iterdir():
                    os.replace(item, stage / item.name)
                sub.rmdir()
            weights = stage / WEIGHTS_NAME
            if not weights.is_file() or not (stage / CONFIG_NAME).is_file():
                raise AdapterError(f"save_adapter: peft did not write {WEIGHTS_NAME}/{CONFIG_NAME} in {stage}")
            bad = [k for k, t in load_file(str(weights)).items() if t.is_floating_point() and not bool(t.isfinite().all())]
            if bad:
                raise AdapterError(
                    f"save_adapter: refusing to save adapter {adapter_name!r} to {out_dir}: non-finite "
                    f"values in {len(bad)} tensor(s), e.g. {bad[:3]}"
                )
            files = sorted(p.name for p in stage.iterdir() if p.is_file())
            meta = {
                "format_version": FORMAT_VERSION,
                "adapter_name": adapter_name,
                "name": name,
                "base": base_info,
                "quantization": base_info.get("quantization"),
                # the dtype the base weights were cast to before NF4 quantization / used in the matmuls:
                # export_merged needs it to re-create the trained-against weights bit for bit
                "compute_dtype": compute_dtype_of(peft_model),
                "recipe": recipe,
                "data_manifest": manifest,
                "extra": extra or {},
                "files": {name: sha256_file(stage / name) for name in files},
                "sizes": {name: (stage / name).stat().st_size for name in files},
                "tensors": _safetensors_layout(weights),
            }
            _write_json(stage / META_NAME, meta)
            replace_dir(stage, out_dir)
        except BaseException:
            shutil.rmtree(stage, ignore_errors=True)
            raise
    return out_dir


def compute_dtype_of(model) -> str | None:
    """``"bfloat16"`` etc.: the NF4 layers' compute dtype, else the float Linear weights' dtype."""
    import torch
    from torch import nn

    try:
        from qtulu.model.quant import Linear4bit
    except ImportError:  # the NF4 module is optional for plain LoRA
        Linear4bit = None
    for m in model.modules():
        if Linear4bit is not None and isinstance(m, Linear4bit):
            return str(m.compute_dtype).replace("torch.", "") if m.compute_dtype is not None else None
    for m in model.modules():
        if isinstance(m, nn.Linear) and isinstance(m.weight, torch.Tensor) and m.weight.is_floating_point():
            return str(m.weight.dtype).replace("torch.", "")
    return None


# --------------------------------------------------------------------------------------------
# verify


def _mismatch(msg: str, force: bool) -> None:
    if force:
        warnings.warn(f"{msg} (loading anyway: force=True)", stacklevel=3)
    else:
        raise AdapterError(msg + "; pass force=True (CLI: --force) to load it anyway")


def verify_adapter(adapter_dir: str | os.PathLike, *, base_info: dict | None = None, force: bool = False,
                   trained_on: str | None = None) -> dict:
    """Check an adapter dir against its ``qtulu.json``; return that dict.

    Raises ``AdapterError`` naming the problem: missing file, truncated file, unreadable
    safetensors, renamed key, changed shape, checksum mismatch (e.g. one flipped byte), and,
    when ``base_info`` (of the loaded base) is given, another quantization or another base
    (weights hash). ``force=True`` turns only the base/quantization refusals into warnings: a
    corrupt adapter is always refused. A plain PEFT adapter (no ``qtulu.json``) needs
    ``trained_on`` (see `plain_peft_record`); its files are checked for readability and its
    record (returned) against the base's precision.
    """
    d = Path(adapter_dir)
    if not d.is_dir():
        raise AdapterError(f"{d}: adapter directory not found")
    check_input_tree(d, "adapter file")  # a FIFO, device or socket would hang or never end a read
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        if not (d / name).is_file():
            raise AdapterError(f"{d / name}: missing (an adapter dir needs {CONFIG_NAME} and {WEIGHTS_NAME})")
    check_adapter_config(d)  # every hostile value one line, before peft reads it
    if not (d / META_NAME).is_file():
        record = plain_peft_record(d, trained_on)
        try:
            _safetensors_layout(d / WEIGHTS_NAME)
        except Exception as e:  # safetensors' own error types
            raise AdapterError(f"{d / WEIGHTS_NAME}: corrupt safetensors file ({e})") from None
        if base_info is not None:
            check_base(record, base_info, where=str(d), force=force)
        return record
    meta = adapter_record(d, trained_on)
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise AdapterError(f"{d / META_NAME}: format_version {version!r} not supported (expected {FORMAT_VERSION})")
    files: dict[str, str] = meta["files"]
    sizes: dict[str, int] = meta.get("sizes", {})
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        if name not in files:
            raise AdapterError(f"{d / META_NAME}: 'files' does not list {name}")
    for name in files:
        if not (d / name).is_file():
            raise AdapterError(f"{d / name}: missing (listed in {META_NAME})")

    def size_problem(name: str) -> str | None:
        size, want = (d / name).stat().st_size, sizes.get(name)
        if want is None or size == want:
            return None
        what = "truncated" if size < want else "size changed"
        return f"{d / name}: {what}: {size} bytes, {META_NAME} records {want}"

    # the header first: a renamed key or changed shape also changes the size, and should be named
    try:
        layout = _safetensors_layout(d / WEIGHTS_NAME)
    except Exception as e:  # safetensors raises its own error types for bad headers
        problem = size_problem(WEIGHTS_NAME)
        if problem:
            raise AdapterError(f"{problem} (unreadable: {e})") from None
        raise AdapterError(f"{d / WEIGHTS_NAME}: corrupt safetensors file ({e})") from None
    expected = meta.get("tensors")
    if expected is not None:
        missing = sorted(set(expected) - set(layout))
        unexpected = sorted(set(layout) - set(expected))
        if missing or unexpected:
            raise AdapterError(
                f"{d / WEIGHTS_NAME}: renamed key(s): missing {missing[:3]}, unexpected {unexpected[:3]}"
                f" ({len(missing)} missing, {len(unexpected)} unexpected vs {META_NAME})"
            )
        for key, info in expected.items():
            if list(layout[key]["shape"]) != list(info["shape"]):
                raise AdapterError(
                    f"{d / WEIGHTS_NAME}: changed shape of {key}: {layout[key]['shape']}, "
                    f"{META_NAME} records {info['shape']}"
                )
            if layout[key]["dtype"] != info["dtype"]:
                raise AdapterError(
                    f"{d / WEIGHTS_NAME}: changed dtype of {key}: {layout[key]['dtype']}, "
                    f"{META_NAME} records {info['dtype']}"
                )
    for name in files:
        problem = size_problem(name)
        if problem:
            raise AdapterError(problem)
    for name, digest in files.items():
        got = sha256_file(d / name)
        if got != digest:
            raise AdapterError(
                f"{d / name}: checksum mismatch (sha256 {got[:12]}..., {META_NAME} records "
                f"{digest[:12]}...): the file's bytes changed (e.g. a flipped byte)"
            )
    try:
        json.loads((d / CONFIG_NAME).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterError(f"{d / CONFIG_NAME}: not valid JSON ({e})") from None

    if base_info is not None:
        check_base(meta, base_info, where=str(d), force=force)
    return meta


def check_base(meta: dict, base_info: dict, *, where: str, force: bool = False) -> None:
    """Refuse (or warn, with ``force``) when ``meta`` was trained on another quantization or base.

    The quantization is compared first (the clearer message), then the identity: ``weights_sha256``
    of the same kind (``weights_hash``) on both sides. An adapter saved before that kind existed
    holds a hash of the checkpoint files: it is compared with ``base_info["files_sha256"]`` when
    the loader computed it (`load_model` does, for such adapters). A plain PEFT adapter has only
    the precision the user gave (``trained_on``) to check.
    """
    rec = meta.get("base") or {}
    q_want = meta.get("quantization", rec.get("quantization"))
    q_have = base_info.get("quantization")
    if meta.get("trained_on"):  # plain PEFT adapter: the user said nf4 or a float dtype, nothing more
        if bool(q_want) != bool(q_have):
            have = "an NF4 base" if q_have else "an unquantized base"
            _mismatch(f"{where}: trained against {meta['trained_on']} (--trained-on), but the loaded base is {have}",
                      force)
        return
    if _norm_quant(q_want) != _norm_quant(q_have):
        _mismatch(
            f"{where}: other quantization: adapter trained against {json.dumps(q_want, sort_keys=True)}, "
            f"loaded base has {json.dumps(q_have, sort_keys=True, default=str)}",
            force,
        )
    want, have = rec.get("weights_sha256"), base_info.get("weights_sha256")
    if rec.get("weights_hash") != base_info.get("weights_hash"):
        # an adapter saved by an older qtulu: its hash is of the checkpoint files
        have = base_info.get("files_sha256") if not rec.get("weights_hash") else None
    if want and have and want != have:
        _mismatch(
            f"{where}: other base: adapter trained on {rec.get('id')!r} (weights sha256 {want[:12]}...), "
            f"loaded base is {base_info.get('id')!r} (weights sha256 {have[:12]}...)",
            force,
        )
    elif not (want and have):
        warnings.warn(f"{where}: base weights hash unknown on one side; base identity not checked", stacklevel=3)


def _norm_quant(q: Any) -> Any:
    # JSON round trip so that tuples/lists and dtype objects/strings compare equal
    return json.loads(json.dumps(q, sort_keys=True, default=str)) if q is not None else None


# --------------------------------------------------------------------------------------------
# load several adapters on one base, swap, mixed batches


def adapter_name_problem(name: str) -> str | None:
    """Why ``name`` cannot name a loaded adapter (None when it can)."""
    if not name:
        return "empty name"
    if name in (BASE_NAME, "__base__"):
        return f"adapter name {name!r} is reserved (it means: adapters disabled)"
    if name in "lora_":
        # peft matches adapter names inside state-dict keys: a name that is part of its "lora_"
        # prefix can re-initialise weights on load
        return f"adapter name {name!r} is part of peft's 'lora_' prefix"
    if "." in name or "/" in name or any(c.isspace() for c in name):
        return f"adapter name {name!r} contains '.', '/' or a space (torch module names cannot)"
    return None


def recorded_name(adapter_dir: str | os.PathLike) -> str | None:
    """The run name recorded in ``qtulu.json`` (None when absent or unreadable: `verify_adapter` reports that)."""
    try:
        meta = json.loads((Path(adapter_dir) / META_NAME).read_text())
    except (OSError, ValueError):
        return None
    name = meta.get("name") if isinstance(meta, dict) else None
    return name if isinstance(name, str) and adapter_name_problem(name) is None else None


def prompt_format_of(specs) -> str:
    """The prompt format to use for the adapters given as ``specs`` (as `parse_adapter_spec` reads
    them): the one they were trained with (`qtulu.adapters.files.recorded_chat_format`), else tulu."""
    from qtulu.adapters.files import recorded_chat_format

    return recorded_chat_format([parse_adapter_spec(a)[1] for a in specs]) or "tulu"


def parse_adapter_spec(spec: str | os.PathLike | tuple[str, str]) -> tuple[str, Path]:
    """``"dir"`` -> (its recorded run name, else its basename, dir); ``"name=dir"`` -> (name, dir);
    ``(name, dir)`` as is."""
    if isinstance(spec, tuple):
        name, path = spec
        return str(name), Path(path)
    s = os.fspath(spec)
    if "=" in s and not Path(s).exists():
        name, path = s.split("=", 1)
    else:
        name, path = recorded_name(s) or Path(s).resolve().name, s
    if not name:
        raise AdapterError(f"adapter spec {s!r}: empty name (use NAME=DIR)")
    return name, Path(path)


def attach_adapters(model, adapters: Iterable, *, base_info: dict | None = None, force: bool = False,
                    trained_on: str | None = None):
    """Verify and load each adapter onto ``model`` under its name; the first one is active.

    ``model`` is a plain transformers model or a ``PeftModel`` (more adapters are added to it).
    ``trained_on``: what plain PEFT adapters (no ``qtulu.json``) were trained against (see
    `verify_adapter`). Returns the ``PeftModel`` (``model`` itself when no adapter is given and
    it is not one).
    """
    from peft import PeftModel
    from peft.utils import get_peft_model_state_dict, load_peft_weights

    specs = [parse_adapter_spec(a) for a in adapters]
    names = [n for n, _ in specs]
    if len(set(names)) != len(names):
        raise AdapterError(f"adapter names must be unique, got {names} (use NAME=DIR to rename)")
    for name in names:
        if name in (BASE_NAME, "__base__"):
            raise AdapterError(f"adapter name {name!r} is reserved (it means: adapters disabled)")
        if name in "lora_":
            # peft matches adapter names inside state-dict keys: a name that is part of its
            # "lora_" prefix can re-initialise weights on load (peft warns; we refuse)
            raise AdapterError(f"adapter name {name!r} is part of peft's 'lora_' prefix; rename it (NAME=DIR)")
    from qtulu.adapters.integrity import check_adapter_weights, linear_dims, n_layers_of

    cdtype = compute_dtype_of(model)
    for name, path in specs:
        verify_adapter(path, base_info=base_info, force=force, trained_on=trained_on)
        # NaN/inf, factors that do not fit, values that overflow in the compute dtype, layers the base
        # lacks: refused, naming the tensor or key
        check_adapter_weights(path, linear_dims(model), compute_dtype=cdtype, n_layers=n_layers_of(model))
        if isinstance(model, PeftModel):
            if name in model.peft_config:
                raise AdapterError(f"{path}: an adapter named {name!r} is already loaded")
            model.load_adapter(str(path), adapter_name=name, is_trainable=False)
        else:
            model = PeftModel.from_pretrained(model, str(path), adapter_name=name, is_trainable=False)
        # peft only warns when the file's keys do not match the model's modules: refuse instead
        want = set(load_peft_weights(str(path), device="cpu"))
        have = set(get_peft_model_state_dict(model, adapter_name=name))
        if want != have:
            raise AdapterError(
                f"{path}: adapter keys do not match the base model's modules: "
                f"{sorted(want - have)[:3]} not in the model, {sorted(have - want)[:3]} not in the file"
            )
    if specs:
        set_active(model, specs[0][0])
    return model


def load_model(base, adapters: Sequence = (), *, quantize: str | None = AUTO, trained_on: str | None = None,
               force: bool = False, **load_kwargs):
    """Load a base (``qtulu.model.load.load_base``) and every adapter in ``adapters`` on it.

    ``adapters`` are dirs (named by their basename) or ``"name=dir"`` strings. ``quantize``:
    ``"auto"`` (default) loads the base as the first adapter trained against (NF4, or unquantized;
    NF4 when there is no adapter), ``"nf4"`` / ``None`` force it (a mismatching adapter is then
    refused unless ``force``). ``trained_on`` (``"nf4"|"bf16"|"fp16"|"fp32"``) says what plain
    PEFT adapters were trained against (required for them; checked against ``qtulu.json`` for the
    others). ``compute_dtype`` (a ``load_base`` keyword) defaults to the one recorded with the
    first adapter (``trained_on``'s dtype for an unquantized base), else bfloat16. Each adapter is
    verified against the loaded base (quantization + weights hash, see ``verify_adapter``).
    Returns ``(model, tokenizer)``: a ``PeftModel`` with the first adapter active, or the base
    model itself when ``adapters`` is empty.
    """
    from qtulu.model.load import as_dtype, files_sha256, load_base
    from qtulu.model.load import base_info as get_base_info

    # every adapter's record before the base is loaded: a missing --trained-on fails in a second
    paths = [parse_adapter_spec(a)[1] for a in adapters]
    for path in paths:
        if not path.is_dir():
            raise AdapterError(f"{path}: adapter directory not found")
    records = [adapter_record(path, trained_on) for path in paths]
    first = records[0] if records else {}
    if quantize == AUTO:
        quantize = "nf4" if (not adapters or trained_on_of(first) in (None, "nf4")) else None
    if adapters:
        # default to what the (first) adapter was trained with: same NF4 weights, same numerics
        want = recorded_compute_dtype(first)
        if load_kwargs.get("compute_dtype") is None:
            load_kwargs["compute_dtype"] = want or "bfloat16"
        elif first.get("trained_on") in _TRAINED_ON_DTYPE and as_dtype(load_kwargs["compute_dtype"]) != as_dtype(want):
            raise AdapterError(
                f"{paths[0]}: trained on {first['trained_on']} weights (--trained-on), but compute_dtype "
                f"{load_kwargs['compute_dtype']} was asked for: the base would hold other values"
            )
    load_kwargs = {k: v for k, v in load_kwargs.items() if v is not None}
    from qtulu.adapters.integrity import check_adapter_weights

    for path in paths:  # a corrupt or garbage (NaN, misshapen) adapter is refused before the base loads
        verify_adapter(path, force=force, trained_on=trained_on)
        check_adapter_weights(path, compute_dtype=load_kwargs.get("compute_dtype"))
    model, tokenizer = load_base(base, quantize=quantize, **load_kwargs)
    info = get_base_info(model) if adapters else None
    source = getattr(model, "qtulu_source_dir", None)
    if info is not None and source is not None and any(
        (r.get("base") or {}).get("weights_sha256") and not (r.get("base") or {}).get("weights_hash") for r in records
    ):
        # an adapter saved before weights_hash existed records a hash of the checkpoint files
        from qtulu.model.load import _safetensor_files

        info["files_sha256"] = files_sha256(_safetensor_files(Path(source)))
    model = attach_adapters(model, adapters, base_info=info, force=force, trained_on=trained_on)
    model.eval()
    return model, tokenizer
