"""Load a base model for QLoRA/LoRA training: safetensors only, streamed NF4 quantization, kernels.

``load_base`` takes an HF hub id, a local directory, or an in-memory ``PreTrainedModel``::

    model, tok = load_base("huggyllama/llama-7b")                       # NF4 base, bf16 compute
    model, tok = load_base("path/to/llama", quantize=None)              # plain LoRA on a bf16 base
    model, tok = load_base(build_tiny_llama(0), tokenizer=tok, compute_dtype=torch.float32)

From files, the model skeleton is built on the meta device and every tensor is read from the
safetensors shards one at a time; each ``nn.Linear`` (except the LM head) is quantized to NF4 as
soon as its weight is read, so peak host memory stays near the quantized size plus one layer.
Pickle checkpoints (``*.bin``, ``*.pt``) are refused: loading them can run arbitrary code.
A checkpoint already quantized by bitsandbytes (``quantization_config.load_in_4bit``) is loaded
through transformers and its ``bnb.nn.Linear4bit`` layers are converted to qtulu's module.

``base_info(model)`` identifies the base an adapter was trained on (id, revision, SHA-256 of the
original weights, quantization); adapters refuse to load on another base.
``attach_lora(model, lora_spec)`` wraps the model with a peft LoRA adapter (QLoRA is the same call
on a quantized base).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qtulu.errors import QtuluError
from qtulu.quant import Linear4bit, is_quantized

log = logging.getLogger(__name__)

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
_HF_FILE_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken"]


class ModelLoadError(QtuluError, ValueError):
    """A base model that qtulu will not load (pickle checkpoint, missing weights, bad config)."""


# --------------------------------------------------------------------------------------------
# small helpers


def as_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """``"bfloat16"`` -> ``torch.bfloat16`` (dtypes pass through; None stays None)."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"compute_dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    return _DTYPES[dtype]


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def quantization_info(quantize: str | None, *, blocksize: int = 64, double_quant: bool = True) -> dict | None:
    """The quantization record stored in ``base_info`` and in every adapter's ``qtulu.json``."""
    if quantize is None:
        return None
    if quantize != "nf4":
        raise ValueError(f"quantize must be 'nf4' or None, got {quantize!r}")
    return {"method": "nf4", "blocksize": int(blocksize), "double_quant": bool(double_quant), "skip": ["lm_head"]}


def state_dict_sha256(model: nn.Module) -> str:
    """SHA-256 over the model's tensors in name order (name, dtype, shape and raw bytes of each)."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        # view as bytes: numpy has no bfloat16, a uint8 view of the storage does the job for every dtype
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _cache_dir() -> Path:
    return Path(os.environ.get("QTULU_CACHE_DIR", Path.home() / ".cache" / "qtulu"))


def files_sha256(files: list[Path]) -> str:
    """SHA-256 over the weight files (each file's digest, in name order), cached by path/size/mtime.

    Hashing a 65B checkpoint takes minutes, so the per-file digests are cached in
    ``$QTULU_CACHE_DIR/weights_sha256.json`` (default ``~/.cache/qtulu``).
    """
    cache_path = _cache_dir() / "weights_sha256.json"
    try:
        cache = json.loads(cache_path.read_text())
    except (OSError, json.JSONDecodeError):
        cache = {}
    changed = False
    total = hashlib.sha256()
    for f in sorted(files, key=lambda p: p.name):
        real = f.resolve()
        st = real.stat()
        key = f"{real}|{st.st_size}|{st.st_mtime_ns}"
        digest = cache.get(key)
        if digest is None:
            h = hashlib.sha256()
            with open(real, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 24), b""):
                    h.update(block)
            digest = cache[key] = h.hexdigest()
            changed = True
        total.update(f"{f.name}:{digest}\n".encode())
    if changed:
        try:
            cache_path.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache_path.with_name(f".{cache_path.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(cache, indent=0, sort_keys=True))
            os.replace(tmp, cache_path)
        except OSError as e:  # a read-only home must not stop training; the hash is recomputed next time
            log.warning("could not write the weights-hash cache %s: %s", cache_path, e)
    return total.hexdigest()


# --------------------------------------------------------------------------------------------
# resolving a checkpoint on disk / on the hub


def resolve_checkpoint(name_or_path: str | os.PathLike, revision: str | None = None) -> tuple[Path, str | None]:
    """A local directory holding config + safetensors for ``name_or_path``; returns (dir, revision).

    Hub ids are downloaded (json, safetensors and tokenizer files only: never pickles).
    Raises `ModelLoadError` when only pickle weights exist.
    """
    p = Path(os.path.expanduser(str(name_or_path)))
    if p.is_dir():
        directory, rev = p, revision
    elif p.exists():
        raise ModelLoadError(f"{p}: expected a model directory (config.json + *.safetensors), got a file")
    else:
        from qtulu.hub import offline_reason, unreachable

        offline = offline_reason()  # offline: the hub cache only, and a miss fails at once (no retries)
        try:
            from huggingface_hub import snapshot_download

            directory = Path(snapshot_download(str(name_or_path), revision=revision, allow_patterns=_HF_FILE_PATTERNS,
                                               local_files_only=offline is not None))
        except Exception as e:  # noqa: BLE001 - re-raised with the id and a hint
            if offline:
                raise unreachable(f"base model {str(name_or_path)!r}", offline) from e
            raise ModelLoadError(
                f"cannot find base model {str(name_or_path)!r}: not a local directory, and the hub download "
                f"failed ({type(e).__name__}: {e})"
            ) from e
        rev = directory.name if revision is None else revision  # snapshots/<commit sha>
    if not (directory / "config.json").is_file():
        raise ModelLoadError(f"{directory}: no config.json (not a transformers model directory)")
    if not list(directory.glob("*.safetensors")):
        pickles = sorted(q.name for q in directory.iterdir() if q.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise ModelLoadError(
                f"{directory}: only pickle weights found ({', '.join(pickles[:4])}); qtulu loads safetensors only, "
                "because unpickling a checkpoint can run arbitrary code. Convert it once in a trusted "
                "environment (transformers: model.save_pretrained(dir, safe_serialization=True)) or use a "
                "repository that ships *.safetensors."
            )
        raise ModelLoadError(f"{directory}: no *.safetensors weight files")
    return directory, rev


def _safetensor_files(directory: Path) -> list[Path]:
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [directory / n for n in names]
    return sorted(directory.glob("*.safetensors"))


def _load_tokenizer(tokenizer, directory: Path | None, trust_remote_code: bool):
    # One loader for every tokenizer qtulu reads (qtulu.data.tokenizer): it converts a bare
    # SentencePiece .model correctly (transformers' own conversion of the LLaMA model orders the
    # merges wrongly, and LlamaTokenizer(vocab_file=...) yields an empty vocabulary on 5.x).
    from qtulu.data.tokenizer import load_tokenizer

    if tokenizer is None:
        names = ("tokenizer_config.json", "tokenizer.json", "tokenizer.model")
        if directory is None or not any((directory / n).is_file() for n in names):
            return None  # no tokenizer shipped: callers that need one say so (train: data.tokenizer)
        try:
            return load_tokenizer(directory, trust_remote_code=trust_remote_code)
        except Exception as e:  # noqa: BLE001 - re-raised with the directory and a hint
            raise ModelLoadError(
                f"{directory}: cannot load its tokenizer ({type(e).__name__}: {e}); pass tokenizer= "
                "(recipe: data.tokenizer)"
            ) from e
    if isinstance(tokenizer, (str, os.PathLike)):
        return load_tokenizer(os.path.expanduser(str(tokenizer)), trust_remote_code=trust_remote_code)
    return tokenizer


# --------------------------------------------------------------------------------------------
# attention + quantization


def set_attention(model, attn_implementation: str | None) -> str | None:
    """Make ``model`` use ``attn_implementation`` (registering qtulu's varlen kernel when asked)."""
    if attn_implementation is None:
        return None
    if attn_implementation == "qtulu_varlen":
        from qtulu.attention import register_attention

        attn_implementation = register_attention()
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(attn_implementation)
    else:  # older transformers
        model.config._attn_implementation = attn_implementation
    return attn_implementation


def _cast_floating_(model: nn.Module, dtype: torch.dtype) -> None:
    """Cast the floating parameters/buffers that are not NF4 storage (norms, embeddings, head)."""
    quantized = [m for m in model.modules() if isinstance(m, Linear4bit)]
    skip = {id(sub) for q in quantized for sub in q.modules()}  # absmax/code tables keep their dtype
    for module in model.modules():
        if id(module) in skip:
            continue
        for p in module.parameters(recurse=False):
            if p.is_floating_point() and p.dtype != dtype:
                p.data = p.data.to(dtype)
        for name, b in list(module.named_buffers(recurse=False)):
            # rotary inv_freq stays float32: it is a frequency table, bf16 would shift positions
            if b is not None and b.is_floating_point() and b.dtype != dtype and "inv_freq" not in name:
                module._buffers[name] = b.to(dtype)


# --------------------------------------------------------------------------------------------
# public API


def load_base(
    name_or_path,
    *,
    quantize: str | None = "nf4",
    compute_dtype: str | torch.dtype = torch.bfloat16,
    double_quant: bool = True,
    blocksize: int = 64,
    revision: str | None = None,
    trust_remote_code: bool = False,
    device: str | torch.device | None = None,
    attn_implementation: str | None = "qtulu_varlen",
    tokenizer=None,
):
    """Load a base model (optionally NF4-quantized) and its tokenizer; returns ``(model, tokenizer)``.

    ``name_or_path``: hub id, local directory, or an in-memory ``PreTrainedModel`` (quantized in
    place; calling again on the same model with the same settings returns it unchanged).
    ``quantize="nf4"`` replaces every ``nn.Linear`` except ``lm_head`` by ``qtulu.quant.Linear4bit``;
    ``None`` keeps the weights in ``compute_dtype`` (plain LoRA). ``tokenizer``: a tokenizer object,
    a path (directory or SentencePiece ``.model``), or None for the checkpoint's own.
    The model gets ``model.qtulu_base_info`` (see `base_info`).
    """
    from transformers import PreTrainedModel

    dtype = as_dtype(compute_dtype)
    quant = quantization_info(quantize, blocksize=blocksize, double_quant=double_quant)
    device = torch.device(device) if device is not None else default_device()

    if isinstance(name_or_path, PreTrainedModel):
        model = _prepare_in_memory(name_or_path, quant=quant, dtype=dtype, device=device)
        tok = _load_tokenizer(tokenizer, None, trust_remote_code)
    else:
        directory, rev = resolve_checkpoint(name_or_path, revision)
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(str(directory), trust_remote_code=trust_remote_code)
        qcfg = getattr(config, "quantization_config", None)
        if qcfg is not None:
            qcfg = qcfg if isinstance(qcfg, dict) else qcfg.to_dict()
        weight_files = _safetensor_files(directory)
        info = {
            "id": str(name_or_path),
            "revision": rev,
            "weights_sha256": files_sha256(weight_files),
            "quantization": None,
        }
        if qcfg and qcfg.get("quant_method") == "bitsandbytes" and qcfg.get("load_in_4bit"):
            model = _load_bnb_4bit(directory, config, qcfg, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
            info["quantization"] = quantization_info(
                "nf4", blocksize=_bnb_blocksize(model), double_quant=bool(qcfg.get("bnb_4bit_use_double_quant"))
            )
            info["prequantized"] = "bitsandbytes"
            if qcfg.get("bnb_4bit_quant_type", "fp4") != "nf4":
                raise ModelLoadError(f"{directory}: bitsandbytes quant type {qcfg.get('bnb_4bit_quant_type')!r}; only nf4 is supported")
        elif qcfg:
            raise ModelLoadError(f"{directory}: unsupported quantization_config {qcfg.get('quant_method')!r} (only bitsandbytes 4-bit)")
        else:
            model = _stream_load(
                directory, config, weight_files, quant=quant, dtype=dtype, device=device, trust_remote_code=trust_remote_code
            )
            info["quantization"] = quant
        model.qtulu_base_info = info
        tok = _load_tokenizer(tokenizer, directory, trust_remote_code)

    set_attention(model, attn_implementation)
    model.eval()
    return model, tok


def _prepare_in_memory(model, *, quant: dict | None, dtype: torch.dtype, device: torch.device):
    existing = getattr(model, "qtulu_base_info", None)
    if existing is not None:
        if existing.get("quantization") != quant:
            raise ModelLoadError(
                f"in-memory model was already loaded with quantization {existing.get('quantization')}, "
                f"asked for {quant}: build a fresh model instead"
            )
        return model
    if is_quantized(model):
        raise ModelLoadError("in-memory model already holds NF4 layers but was not loaded by qtulu.model.load_base")
    info = {
        "id": getattr(model.config, "_name_or_path", "") or f"in-memory:{type(model).__name__}",
        "revision": None,
        # hash of the original (pre-quantization) weights: adapters bind to these
        "weights_sha256": state_dict_sha256(model),
        "quantization": quant,
    }
    model.to(device)
    if quant is not None:
        from qtulu.quant import quantize_model_

        quantize_model_(
            model, skip=("lm_head",), blocksize=quant["blocksize"], double_quant=quant["double_quant"], compute_dtype=dtype
        )
    _cast_floating_(model, dtype)
    model.qtulu_base_info = info
    return model


def _stream_load(directory: Path, config, weight_files: list[Path], *, quant, dtype, device, trust_remote_code):
    """Build on meta, then read each tensor once, quantizing Linear weights as they arrive."""
    from accelerate import init_empty_weights
    from accelerate.utils import set_module_tensor_to_device
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code, dtype=dtype)

    key_to_file: dict[str, Path] = {}
    for f in weight_files:
        try:
            with safe_open(str(f), framework="pt") as fh:
                for k in fh.keys():
                    key_to_file[k] = f
        except Exception as e:  # noqa: BLE001 - safetensors' own error type: one line naming the file
            raise ModelLoadError(f"{f}: not a readable safetensors file ({type(e).__name__}: {e})") from e
    model_keys = set(model.state_dict().keys())

    def file_key(param_name: str) -> str | None:
        if param_name in key_to_file:
            return param_name
        prefix = getattr(model, "base_model_prefix", "model") + "."
        if param_name.startswith(prefix) and param_name[len(prefix):] in key_to_file:
            return param_name[len(prefix):]  # a bare-backbone checkpoint (LlamaModel keys)
        return None

    handles: dict[Path, Any] = {}

    def read(param_name: str) -> torch.Tensor:
        key = file_key(param_name)
        f = key_to_file[key]
        if f not in handles:
            handles[f] = safe_open(str(f), framework="pt", device="cpu")
        return handles[f].get_tensor(key)

    tied = bool(getattr(config, "tie_word_embeddings", False))
    missing = [k for k in sorted(model_keys) if file_key(k) is None and not (tied and k.endswith("lm_head.weight"))]
    if missing:
        raise ModelLoadError(f"{directory}: weights missing from the safetensors files: {missing[:5]} ({len(missing)} in all)")

    from tqdm.auto import tqdm

    done: set[str] = set()
    modules = list(model.named_modules())
    for mod_name, module in tqdm(modules, desc="loading base" + (" (NF4)" if quant else ""), leave=False):
        prefix = f"{mod_name}." if mod_name else ""
        if quant is not None and isinstance(module, nn.Linear) and mod_name.split(".")[-1] != "lm_head":
            w_name = prefix + "weight"
            if w_name in done or file_key(w_name) is None:
                continue
            weight = read(w_name)
            bias = read(prefix + "bias") if module.bias is not None else None
            dense = nn.Linear(module.in_features, module.out_features, bias=bias is not None, device=device, dtype=dtype)
            with torch.no_grad():
                dense.weight.copy_(weight)
                if bias is not None:
                    dense.bias.copy_(bias)
            del weight, bias
            q = Linear4bit.from_linear(
                dense, blocksize=quant["blocksize"], double_quant=quant["double_quant"], compute_dtype=dtype
            )
            del dense
            parent = model.get_submodule(mod_name.rsplit(".", 1)[0]) if "." in mod_name else model
            setattr(parent, mod_name.rsplit(".", 1)[-1], q)
            done.update({w_name, prefix + "bias"})
            continue
        for p_name, _ in list(module.named_parameters(recurse=False)):
            full = prefix + p_name
            if full in done or file_key(full) is None:
                continue
            t = read(full)
            set_module_tensor_to_device(model, full, device, value=t.to(dtype) if t.is_floating_point() else t)
            done.add(full)
        for b_name, b in list(module.named_buffers(recurse=False)):
            full = prefix + b_name
            if full in done:
                continue
            if file_key(full) is not None:
                t = read(full)
                set_module_tensor_to_device(model, full, device, value=t)
            elif b.device.type != device.type:
                module._buffers[b_name] = b.to(device)
            done.add(full)
    handles.clear()
    if tied:
        model.tie_weights()
    leftover = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if leftover:
        raise ModelLoadError(f"{directory}: parameters left unloaded: {leftover[:5]}")
    return model


def _bnb_blocksize(model) -> int:
    for m in model.modules():
        if isinstance(m, Linear4bit):
            state = getattr(m, "quant_state", None) or getattr(m, "state", None)
            bs = getattr(state, "blocksize", None)
            if bs:
                return int(bs)
    return 64


def _load_bnb_4bit(directory: Path, config, qcfg: dict, *, dtype, device, trust_remote_code):
    """A checkpoint quantized by bitsandbytes: load it through transformers, convert its layers."""
    import bitsandbytes as bnb
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        str(directory), dtype=dtype, device_map={"": str(device)}, trust_remote_code=trust_remote_code
    )
    for name, module in list(model.named_modules()):
        if isinstance(module, bnb.nn.Linear4bit):
            parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
            setattr(parent, name.rsplit(".", 1)[-1], Linear4bit.from_bnb(module))
    # transformers marks the model as bnb-quantized; it now holds qtulu modules instead
    for attr in ("is_loaded_in_4bit", "is_quantized"):
        if getattr(model, attr, False):
            try:
                setattr(model, attr, False)
            except AttributeError:
                pass
    model.hf_quantizer = None
    return model


def base_info(model) -> dict:
    """``{"id", "revision", "weights_sha256", "quantization"}`` of the base under ``model``.

    Works on a peft model too. For a model not loaded by `load_base`, the hash is computed now over
    its current tensors (with a warning: for a quantized model those are not the original weights).
    """
    m = model
    if hasattr(m, "get_base_model"):
        m = m.get_base_model()
    info = getattr(m, "qtulu_base_info", None)
    if info is not None:
        return dict(info)
    warnings.warn("base_info: model was not loaded by qtulu.model.load_base; hashing its current weights", stacklevel=2)
    info = {
        "id": getattr(m.config, "_name_or_path", "") or f"in-memory:{type(m).__name__}",
        "revision": None,
        "weights_sha256": state_dict_sha256(m),
        "quantization": quantization_info("nf4") if is_quantized(m) else None,
    }
    m.qtulu_base_info = info
    return dict(info)


def attach_lora(model, lora, *, adapter_name: str = "default", gradient_checkpointing: bool = False):
    """Wrap ``model`` with a trainable peft LoRA adapter from a `LoraSpec` (r, alpha, dropout, targets).

    QLoRA is this same call on a model whose linears are NF4 (`load_base(quantize="nf4")`).
    The LM head is never adapted (TRL's fused LM head reads ``lm_head.weight`` directly).
    """
    from peft import LoraConfig, get_peft_model

    target = lora.target_modules
    config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=target if isinstance(target, str) else list(target),
        exclude_modules=["lm_head"],
        task_type="CAUSAL_LM",
    )
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        # the frozen embedding output has no grad; checkpointed blocks need an input that does
        model.enable_input_require_grads()
    return get_peft_model(model, config, adapter_name=adapter_name)
