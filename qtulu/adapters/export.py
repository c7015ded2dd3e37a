"""Dequantize-then-merge export: a LoRA adapter merged into the weights it was trained against.

The QLoRA trap: merging an adapter into the original bf16 weights puts it on weights it never
saw (training saw ``dequant(quant(W))``), and merging into the 4-bit weights adds rounding error.
``export_merged`` re-creates, layer by layer, exactly the NF4 weights the adapter was trained on
(the same ``Linear4bit.from_linear`` call ``qtulu.model.load.load_base`` makes, with the blocksize,
double-quant and compute dtype recorded in the adapter's ``qtulu.json``), dequantizes them to fp32, adds the LoRA
delta ``scale * B @ A`` in fp32, and writes the result as safetensors shards (bf16 by default)
with an index, the config and the tokenizer: a plain model that
``transformers.AutoModelForCausalLM.from_pretrained(out_dir)`` loads.

Streamed: tensors are read from the base's safetensors one at a time and written shard by shard,
so peak memory is about one shard plus one layer (a 65B merge runs on a workstation).

Written as bf16 the merged weights round (relative error ~2^-9 per weight); ``dtype="float32"``
writes them unrounded, which is what the equivalence test uses.

A plain PEFT adapter (no ``qtulu.json``) merges once the user says what it trained against:
``trained_on="nf4"`` gives ``dequant(NF4(W)) + scale * B @ A``, ``"bf16"`` (``"fp16"``,
``"fp32"``) gives ``W + scale * B @ A`` with W in that dtype.

Libraries used: peft's ``lora.Linear.get_delta_weight`` computes each delta (`LoraDeltas`);
huggingface_hub's ``split_torch_state_dict_into_shards`` plans the shards (and names them, and
``parse_size_to_int`` reads ``max_shard_size``) from the output's layout on the meta device, so
that the tensors themselves can still be produced and written one shard at a time.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from qtulu.errors import ExportError, QtuluError  # noqa: F401 - ExportError is raised here and re-exported
from qtulu.adapters.shards import ShardWriter, output_layout, parse_size  # noqa: F401 - parse_size is public here

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

    def rank_alpha(self, name: str) -> tuple[int, float]:
        """(r, lora_alpha) of module ``name`` (``rank_pattern`` / ``alpha_pattern`` as peft reads them)."""
        cfg = self.config
        r = cfg.rank_pattern.get(self._get_pattern_key(cfg.rank_pattern.keys(), name), cfg.r) if cfg.rank_pattern else cfg.r
        alpha = (
            cfg.alpha_pattern.get(self._get_pattern_key(cfg.alpha_pattern.keys(), name), cfg.lora_alpha)
            if cfg.alpha_pattern
            else cfg.lora_alpha
        )
        return int(r), alpha

    def scale(self, name: str) -> float:
        r, alpha = self.rank_alpha(name)
        return alpha / math.sqrt(r) if self.config.use_rslora else alpha / r

    def delta(self, name: str) -> torch.Tensor | None:
        """``scale * B @ A`` in fp32 for module ``name`` (None when the adapter does not touch it),
        computed by peft's own ``lora.Linear.get_delta_weight`` on a layer holding the factors."""
        ab = self.factors.get(name)
        if ab is None:
            return None
        self.used.add(name)
        a, b = ab["A"].float(), ab["B"].float()  # (r, in), (out, r): fp32, so peft computes in fp32
        r, alpha = self.rank_alpha(name)
        if a.shape[0] != b.shape[1] or a.shape[0] != r:
            raise ExportError(
                f"{self.dir}: {name}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} do not match the "
                f"rank r={r} of {self.dir / 'adapter_config.json'}"
            )
        layer = _peft_lora_linear(a.shape[1], b.shape[0], r, alpha, self.config)
        layer.lora_A["delta"].weight = nn.Parameter(a, requires_grad=False)
        layer.lora_B["delta"].weight = nn.Parameter(b, requires_grad=False)
        with torch.no_grad():
            return layer.get_delta_weight("delta")  # (out, in)


def _peft_lora_linear(in_features: int, out_features: int, r: int, alpha: float, config):
    """A peft ``lora.Linear`` (adapter "delta") over a weightless (meta) base layer: only its
    factors and scaling are used. The constructor changed in peft 0.18 (a ``config`` argument)."""
    import copy

    from peft.tuners.lora.layer import Linear as LoraLinear

    cfg = copy.copy(config)
    cfg.init_lora_weights, cfg.lora_dropout = False, 0.0  # no init that would need the base weight
    base = nn.Linear(in_features, out_features, bias=False, device="meta")
    try:
        return LoraLinear(base, "delta", config=cfg, r=r, lora_alpha=alpha)
    except TypeError:  # peft < 0.18
        return LoraLinear(base, "delta", r=r, lora_alpha=alpha, lora_dropout=0.0, init_lora_weights=False,
                          use_rslora=cfg.use_rslora, fan_in_fan_out=False)  # (out, in)


# --------------------------------------------------------------------------------------------
# the base side: (name, tensor) one at a time, Linear weights as the adapter saw them


def _trained_against(weight: torch.Tensor, quant: dict | None, compute_dtype: torch.dtype,
                     digests: dict | None = None, name: str = "") -> torch.Tensor:
    """fp32 (out, in) weight exactly as the adapter saw it during training (see qtulu.model.load.load_base);
    its digest as `qtulu.model.load.tensor_digests` computes it goes to ``digests[name]``."""
    from qtulu.model.base_hash import _nf4_digest, _value_digest

    if quant is None:
        w = weight.to(compute_dtype)
        if digests is not None:
            digests[name] = _value_digest(w)
        return w.float()
    from qtulu.model.quant import Linear4bit

    dense = nn.Linear(weight.shape[1], weight.shape[0], bias=False, dtype=compute_dtype)
    with torch.no_grad():
        dense.weight.copy_(weight)
    q = Linear4bit.from_linear(
        dense, blocksize=quant["blocksize"], double_quant=quant["double_quant"], compute_dtype=compute_dtype
    )
    if digests is not None:
        digests[name] = _nf4_digest(q)
    return q.dequantize(torch.float32)  # (out, in)


def _iter_dir_base(directory: Path, config, quant: dict | None, compute_dtype: torch.dtype, skip,
                   digests: dict | None = None, dry: bool = False) -> Iterator:
    """Yield ``(param_name, tensor, is_linear)`` reading the checkpoint's shards one tensor at a time.

    ``digests``: filled with each tensor's digest as the loaded base would have it (so the base's
    ``weights_sha256`` comes out of this one read). ``dry``: yield meta tensors of the same names,
    shapes and dtypes without reading any data (the shard plan)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    from qtulu.model.base_hash import _value_digest
    from qtulu.model.load import _safetensor_files
    from qtulu.model.reader import CheckpointReader

    with init_empty_weights(include_buffers=False):
        skeleton = AutoModelForCausalLM.from_config(config)
    linear = {n for n, m in skeleton.named_modules() if isinstance(m, nn.Linear) and n.split(".")[-1] not in skip}
    shapes = {k: (tuple(v.shape), v.dtype) for k, v in skeleton.state_dict().items()}
    names = list(shapes)
    buffers = {n for n, _ in skeleton.named_buffers()}
    prefix = getattr(skeleton, "base_model_prefix", "") or "model"
    del skeleton
    reader = CheckpointReader(_safetensor_files(directory), prefix, ExportError)
    key_of, read = reader.key, reader.read

    tied = bool(getattr(config, "tie_word_embeddings", False))
    for name in names:
        if key_of(name) is None:
            if tied and name.endswith("lm_head.weight"):
                continue  # tied to the embeddings: from_pretrained re-ties it
            raise ExportError(f"{directory}: {name} missing from the safetensors files")
        module = name.rsplit(".", 1)[0]
        is_linear = name.endswith(".weight") and module in linear
        if dry:
            shape, dtype = shapes[name]
            floating = dtype.is_floating_point
            yield name, torch.empty(shape, dtype=torch.float32 if floating else dtype, device="meta"), is_linear
            continue
        t = read(name)
        if is_linear:
            yield name, _trained_against(t, quant, compute_dtype, digests, name), True
            continue
        if name in buffers:  # load_base keeps a persistent buffer as stored
            if digests is not None:
                digests[name] = _value_digest(t)
        elif t.is_floating_point():
            t = t.to(compute_dtype)
            if digests is not None:
                digests[name] = _value_digest(t)
        elif digests is not None:
            digests[name] = _value_digest(t)
        yield name, (t.float() if t.is_floating_point() else t), False
    reader.close()


def _iter_model_base(model, dry: bool = False) -> Iterator:
    """Yield ``(param_name, tensor, is_linear)`` from an in-memory (possibly NF4) base model
    (``dry``: meta tensors of the same names, shapes and dtypes, nothing dequantized)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    try:
        from qtulu.model.quant import Linear4bit
    except ImportError:
        Linear4bit = ()
    if any(isinstance(m, BaseTunerLayer) for m in model.modules()):
        raise ExportError("export_merged: pass the bare base model (no peft adapter layers) or a model dir")

    def meta(t: torch.Tensor) -> torch.Tensor:
        return torch.empty(t.shape, dtype=torch.float32 if t.is_floating_point() else t.dtype, device="meta")

    seen: set[int] = set()
    for mod_name, module in model.named_modules():
        prefix = f"{mod_name}." if mod_name else ""
        if Linear4bit and isinstance(module, Linear4bit):
            if dry:
                yield prefix + "weight", torch.empty(module.out_features, module.in_features, device="meta"), True
            else:
                yield prefix + "weight", module.dequantize(torch.float32), True  # (out, in)
            if module.bias is not None:
                yield prefix + "bias", meta(module.bias) if dry else module.bias.detach().float(), False
            continue
        if Linear4bit and any(isinstance(p, Linear4bit) for p in _parents(model, mod_name)):
            continue  # sub-modules of an NF4 layer hold quantization state, not model weights
        for p_name, p in module.named_parameters(recurse=False):
            if id(p) in seen:
                continue  # tied weights are written once
            seen.add(id(p))
            t = p.detach()
            linear = isinstance(module, nn.Linear) and p_name == "weight"
            yield prefix + p_name, meta(t) if dry else (t.float() if t.is_floating_point() else t), linear
        for b_name, b in module.named_buffers(recurse=False):
            if b is None or b_name in module._non_persistent_buffers_set:
                continue
            yield prefix + b_name, meta(b) if dry else b.detach(), False


def _parents(model, name: str):
    parts = name.split(".")
    for i in range(1, len(parts)):
        yield model.get_submodule(".".join(parts[:i]))


# --------------------------------------------------------------------------------------------
# shard writer


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
    trained_on: str | None = None,
) -> dict:
    """Merge the adapter in ``adapter_dir`` into ``base`` and write a plain model to ``out_dir``.

    ``base``: the base model dir (safetensors) the adapter was trained on, or an in-memory base
    from ``qtulu.model.load.load_base`` (its NF4 layers are dequantized directly). Every Linear weight
    the adapter trained against is reproduced exactly (NF4 round trip with the recorded blocksize,
    double quant and ``compute_dtype``: default the one recorded in the adapter's ``qtulu.json``,
    else its recipe's ``model.compute_dtype``, else bfloat16), the delta added in fp32, and the result written in ``dtype``.
    ``quantize="nf4"`` re-quantizes the merged Linear weights to NF4 and writes them in
    bitsandbytes' serialization (``quantization_config`` in config.json: transformers with
    bitsandbytes, and ``qtulu.model.load.load_base``, load it as 4-bit); ``report["requantize"]`` has
    the weight error and, with ``measure`` (and a base dir), the logit error the re-quantization
    adds against base + adapter (``measure_logit_error``). The adapter is verified first
    (``verify_adapter``; ``force`` as there); from a base dir its identity (``weights_sha256`` of
    the weights re-created, hashed as they stream by: the checkpoint is read once) is checked
    before the result is moved into place. ``trained_on``: what a plain PEFT adapter (no
    ``qtulu.json``) was trained against (required for one; see the module docstring). Writes
    atomically (stage dir + rename; a full disk is one line, `qtulu.files.DiskFullError`). Returns
    a report dict (also saved as ``qtulu_merge.json``).

    Stages: `_out_dtype` (arguments), `_adapter_side` (verify, what it trained against),
    `_base_side` (the weights stream), `_merge_stream` (delta added, shards written),
    `_write_config`, `_merge_report`; then the stage dir replaces ``out_dir``.
    """
    from transformers import PreTrainedModel

    adapter_dir = Path(adapter_dir)
    out_dir = Path(out_dir)
    out_dtype = _out_dtype(dtype, quantize)
    meta, quant, cdtype, skip = _adapter_side(adapter_dir, trained_on, compute_dtype)
    if not isinstance(base, PreTrainedModel):
        from qtulu.model.load import load_config, resolve_checkpoint

        src_dir, _rev = resolve_checkpoint(base)
        if getattr(load_config(src_dir), "quantization_config", None):
            # a bitsandbytes-quantized checkpoint: its NF4 weights are the trained-against weights;
            # load it (it is 4-bit, so it fits) and dequantize layer by layer from memory
            from qtulu.model.load import load_base

            model, tok = load_base(str(src_dir), quantize="nf4", compute_dtype=cdtype, device="cpu", attn_implementation=None)
            return export_merged(
                model, adapter_dir, out_dir, quantize=quantize, dtype=dtype, compute_dtype=cdtype,
                max_shard_size=max_shard_size, tokenizer=tokenizer or tok, force=force, progress=progress,
                measure=measure, trained_on=trained_on,
            )
    src = _base_side(base, meta, quant, cdtype, skip, adapter_dir, force)
    from qtulu.adapters.integrity import check_adapter_weights, n_layers_of

    # NaN/inf, factors not matching the config's r, overflow in the compute dtype, layers the base lacks:
    # refused, naming the tensor or key
    check_adapter_weights(adapter_dir, compute_dtype=cdtype, n_layers=n_layers_of(src.config))
    requant_cfg = {"blocksize": (quant or {}).get("blocksize", 64), "double_quant": (quant or {}).get("double_quant", True)}
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    from qtulu.files import disk_full_is_one_line, replace_dir

    with disk_full_is_one_line(out_dir.parent, f"writing the merged model to {out_dir}"):
        stage = out_dir.with_name(f".{out_dir.name}.tmp-{uuid.uuid4().hex[:8]}")
        stage.mkdir()
        try:
            stats = _merge_stream(src, LoraDeltas(adapter_dir), stage, out_dir, adapter_dir, meta, out_dtype, quantize,
                                  skip, requant_cfg, max_shard_size, progress, force)
            _write_config(stage, src.config, out_dtype, quantize, requant_cfg, cdtype, skip)
            _write_tokenizer(stage, src.src_dir, tokenizer)
            report = _merge_report(out_dir, adapter_dir, meta, src.info, quant, out_dtype, cdtype, quantize,
                                   requant_cfg, stats)
            (stage / MERGE_META).write_text(json.dumps(report, indent=2, default=str) + "\n")
            replace_dir(stage, out_dir)
        except BaseException:
            shutil.rmtree(stage, ignore_errors=True)
            raise
        if quantize == "nf4" and measure:
            if src.src_dir is None:
                report["requantize"]["logits"] = "not measured: in-memory base (pass the base dir to measure)"
            else:
                report["requantize"]["logits"] = measure_logit_error(
                    src.src_dir, adapter_dir, out_dir, quantize_base=quant is not None, compute_dtype=cdtype,
                    tokenizer=tokenizer, trained_on=trained_on,
                )
            (out_dir / MERGE_META).write_text(json.dumps(report, indent=2, default=str) + "\n")
    return report


def _out_dtype(dtype, quantize) -> torch.dtype:
    """The merged weights' dtype; ``quantize`` must be None or ``"nf4"``."""
    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise ExportError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
        out_dtype = _DTYPES[dtype]
    else:
        out_dtype = dtype
    if quantize not in (None, "nf4"):
        raise ExportError(f"quantize must be None or 'nf4', got {quantize!r}")
    return out_dtype


def _adapter_side(adapter_dir: Path, trained_on, compute_dtype):
    """The adapter's record (verified: integrity, and for a plain PEFT adapter what --trained-on
    says, refused without it), its quantization, compute dtype and the modules kept unquantized."""
    from qtulu.adapters.store import recorded_compute_dtype, verify_adapter

    meta = verify_adapter(adapter_dir, trained_on=trained_on)
    quant = meta.get("quantization", (meta.get("base") or {}).get("quantization"))
    if compute_dtype is None:
        compute_dtype = recorded_compute_dtype(meta) or "bfloat16"
    cdtype = _DTYPES[compute_dtype] if isinstance(compute_dtype, str) else compute_dtype
    skip = tuple((quant or {}).get("skip", ("lm_head",)))
    return meta, quant, cdtype, skip


class _BaseSource:
    """Where the base weights come from: ``stream`` yields ``(name, fp32 tensor, is_linear)``, ``dry``
    the same names on the meta device (the shard plan); ``digests`` collects the weights hash."""

    def __init__(self, info, config, stream, dry, src_dir, digests, n_total):
        self.info, self.config, self.stream, self.dry = info, config, stream, dry
        self.src_dir, self.digests, self.n_total = src_dir, digests, n_total


def _base_side(base, meta: dict, quant, cdtype, skip, adapter_dir: Path, force: bool) -> _BaseSource:
    """The base re-created as the adapter trained against it (``quant``, ``cdtype``): from a loaded
    model (checked now against the adapter's record) or streamed from a checkpoint dir (its
    weights_sha256 built from the digests of the stream and checked at the end)."""
    from transformers import PreTrainedModel

    from qtulu.adapters.store import check_base

    if isinstance(base, PreTrainedModel):
        from qtulu.model.load import base_info

        info = base_info(base)
        check_base(meta, info, where=str(adapter_dir), force=force)
        return _BaseSource(info, base.config, _iter_model_base(base), _iter_model_base(base, dry=True), None, None,
                           sum(1 for _ in base.named_modules()))
    from qtulu.model.base_hash import WEIGHTS_HASH
    from qtulu.model.load import _safetensor_files, files_sha256, load_config, resolve_checkpoint

    src_dir, _rev = resolve_checkpoint(base)
    config = load_config(src_dir)
    info = {"id": str(base), "revision": _rev, "weights_sha256": None, "weights_hash": WEIGHTS_HASH,
            "quantization": quant}
    if (meta.get("base") or {}).get("weights_sha256") and not (meta.get("base") or {}).get("weights_hash"):
        # saved before weights_hash: its hash is of the files (read once more, cached)
        info.update(files_sha256=files_sha256(_safetensor_files(src_dir)), weights_hash=None)
        check_base(meta, info, where=str(adapter_dir), force=force)
    digests: dict = {}
    stream = _iter_dir_base(src_dir, config, quant, cdtype, skip, digests=digests)
    dry = _iter_dir_base(src_dir, config, quant, cdtype, skip, dry=True)
    return _BaseSource(info, config, stream, dry, src_dir, digests, None)


def _merge_stream(src: _BaseSource, deltas: "LoraDeltas", stage: Path, out_dir: Path, adapter_dir: Path, meta: dict,
                  out_dtype, quantize, skip, requant_cfg: dict, max_shard_size, progress: bool, force: bool) -> dict:
    """Each base tensor, its LoRA delta added in fp32 (Linear weights), cast (or re-quantized) and
    written to ``stage``'s shards; the base's identity checked once every tensor has streamed by.
    Returns the counts the report needs."""
    from tqdm.auto import tqdm

    from qtulu.adapters.integrity import check_finite
    from qtulu.adapters.store import check_base

    layout = output_layout(src.dry, out_dtype, quantize, skip, requant_cfg)
    writer = ShardWriter(stage, layout, parse_size(max_shard_size))
    merged, rounding, requant = 0, [], []
    for name, t, is_linear in tqdm(src.stream, total=src.n_total, desc="merge+export", disable=not progress, leave=False):
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
    if src.digests is not None and src.info.get("weights_hash"):
        from qtulu.model.base_hash import combine_digests

        src.info["weights_sha256"] = combine_digests(src.digests)
        check_base(meta, src.info, where=str(adapter_dir), force=force)  # another base: nothing is kept
    shards = writer.finish()
    return {"merged": merged, "rounding": rounding, "requant": requant, "shards": shards, "total": writer.total}


def _write_config(stage: Path, config, out_dtype, quantize, requant_cfg: dict, cdtype, skip) -> None:
    """The merged model's config.json: the base's, in ``out_dtype``, with bitsandbytes'
    ``quantization_config`` when re-quantized to NF4."""
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


def _merge_report(out_dir: Path, adapter_dir: Path, meta: dict, info: dict, quant, out_dtype, cdtype, quantize,
                  requant_cfg: dict, stats: dict) -> dict:
    from qtulu.adapters.store import trained_on_of

    rounding, requant = stats["rounding"], stats["requant"]
    report = {
        "out_dir": str(out_dir),
        "dtype": str(out_dtype).replace("torch.", ""),
        "compute_dtype": str(cdtype).replace("torch.", ""),
        "base": {k: info.get(k) for k in ("id", "revision", "weights_sha256")},
        "quantization": quant,
        "adapter": {"dir": str(adapter_dir), "sha256": (meta.get("files") or {}).get("adapter_model.safetensors"),
                    "trained_on": trained_on_of(meta)},
        "recipe": meta.get("recipe"),
        "merged_layers": stats["merged"],
        "shards": stats["shards"],
        "total_bytes": stats["total"],
        "weight_rounding_rel_error_max": max(rounding) if rounding else 0.0,
    }
    if quantize == "nf4":
        report["requantize"] = {
            "method": "nf4",
            **requant_cfg,
            "weight_rel_error_max": max(requant) if requant else 0.0,
            "weight_rel_error_mean": sum(requant) / len(requant) if requant else 0.0,
        }
    return report


def measure_logit_error(base_dir, adapter_dir, merged_dir, *, quantize_base: bool = True, compute_dtype=torch.float32,
                        tokenizer=None, n_rows: int = 2, n_tokens: int = 64, seed: int = 0,
                        trained_on: str | None = None) -> dict:
    """Logit difference of a merged model against base + adapter, on seeded random token ids.

    Both are loaded with ``qtulu.model.load.load_base`` (a bitsandbytes-NF4 export loads as NF4, so
    this fits wherever training did). Returns ``{"max_abs", "mean_abs", "logit_scale", "rel"}``
    with ``rel = max_abs / max |reference logit|``.
    """
    from qtulu.adapters.store import attach_adapters
    from qtulu.model.load import load_base

    kw = dict(compute_dtype=compute_dtype, attn_implementation=None, tokenizer=tokenizer)
    ref, _ = load_base(str(base_dir), quantize="nf4" if quantize_base else None, **kw)
    ref = attach_adapters(ref, [("ref", adapter_dir)], force=True, trained_on=trained_on)
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
    from qtulu.model.quant import Linear4bit

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
