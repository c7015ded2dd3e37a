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

``base_info(model)`` identifies the base an adapter was trained on (id, revision, quantization and
``weights_sha256``: the SHA-256 of what the adapter trains against, i.e. the NF4 codes and quant
state of every quantized layer and the values of every other tensor, see `state_dict_sha256`);
adapters refuse to load on another base. The same NF4 bits give the same hash whether they come
from a qtulu quantization, a bitsandbytes checkpoint or an in-memory bitsandbytes model.
``attach_lora(model, lora_spec)`` wraps the model with a peft LoRA adapter (QLoRA is the same call
on a quantized base).
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from pathlib import Path

import torch
from torch import nn

from qtulu.model.base_hash import (  # noqa: F401 - re-exported: the base identity lives there
    WEIGHTS_HASH,
    _is_nf4_layer,
    combine_digests,
    files_sha256,
    state_dict_sha256,
    tensor_digests,
)
from qtulu.errors import QtuluError
from qtulu.model.gguf import is_gguf, materialize
from qtulu.model.quant import Linear4bit, is_quantized
from qtulu.model.reader import CheckpointReader

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
        raise ModelLoadError(f"compute_dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    return _DTYPES[dtype]


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def quantization_info(quantize: str | None, *, blocksize: int = 64, double_quant: bool = True) -> dict | None:
    """The quantization record stored in ``base_info`` and in every adapter's ``qtulu.json``."""
    if quantize is None:
        return None
    if quantize != "nf4":
        raise ModelLoadError(f"quantize must be 'nf4' or None, got {quantize!r}")
    return {"method": "nf4", "blocksize": int(blocksize), "double_quant": bool(double_quant), "skip": ["lm_head"]}


# --------------------------------------------------------------------------------------------
# resolving a checkpoint on disk / on the hub


def resolve_checkpoint(name_or_path: str | os.PathLike, revision: str | None = None) -> tuple[Path, str | None]:
    """A local directory holding config + safetensors for ``name_or_path``; returns (dir, revision).

    A ``.gguf`` file gives its dequantized folder and ``"sha256:<the file's sha256>"`` (qtulu.model.gguf).

    Hub ids are downloaded (json, safetensors and tokenizer files only: never pickles).
    Raises `ModelLoadError` when only pickle weights exist, and "not found" (no hub lookup) for a
    name that looks like a local path (see `looks_local`) but does not exist.
    """
    p = Path(os.path.expanduser(str(name_or_path)))
    if is_gguf(p):  # a llama.cpp file: dequantized once into a transformers folder named by its sha256
        directory, sha = materialize(p)
        return directory, f"sha256:{sha}"
    if p.is_dir():
        directory, rev = p, revision
    elif p.exists():
        raise ModelLoadError(f"{p}: expected a model directory (config.json + *.safetensors), got a file")
    elif looks_local(str(name_or_path)):
        raise ModelLoadError(f"{p}: base model directory not found")
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


def load_config(directory: Path, *, trust_remote_code: bool = False):
    """``AutoConfig`` of a model directory; a config transformers cannot read is a `ModelLoadError`
    naming the file (an unknown ``model_type``, bad JSON, a missing key)."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(str(directory), trust_remote_code=trust_remote_code)
    except (ValueError, KeyError, TypeError) as e:
        raise ModelLoadError(f"{Path(directory) / 'config.json'}: {type(e).__name__}: {e}") from None


def looks_local(name: str) -> bool:
    """True when ``name`` is meant as a local path, not a hub id (``org/name`` or ``name``): it
    starts with ``./``, ``../``, ``/`` or ``~``, holds the OS separator where that is not ``/``,
    has more than one ``/``, its first component exists here (``runs/base`` beside ``runs/``), or
    it is not a valid hub id at all."""
    s = str(name)
    if s in (".", "..", "~") or s.startswith(("./", "../", "/", "~", ".\\", "..\\")):
        return True
    if (os.sep != "/" and os.sep in s) or (os.altsep and os.altsep != "/" and os.altsep in s):
        return True
    if s.count("/") > 1 or ("/" in s and Path(s.split("/", 1)[0]).is_dir()):
        return True
    try:
        from huggingface_hub.utils import validate_repo_id

        validate_repo_id(s)
    except Exception:  # noqa: BLE001 - HFValidationError: not a hub id, so a (missing) path
        return True
    return False


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
    """Make ``model`` use ``attn_implementation`` (registering qtulu's varlen kernel when asked;
    a model whose attention the kernel cannot reproduce is refused, naming the config key)."""
    if attn_implementation is None:
        return None
    if attn_implementation == "qtulu_varlen":
        from qtulu.model.attention import check_packed_support, register_attention

        check_packed_support(model.config)
        attn_implementation = register_attention()
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(attn_implementation)
    else:  # older transformers
        model.config._attn_implementation = attn_implementation
    if attn_implementation == "qtulu_varlen":
        from qtulu.model.attention import check_attention_took_effect

        check_attention_took_effect(model)  # a model whose attention bypasses the interface is refused
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
    ``quantize="nf4"`` replaces every ``nn.Linear`` except ``lm_head`` by ``qtulu.model.quant.Linear4bit``;
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
        config = load_config(directory, trust_remote_code=trust_remote_code)
        qcfg = getattr(config, "quantization_config", None)
        if qcfg is not None:
            qcfg = qcfg if isinstance(qcfg, dict) else qcfg.to_dict()
        weight_files = _safetensor_files(directory)
        info = {"id": str(name_or_path), "revision": rev, "weights_sha256": None, "quantization": None}
        if is_gguf(name_or_path):
            info["gguf_sha256"] = rev.split(":", 1)[1]  # the file's identity, beside what the adapter trains on
        if qcfg and qcfg.get("quant_method") == "bitsandbytes" and qcfg.get("load_in_4bit"):
            if qcfg.get("bnb_4bit_quant_type", "fp4") != "nf4":
                raise ModelLoadError(f"{directory / 'config.json'}: quantization_config.bnb_4bit_quant_type "
                                     f"{qcfg.get('bnb_4bit_quant_type')!r}; only nf4 is supported")
            if quantize is None:
                raise ModelLoadError(f"{directory}: a bitsandbytes 4-bit checkpoint cannot be loaded unquantized "
                                     "(quantize=None); load it with quantize='nf4'")
            model = _load_bnb_4bit(directory, config, qcfg, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
            info["quantization"] = _nf4_settings(model, where=str(directory))
            info["prequantized"] = "bitsandbytes"
        elif qcfg:
            raise ModelLoadError(f"{directory / 'config.json'}: unsupported quantization_config "
                                 f"{qcfg.get('quant_method')!r} (only bitsandbytes 4-bit)")
        else:
            model = _stream_load(
                directory, config, weight_files, quant=quant, dtype=dtype, device=device, trust_remote_code=trust_remote_code
            )
            info["quantization"] = quant
        model.qtulu_base_info = info
        model.qtulu_source_dir = directory  # for adapters saved before WEIGHTS_HASH (files hash)
        tok = _load_tokenizer(tokenizer, directory, trust_remote_code)

    set_attention(model, attn_implementation)
    model.eval()
    return model, tok


def _prepare_in_memory(model, *, quant: dict | None, dtype: torch.dtype, device: torch.device):
    existing = getattr(model, "qtulu_base_info", None)
    raw_bnb = any(_is_nf4_layer(m) and not isinstance(m, Linear4bit) for m in model.modules())
    if existing is not None and not raw_bnb:  # (base_info alone may have tagged a bnb model)
        if existing.get("quantization") != quant and not existing.get("prequantized"):
            raise ModelLoadError(
                f"in-memory model was already loaded with quantization {existing.get('quantization')}, "
                f"asked for {quant}: build a fresh model instead"
            )
        return model
    info = {
        "id": getattr(model.config, "_name_or_path", "") or f"in-memory:{type(model).__name__}",
        "revision": None,
        "weights_sha256": None,  # computed on first use (base_info), over what adapters train against
        "quantization": quant,
    }
    if raw_bnb:
        # a transformers + bitsandbytes 4-bit model: take over its NF4 bits as they are
        if quant is None:
            raise ModelLoadError(
                f"in-memory model {info['id']!r} is bitsandbytes 4-bit: it cannot be loaded unquantized "
                "(quantize=None); load it with quantize='nf4'"
            )
        _convert_bnb_layers(model, dtype)
        info["quantization"] = _nf4_settings(model, where=f"in-memory model {info['id']!r}")
        info["prequantized"] = "bitsandbytes"
        model.to(device)
        _cast_floating_(model, dtype)
        model.qtulu_base_info = info
        return model
    if is_quantized(model):
        raise ModelLoadError("in-memory model already holds NF4 layers but was not loaded by qtulu.model.load.load_base")
    model.to(device)
    if quant is not None:
        from qtulu.model.quant import quantize_model_

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
    from transformers import AutoModelForCausalLM

    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code, dtype=dtype)

    reader = CheckpointReader(weight_files, getattr(model, "base_model_prefix", "model"), ModelLoadError)
    model_keys = set(model.state_dict().keys())
    file_key, read = reader.key, reader.read

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
    reader.close()
    if tied:
        model.tie_weights()
    leftover = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if leftover:
        raise ModelLoadError(f"{directory}: parameters left unloaded: {leftover[:5]}")
    return model


def _nf4_settings(model, *, where: str) -> dict:
    """The quantization record of a model whose NF4 layers came from bitsandbytes (one blocksize
    and double-quant setting for all; the Linear layers left in float are its ``skip``)."""
    settings = {(m.quant_state.blocksize, m.quant_state.nested) for m in model.modules() if isinstance(m, Linear4bit)}
    if len(settings) != 1:
        why = ("; bitsandbytes had repacked some of them for its CPU kernel, which undoes double quantization: "
               "load the checkpoint instead" if any(getattr(m, "bnb_cpu_repacked", False) for m in model.modules())
               else "")
        raise ModelLoadError(f"{where}: NF4 layers with different settings {sorted(settings)} (blocksize, double quant)"
                             + why)
    (blocksize, nested), = settings
    skip = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                   if isinstance(m, nn.Linear) and not isinstance(m, Linear4bit)})
    return {"method": "nf4", "blocksize": int(blocksize), "double_quant": bool(nested), "skip": skip}


def _convert_bnb_layers(model, dtype: torch.dtype | None) -> None:
    """Replace every quantized ``bitsandbytes.nn.Linear4bit`` by qtulu's `Linear4bit` over the
    same codes (no copy); the model stops presenting itself as bitsandbytes-quantized."""
    repacked = 0
    for name, module in list(model.named_modules()):
        if _is_nf4_layer(module) and not isinstance(module, Linear4bit):
            try:
                q = Linear4bit.from_bnb(module)
            except ValueError as e:  # FP4, or not quantized yet
                raise ModelLoadError(f"{name}: {e}") from None
            repacked += q.bnb_cpu_repacked
            if dtype is not None:
                q.compute_dtype = dtype
            parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
            setattr(parent, name.rsplit(".", 1)[-1], q)
    if repacked:
        warnings.warn(
            f"{repacked} NF4 layers had been repacked by bitsandbytes for its CPU kernel (an eval-mode forward "
            "on a CPU with AVX512-BF16), which rounds their absmax to bfloat16 and undoes double quantization: "
            "qtulu takes them as they now compute, so this base's weights_sha256 is not its checkpoint's; "
            "for the original bits load the checkpoint, or hand the model over before any CPU forward",
            stacklevel=3)
    # transformers marks the model as bnb-quantized; it now holds qtulu modules instead
    for attr in ("is_loaded_in_4bit", "is_quantized"):
        if getattr(model, attr, False):
            try:
                setattr(model, attr, False)
            except AttributeError:
                pass
    model.hf_quantizer = None


def _load_bnb_4bit(directory: Path, config, qcfg: dict, *, dtype, device, trust_remote_code):
    """A checkpoint quantized by bitsandbytes: load it through transformers, convert its layers."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        str(directory), dtype=dtype, device_map={"": str(device)}, trust_remote_code=trust_remote_code
    )
    _convert_bnb_layers(model, dtype)
    return model


def base_info(model) -> dict:
    """``{"id", "revision", "weights_sha256", "weights_hash", "quantization"}`` of the base under
    ``model`` (a peft model too): ``weights_sha256`` is `state_dict_sha256` of the base as loaded,
    computed on the first call and kept (an adapter saved on this base records it).

    For a model not loaded by `load_base` it is computed over its current tensors; the
    quantization is then read from its NF4 layers.
    """
    m = model
    if hasattr(m, "get_base_model"):
        m = m.get_base_model()
    info = getattr(m, "qtulu_base_info", None)
    if info is None:
        quant = None
        if is_quantized(m) or any(_is_nf4_layer(x) for x in m.modules()):
            quant = quantization_info("nf4")
            states = [x.quant_state for x in m.modules() if isinstance(x, Linear4bit)]
            if states:
                quant.update(blocksize=int(states[0].blocksize), double_quant=bool(states[0].nested))
        info = {"id": getattr(m.config, "_name_or_path", "") or f"in-memory:{type(m).__name__}",
                "revision": None, "weights_sha256": None, "quantization": quant}
        m.qtulu_base_info = info
    if not info.get("weights_sha256") or info.get("weights_hash") != WEIGHTS_HASH:
        info["weights_sha256"] = state_dict_sha256(m)
        info["weights_hash"] = WEIGHTS_HASH
    return dict(info)


def attach_lora(model, lora, *, adapter_name: str = "default", gradient_checkpointing: bool = False):
    """Wrap ``model`` with a trainable peft LoRA adapter from a `LoraSpec` (r, alpha, dropout, targets).

    QLoRA is this same call on a model whose linears are NF4 (`load_base(quantize="nf4")`).
    The LM head is never adapted (TRL's fused LM head reads ``lm_head.weight`` directly).
    Training is packed: ``config.use_cache`` is set False, so no forward of the run builds a KV
    cache (which packed rows must never feed; generation still asks for one explicitly).
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
    model.config.use_cache = False
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        # the frozen embedding output has no grad; checkpointed blocks need an input that does
        model.enable_input_require_grads()
    return get_peft_model(model, config, adapter_name=adapter_name)
