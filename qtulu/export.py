"""Dequantize-then-merge export: a LoRA adapter merged into the weights it was trained against.

The QLoRA trap: merging an adapter into the original bf16 weights puts it on weights it never
saw (training saw ``dequant(quant(W))``), and merging into the 4-bit weights adds rounding error.
``export_merged`` re-creates, layer by layer, exactly the NF4 weights the adapter was trained on
(the same ``Linear4bit.from_linear`` call ``qtulu.model.load_base`` makes, with the blocksize,
double-quant and compute dtype recorded in the adapter's ``qtulu.json``), dequantizes them to fp32, adds the LoRA
delta ``scale * B @ A`` in fp32, and writes the result as safetensors shards (bf16 by default)
with an index, the config and the tokenizer: a plain model that
``transformers.AutoModelForCausalLM.from_pretrained(out_dir)`` loads.

Streamed: tensors are read from the base's safetensors one at a time and written shard by shard,
so peak memory is about one shard plus one layer (a 65B merge runs on a workstation).

Written as bf16 the merged weights round (relative error ~2^-9 per weight); ``dtype="float32"``
writes them unrounded, which is what the equivalence test uses.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from qtulu.errors import QtuluError

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "generation_config.json",
)
MERGE_META = "qtulu_merge.json"


class ExportError(QtuluError, ValueError):
    """An adapter/base pair that cannot be merged (unsupported adapter kind, keys not matching)."""


def parse_size(size: int | str) -> int:
    """``"5GB"`` / ``"500MB"`` / ``1000`` -> bytes."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)?\s*", str(size), flags=re.I)
    if not m:
        raise ExportError(f"max_shard_size: cannot parse {size!r} (e.g. 5GB, 500MB, 1000000)")
    unit = (m.group(2) or "B").upper().replace("I", "")
    return int(float(m.group(1)) * {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}[unit])


# --------------------------------------------------------------------------------------------
# the adapter side: LoRA deltas per module


class LoraDeltas:
    """The LoRA factors of one adapter dir, by base module name; ``delta(name)`` is fp32 (out, in)."""

    def __init__(self, adapter_dir: Path):
        from peft import LoraConfig
        from peft.utils.other import get_pattern_key
        from safetensors.torch import load_file

        self.dir = adapter_dir
        cfg = LoraConfig.from_pretrained(str(adapter_dir))
        if getattr(cfg, "use_dora", False):
            raise ExportError(f"{adapter_dir}: DoRA adapters are not supported by the merged export")
        if getattr(cfg, "lora_bias", False):
            raise ExportError(f"{adapter_dir}: LoRA bias adapters are not supported by the merged export")
        if getattr(cfg, "fan_in_fan_out", False):
            raise ExportError(f"{adapter_dir}: fan_in_fan_out adapters (GPT-2 Conv1D) are not supported")
        self.config = cfg
        sd = load_file(str(adapter_dir / "adapter_model.safetensors"))
        self.factors: dict[str, dict[str, torch.Tensor]] = {}
        prefix = "base_model.model."
        for key, t in sd.items():
            m = re.fullmatch(r"(.+)\.lora_([AB])\.weight", key)
            if not m or not key.startswith(prefix):
                raise ExportError(
                    f"{adapter_dir}: tensor {key!r} is not a LoRA A/B factor (modules_to_save, embeddings "
                    "and other trained tensors are not supported by the merged export)"
                )
            self.factors.setdefault(m.group(1)[len(prefix):], {})[m.group(2)] = t
        for name, ab in self.factors.items():
            if set(ab) != {"A", "B"}:
                raise ExportError(f"{adapter_dir}: module {name!r} has lora_{list(ab)} only")
        self._get_pattern_key = get_pattern_key
        self.used: set[str] = set()

    def scale(self, name: str) -> float:
        cfg = self.config
        r = cfg.rank_pattern.get(self._get_pattern_key(cfg.rank_pattern.keys(), name), cfg.r) if cfg.rank_pattern else cfg.r
        alpha = (
            cfg.alpha_pattern.get(self._get_pattern_key(cfg.alpha_pattern.keys(), name), cfg.lora_alpha)
            if cfg.alpha_pattern
            else cfg.lora_alpha
        )
        return alpha / math.sqrt(r) if cfg.use_rslora else alpha / r

    def delta(self, name: str) -> torch.Tensor | None:
        """``scale * B @ A`` in fp32 for module ``name`` (None when the adapter does not touch it)."""
        ab = self.factors.get(name)
        if ab is None:
            return None
        self.used.add(name)
        a, b = ab["A"].float(), ab["B"].float()  # (r, in), (out, r)
        if a.shape[0] != b.shape[1]:
            raise ExportError(f"{self.dir}: {name}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} ranks differ")
        return (b @ a) * self.scale(name)  # (out, in)


# --------------------------------------------------------------------------------------------
# the base side: (name, tensor) one at a time, Linear weights as the adapter saw them


def _trained_against(weight: torch.Tensor, quant: dict | None, compute_dtype: torch.dtype) -> torch.Tensor:
    """fp32 (out, in) weight exactly as the adapter saw it during training (see qtulu.model.load_base)."""
    if quant is None:
        return weight.to(compute_dtype).float()
    from qtulu.quant import Linear4bit

    dense = nn.Linear(weight.shape[1], weight.shape[0], bias=False, dtype=compute_dtype)
    with torch.no_grad():
        dense.weight.copy_(weight)
    q = Linear4bit.from_linear(
        dense, blocksize=quant["blocksize"], double_quant=quant["double_quant"], compute_dtype=compute_dtype
    )
    return q.dequantize(torch.float32)  # (out, in)


def _iter_dir_base(directory: Path, config, quant: dict | None, compute_dtype: torch.dtype, skip) -> Iterator:
    """Yield ``(param_name, tensor, is_linear)`` reading the checkpoint's shards one tensor at a time."""
    from accelerate import init_empty_weights
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    from qtulu.model import _safetensor_files

    with init_empty_weights(include_buffers=False):
        skeleton = AutoModelForCausalLM.from_config(config)
    linear = {n for n, m in skeleton.named_modules() if isinstance(m, nn.Linear) and n.split(".")[-1] not in skip}
    names = list(skeleton.state_dict().keys())
    persistent = set(names)
    prefix = getattr(skeleton, "base_model_prefix", "") or "model"
    del skeleton
    key_to_file: dict[str, Path] = {}
    for f in _safetensor_files(directory):
        with safe_open(str(f), framework="pt") as fh:
            for k in fh.keys():
                key_to_file[k] = f
    handles: dict[Path, Any] = {}

    def read(name: str) -> torch.Tensor | None:
        key = name if name in key_to_file else name[len(prefix) + 1:] if name.startswith(prefix + ".") else None
        if key is None or key not in key_to_file:
            return None
        f = key_to_file[key]
        if f not in handles:
            handles[f] = safe_open(str(f), framework="pt", device="cpu")
        return handles[f].get_tensor(key)

    tied = bool(getattr(config, "tie_word_embeddings", False))
    for name in names:
        if name not in persistent:
            continue
        t = read(name)
        if t is None:
            if tied and name.endswith("lm_head.weight"):
                continue  # tied to the embeddings: from_pretrained re-ties it
            raise ExportError(f"{directory}: {name} missing from the safetensors files")
        module = name.rsplit(".", 1)[0]
        if name.endswith(".weight") and module in linear:
            yield name, _trained_against(t, quant, compute_dtype), True
        else:
            yield name, (t.to(compute_dtype).float() if t.is_floating_point() else t), False
    handles.clear()


def _iter_model_base(model) -> Iterator:
    """Yield ``(param_name, tensor, is_linear)`` from an in-memory (possibly NF4) base model."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    try:
        from qtulu.quant import Linear4bit
    except ImportError:
        Linear4bit = ()
    if any(isinstance(m, BaseTunerLayer) for m in model.modules()):
        raise ExportError("export_merged: pass the bare base model (no peft adapter layers) or a model dir")
    seen: set[int] = set()
    for mod_name, module in model.named_modules():
        prefix = f"{mod_name}." if mod_name else ""
        if Linear4bit and isinstance(module, Linear4bit):
            yield prefix + "weight", module.dequantize(torch.float32), True  # (out, in)
            if module.bias is not None:
                yield prefix + "bias", module.bias.detach().float(), False
            continue
        if Linear4bit and any(isinstance(p, Linear4bit) for p in _parents(model, mod_name)):
            continue  # sub-modules of an NF4 layer hold quantization state, not model weights
        for p_name, p in module.named_parameters(recurse=False):
            if id(p) in seen:
                continue  # tied weights are written once
            seen.add(id(p))
            t = p.detach()
            yield prefix + p_name, (t.float() if t.is_floating_point() else t), isinstance(module, nn.Linear) and p_name == "weight"
        for b_name, b in module.named_buffers(recurse=False):
            if b is None or b_name in module._non_persistent_buffers_set:
                continue
            yield prefix + b_name, b.detach(), False


def _parents(model, name: str):
    parts = name.split(".")
    for i in range(1, len(parts)):
        yield model.get_submodule(".".join(parts[:i]))


# --------------------------------------------------------------------------------------------
# shard writer


class _ShardWriter:
    def __init__(self, out_dir: Path, max_bytes: int):
        self.out_dir, self.max_bytes = out_dir, max_bytes
        self.current: dict[str, torch.Tensor] = {}
        self.size = 0
        self.files: list[Path] = []
        self.weight_map: dict[str, int] = {}
        self.total = 0

    def add(self, name: str, t: torch.Tensor) -> None:
        nbytes = t.numel() * t.element_size()
        if self.current and self.size + nbytes > self.max_bytes:
            self.flush()
        self.current[name] = t.contiguous()
        self.size += nbytes
        self.total += nbytes
        self.weight_map[name] = len(self.files)

    def flush(self) -> None:
        from safetensors.torch import save_file

        if not self.current:
            return
        path = self.out_dir / f"shard-{len(self.files):05d}.tmp"
        save_file(self.current, str(path), metadata={"format": "pt"})
        self.files.append(path)
        self.current, self.size = {}, 0

    def finish(self) -> list[str]:
        self.flush()
        n = len(self.files)
        names = [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        for path, name in zip(self.files, names):
            os.replace(path, self.out_dir / name)
        index = {
            "metadata": {"total_size": self.total},
            "weight_map": {k: names[i] for k, i in sorted(self.weight_map.items())},
        }
        (self.out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        return names


# --------------------------------------------------------------------------------------------
# public API


def export_merged(
    base,
    adapter_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    quantize: str | None = None,
    dtype: str | torch.dtype = "bfloat16",
    compute_dtype: str | torch.dtype | None = None,
    max_shard_size: int | str = "5GB",
    tokenizer=None,
    force: bool = False,
    progress: bool = True,
    measure: bool = True,
) -> dict:
    """Merge the adapter in ``adapter_dir`` into ``base`` and write a plain model to ``out_dir``.

    ``base``: the base model dir (safetensors) the adapter was trained on, or an in-memory base
    from ``qtulu.model.load_base`` (its NF4 layers are dequantized directly). Every Linear weight
    the adapter trained against is reproduced exactly (NF4 round trip with the recorded blocksize,
    double quant and ``compute_dtype``: default the one recorded in the adapter's ``qtulu.json``,
    else its recipe's ``model.compute_dtype``, else bfloat16), the delta added in fp32, and the result written in ``dtype``.
    ``quantize="nf4"`` re-quantizes the merged Linear weights to NF4 and writes them in
    bitsandbytes' serialization (``quantization_config`` in config.json: transformers with
    bitsandbytes, and ``qtulu.model.load_base``, load it as 4-bit); ``report["requantize"]`` has
    the weight error and, with ``measure`` (and a base dir), the logit error the re-quantization
    adds against base + adapter (``measure_logit_error``). The adapter is verified first
    (``verify_adapter``; ``force`` as there). Writes atomically (stage dir + rename). Returns a
    report dict (also saved as ``qtulu_merge.json`` in ``out_dir``).
    """
    from transformers import PreTrainedModel

    from qtulu.adapters import verify_adapter

    adapter_dir = Path(adapter_dir)
    out_dir = Path(out_dir)
    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise ExportError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
        out_dtype = _DTYPES[dtype]
    else:
        out_dtype = dtype
    if quantize not in (None, "nf4"):
        raise ExportError(f"quantize must be None or 'nf4', got {quantize!r}")

    from qtulu.adapters import read_meta

    if not (adapter_dir / "qtulu.json").is_file():
        raise ExportError(
            f"{adapter_dir / 'qtulu.json'}: missing; without it the weights the adapter trained against "
            "(NF4 settings, compute dtype) are unknown, so a merge could not be exact. Save adapters "
            "with qtulu.adapters.save_adapter."
        )
    meta = read_meta(adapter_dir)
    quant = meta.get("quantization", (meta.get("base") or {}).get("quantization"))
    if compute_dtype is None:
        from qtulu.adapters import recorded_compute_dtype

        compute_dtype = recorded_compute_dtype(meta) or "bfloat16"
    cdtype = _DTYPES[compute_dtype] if isinstance(compute_dtype, str) else compute_dtype
    skip = tuple((quant or {}).get("skip", ("lm_head",)))

    if isinstance(base, PreTrainedModel):
        from qtulu.model import base_info

        info = base_info(base)
        verify_adapter(adapter_dir, base_info=info, force=force)
        config = base.config
        stream = _iter_model_base(base)
        src_dir = None
        n_total = sum(1 for _ in base.named_modules())
    else:
        from transformers import AutoConfig

        from qtulu.model import _safetensor_files, files_sha256, resolve_checkpoint

        src_dir, _rev = resolve_checkpoint(base)
        config = AutoConfig.from_pretrained(str(src_dir))
        if getattr(config, "quantization_config", None):
            # a bitsandbytes-quantized checkpoint: its NF4 weights are the trained-against weights;
            # load it (it is 4-bit, so it fits) and dequantize layer by layer from memory
            from qtulu.model import load_base

            model, tok = load_base(str(src_dir), quantize="nf4", compute_dtype=cdtype, device="cpu", attn_implementation=None)
            return export_merged(
                model, adapter_dir, out_dir, quantize=quantize, dtype=dtype, compute_dtype=cdtype,
                max_shard_size=max_shard_size, tokenizer=tokenizer or tok, force=force, progress=progress,
                measure=measure,
            )
        info = {"id": str(base), "weights_sha256": files_sha256(_safetensor_files(src_dir)), "quantization": quant}
        verify_adapter(adapter_dir, base_info=info, force=force)
        stream = _iter_dir_base(src_dir, config, quant, cdtype, skip)
        n_total = None

    from qtulu.integrity import check_adapter_weights, check_finite

    check_adapter_weights(adapter_dir)  # NaN/inf or factors not matching the config's r: refused, naming the tensor
    deltas = LoraDeltas(adapter_dir)
    requant_cfg = {"blocksize": (quant or {}).get("blocksize", 64), "double_quant": (quant or {}).get("double_quant", True)}
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    stage = out_dir.with_name(f".{out_dir.name}.tmp-{uuid.uuid4().hex[:8]}")
    stage.mkdir()
    try:
        from tqdm.auto import tqdm

        writer = _ShardWriter(stage, parse_size(max_shard_size))
        merged, rounding, requant = 0, [], []
        for name, t, is_linear in tqdm(stream, total=n_total, desc="merge+export", disable=not progress, leave=False):
            if is_linear:
                d = deltas.delta(name[: -len(".weight")])
                if d is not None:
                    if d.shape != t.shape:
                        raise ExportError(f"{adapter_dir}: delta for {name} is {tuple(d.shape)}, base weight {tuple(t.shape)}")
                    t = t + d  # fp32 (out, in)
                    merged += 1
                if t.is_floating_point():
                    out_t = t.to(out_dtype)
                    rounding.append(float((out_t.float() - t).norm() / t.norm().clamp_min(1e-30)))
                    if quantize == "nf4" and name.rsplit(".", 2)[-2] not in skip:
                        # re-quantize the merged weight; written in bitsandbytes' layout (the keys
                        # Linear4bit's state dict uses), which transformers and load_base both read
                        check_finite(name, out_t, where=f"merged model for {out_dir}")  # nothing non-finite is written
                        q4, err = _requantize(out_t, requant_cfg)
                        requant.append(err)
                        for k, v in q4.items():
                            writer.add(name + k, v)
                        continue
                    t = out_t
            elif t.is_floating_point():
                t = t.to(out_dtype)
            check_finite(name, t, where=f"merged model for {out_dir}")  # nothing non-finite is written
            writer.add(name, t)
        unused = sorted(set(deltas.factors) - deltas.used)
        if unused:
            raise ExportError(f"{adapter_dir}: adapter modules not found among the base's Linear layers: {unused[:5]}")
        shards = writer.finish()

        config = config.__class__.from_dict(config.to_dict())  # a copy: never mutate the caller's config
        if hasattr(config, "quantization_config"):
            delattr(config, "quantization_config")
        config.dtype = out_dtype
        if quantize == "nf4":
            config.quantization_config = {
                "quant_method": "bitsandbytes",
                "load_in_4bit": True,
                "load_in_8bit": False,
                "bnb_4bit_quant_type": "nf4",
                "bnb_4bit_use_double_quant": bool(requant_cfg["double_quant"]),
                "bnb_4bit_compute_dtype": str(cdtype).replace("torch.", ""),
                "bnb_4bit_quant_storage": "uint8",
                "llm_int8_skip_modules": list(skip),
            }
        config.save_pretrained(str(stage))
        _write_tokenizer(stage, src_dir, tokenizer)
        report = {
            "out_dir": str(out_dir),
            "dtype": str(out_dtype).replace("torch.", ""),
            "compute_dtype": str(cdtype).replace("torch.", ""),
            "base": {k: info.get(k) for k in ("id", "revision", "weights_sha256")},
            "quantization": quant,
            "adapter": {"dir": str(adapter_dir), "sha256": (meta.get("files") or {}).get("adapter_model.safetensors")},
            "recipe": meta.get("recipe"),
            "merged_layers": merged,
            "shards": shards,
            "total_bytes": writer.total,
            "weight_rounding_rel_error_max": max(rounding) if rounding else 0.0,
        }
        if quantize == "nf4":
            report["requantize"] = {
                "method": "nf4",
                **requant_cfg,
                "weight_rel_error_max": max(requant) if requant else 0.0,
                "weight_rel_error_mean": sum(requant) / len(requant) if requant else 0.0,
            }
        (stage / MERGE_META).write_text(json.dumps(report, indent=2, default=str) + "\n")
        from qtulu.adapters import _replace_dir

        _replace_dir(stage, out_dir)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    if quantize == "nf4" and measure:
        if src_dir is None:
            report["requantize"]["logits"] = "not measured: in-memory base (pass the base dir to measure)"
        else:
            report["requantize"]["logits"] = measure_logit_error(
                src_dir, adapter_dir, out_dir, quantize_base=quant is not None, compute_dtype=cdtype, tokenizer=tokenizer
            )
        (out_dir / MERGE_META).write_text(json.dumps(report, indent=2, default=str) + "\n")
    return report


def measure_logit_error(base_dir, adapter_dir, merged_dir, *, quantize_base: bool = True, compute_dtype=torch.float32,
                        tokenizer=None, n_rows: int = 2, n_tokens: int = 64, seed: int = 0) -> dict:
    """Logit difference of a merged model against base + adapter, on seeded random token ids.

    Both are loaded with ``qtulu.model.load_base`` (a bitsandbytes-NF4 export loads as NF4, so
    this fits wherever training did). Returns ``{"max_abs", "mean_abs", "logit_scale", "rel"}``
    with ``rel = max_abs / max |reference logit|``.
    """
    from qtulu.adapters import attach_adapters
    from qtulu.model import load_base

    kw = dict(compute_dtype=compute_dtype, attn_implementation=None, tokenizer=tokenizer)
    ref, _ = load_base(str(base_dir), quantize="nf4" if quantize_base else None, **kw)
    ref = attach_adapters(ref, [("ref", adapter_dir)], force=True)
    vocab = ref.config.vocab_size
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (n_rows, n_tokens), generator=gen)  # (B, T)
    device = next(p for p in ref.parameters()).device
    with torch.no_grad():
        want = ref(input_ids=ids.to(device)).logits.float().cpu()  # (B, T, V)
    del ref
    merged, _ = load_base(str(merged_dir), **kw)
    with torch.no_grad():
        got = merged(input_ids=ids.to(next(p for p in merged.parameters()).device)).logits.float().cpu()
    diff = (got - want).abs()
    scale = float(want.abs().max())
    return {"max_abs": float(diff.max()), "mean_abs": float(diff.mean()), "logit_scale": scale,
            "rel": float(diff.max()) / max(scale, 1e-30), "probe": f"{n_rows}x{n_tokens} random ids, seed {seed}"}


def _requantize(w: torch.Tensor, cfg: dict) -> tuple[dict[str, torch.Tensor], float]:
    """NF4 state-dict entries (suffixes of ``<name>``: ``""``, ``".absmax"``, ...) of a merged
    weight, and the relative Frobenius error the re-quantization adds."""
    from qtulu.quant import Linear4bit

    dense = nn.Linear(w.shape[1], w.shape[0], bias=False, dtype=w.dtype)
    with torch.no_grad():
        dense.weight.copy_(w)
    q = Linear4bit.from_linear(dense, blocksize=cfg["blocksize"], double_quant=cfg["double_quant"])
    back = q.dequantize(torch.float32)
    err = float((back - w.float()).norm() / w.float().norm().clamp_min(1e-30))
    entries = {k[len("weight"):]: v.contiguous() for k, v in q.state_dict().items() if k.startswith("weight")}
    return entries, err


def _write_tokenizer(stage: Path, src_dir: Path | None, tokenizer) -> None:
    if tokenizer is not None:
        tokenizer.save_pretrained(str(stage))
        return
    if src_dir is None:
        return
    for name in _TOKENIZER_FILES:
        if (src_dir / name).is_file():
            shutil.copy2(src_dir / name, stage / name)
