"""The two stacks the planner runs, built from a config on the meta device (or for real, on CPU).

* `build_qtulu`: what ``qtulu train`` builds: the transformers model, every ``nn.Linear`` but the
  LM head replaced by qtulu's NF4 ``Linear4bit``, the ``qtulu_varlen`` attention, TRL's fused LM
  head (as ``SFTTrainer`` adds it), peft LoRA through `qtulu.model.load.attach_lora`, then the recipe's
  memory switches (`apply_reductions`).
* `build_hf`: transformers + peft + bitsandbytes as TRL's ``SFTTrainer`` (trl 1.16) sets them up for
  a 4-bit model: bitsandbytes ``Linear4bit`` NF4 layers, peft ``get_peft_model`` (no
  ``prepare_model_for_kbit_training``: TRL never calls it, so embedding, head and norms stay bf16),
  the adapters cast to bf16 (TRL's default for a quantized model; ``adapter_dtype="float32"`` keeps
  peft's fp32), ``enable_input_require_grads`` + transformers' non-reentrant checkpointing, TRL's
  fused LM head (``add_fused_lm_head`` on the base model, 32768-column tiles), SDPA attention on an
  unpacked row (``packing=False``, TRL's default).

On ``meta`` the NF4 layers are built with their constructors (all-zero codes of the real layout:
``quantize_nf4`` needs the weight's values); for real tensors the weights are quantized
(`qtulu.model.quant.quantize_model_`). `tests/plan/test_plan.py` checks that both give the same tensors.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qtulu.plan.errors import PlanError

__all__ = ["PlanError", "resolve_config", "build_qtulu", "build_hf", "hf_differences", "HF_SETUP", "nf4_layers_",
           "quant_state_tensors", "to_fake_device", "apply_reductions"]

_SHAPE_ALIASES = {"7b": "llama-7b", "13b": "llama-13b", "30b": "llama-30b", "33b": "llama-30b", "65b": "llama-65b"}


def resolve_config(shape: str | None = None, config: str | os.PathLike | None = None, *, seq_len: int = 2048):
    """A transformers config from a built-in shape name (``llama-7b``, ``65b``, ``tiny``...) or a config.

    ``config``: a ``config.json``, a model directory, or a hub id (only its config.json is read).
    """
    from transformers import AutoConfig

    if (shape is None) == (config is None):
        raise PlanError("give exactly one of a shape name or an HF config")
    if shape is not None:
        from qtulu.model.shapes import SHAPES

        name = _SHAPE_ALIASES.get(shape.lower(), shape)
        if name not in SHAPES:
            raise PlanError(f"unknown shape {shape!r}; known: {', '.join(list(SHAPES) + list(_SHAPE_ALIASES))}")
        cfg = SHAPES[name].llama_config(max_position_embeddings=max(2048, seq_len))
        cfg._name_or_path = name
        return cfg
    p = Path(os.path.expanduser(str(config)))
    if not p.exists() and (str(config).endswith(".json") or str(config).startswith(("/", ".", "~"))):
        raise PlanError(f"{config}: no such file or directory")
    try:
        if p.is_file():
            cfg = AutoConfig.from_pretrained(str(p.parent) if p.name == "config.json" else str(p))
        else:
            cfg = AutoConfig.from_pretrained(str(config), trust_remote_code=False)
    except (OSError, ValueError) as e:
        raise PlanError(f"{config}: cannot read a transformers config ({e})") from e
    if not getattr(cfg, "_name_or_path", ""):
        cfg._name_or_path = str(config)
    cfg.use_cache = False
    return cfg


def _replace_linears(model: nn.Module, make) -> list[str]:
    names = []
    for name, mod in list(model.named_modules()):
        if type(mod) is nn.Linear and name and name.rsplit(".", 1)[-1] != "lm_head":
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, make(mod))
            names.append(name)
    return names


def nf4_layers_(model: nn.Module, *, blocksize: int, double_quant: bool, compute_dtype: torch.dtype) -> nn.Module:
    """qtulu's NF4 layers in place of every ``nn.Linear`` except ``lm_head`` (as `load_base` does)."""
    from qtulu.model.quant import Linear4bit, quantize_model_

    meta = next(model.parameters()).device.type == "meta"
    if not meta:
        return quantize_model_(model, skip=("lm_head",), blocksize=blocksize, double_quant=double_quant,
                               compute_dtype=compute_dtype)
    _replace_linears(model, lambda m: Linear4bit(
        m.in_features, m.out_features, bias=m.bias is not None, blocksize=blocksize, double_quant=double_quant,
        compute_dtype=compute_dtype, device="meta", dtype=m.weight.dtype,
    ))
    return model


def _from_config(config, dtype: torch.dtype, device: str, seed: int = 0):
    from transformers import AutoModelForCausalLM

    if device == "meta":
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=False)
    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(seed)
        return AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=False)


def build_qtulu(config, settings, *, device: str = "meta"):
    """qtulu's training model for ``settings`` (a `qtulu.plan.settings.PlanSettings`)."""
    from trl.trainer.utils import add_fused_lm_head

    from qtulu.model.load import attach_lora, set_attention

    dtype = settings.torch_dtype
    model = _from_config(config, dtype, device)
    if settings.quantize == "nf4":
        nf4_layers_(model, blocksize=settings.blocksize, double_quant=settings.double_quant, compute_dtype=dtype)
    set_attention(model, settings.attn_implementation)
    # what SFTTrainer does before anything else: the chunked LM head computing log-probs, entropy, top-1
    add_fused_lm_head(model, outputs=("log_probs", "entropy", "is_top1"))
    peft_model = attach_lora(model, settings.lora_spec())
    if settings.gradient_checkpointing:
        _enable_checkpointing(peft_model)
    apply_reductions(peft_model, settings)
    peft_model.train()
    return peft_model


def _enable_checkpointing(model, use_reentrant: bool = False) -> None:
    """What Trainer does for ``activation_checkpointing=True`` (qtulu asks for non-reentrant)."""
    kwargs = {"use_reentrant": use_reentrant}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:  # transformers < 5.2x
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if use_reentrant:
        model.enable_input_require_grads()


def apply_reductions(peft_model, settings) -> None:
    """The recipe's memory switches, through the same functions ``qtulu train`` calls."""
    if settings.lora_dropout_impl == "recompute":
        from qtulu.train.lora_dropout import use_recompute_dropout

        use_recompute_dropout(peft_model)
    if settings.activation_offload:
        from qtulu.train.offload import enable_activation_offload

        enable_activation_offload(peft_model)


def build_hf(config, settings, *, device: str = "meta"):
    """transformers + peft + bitsandbytes QLoRA as TRL 1.16's ``SFTTrainer.__init__`` prepares it
    (trl/trainer/sft_trainer.py): ``settings.extra["adapter_dtype"]`` "bfloat16" (TRL's cast of the
    trainable parameters of a quantized model, its default) or "float32" (peft's own default)."""
    import bitsandbytes as bnb
    from peft import LoraConfig, get_peft_model
    from trl.trainer.utils import add_fused_lm_head

    dtype = settings.torch_dtype
    config = type(config).from_dict(config.to_dict())
    config._attn_implementation = "sdpa"
    model = _from_config(config, dtype, device)

    def make(m: nn.Linear):
        layer = bnb.nn.Linear4bit(m.in_features, m.out_features, bias=m.bias is not None, compute_dtype=dtype,
                                  compress_statistics=settings.double_quant, quant_type="nf4",
                                  quant_storage=torch.uint8, device=device)
        if device == "meta":
            layer.weight = _meta_params4bit(m.out_features, m.in_features, settings.blocksize,
                                            settings.double_quant, dtype)
        else:
            # bitsandbytes quantizes a Params4bit when it is moved to a device
            layer.weight = bnb.nn.Params4bit(m.weight.data.to(dtype).cpu(), requires_grad=False, quant_type="nf4",
                                             blocksize=settings.blocksize, compress_statistics=settings.double_quant,
                                             quant_storage=torch.uint8, module=layer).to(device)
        layer.compute_type_is_set = True
        return layer

    _replace_linears(model, make)
    model.is_loaded_in_4bit = True
    model.is_quantized = True
    t = settings.lora_spec()
    cfg = LoraConfig(r=t.r, lora_alpha=t.alpha, lora_dropout=t.dropout,
                     target_modules=t.target_modules if isinstance(t.target_modules, str) else list(t.target_modules),
                     task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, cfg)
    if settings.gradient_checkpointing:  # Trainer's (non-reentrant in transformers 5) + TRL's input grads
        _enable_checkpointing(peft_model)
        peft_model.enable_input_require_grads()
    adapter_dtype = settings.extra.get("adapter_dtype", "bfloat16")
    if adapter_dtype != "float32":  # TRL: "the PEFT adapter weights are converted to bf16" for QLoRA
        for name, p in peft_model.named_parameters():
            if p.requires_grad and "lora_magnitude_vector" not in name:
                p.data = p.data.to(torch.bfloat16)
    add_fused_lm_head(peft_model.get_base_model(), outputs=("log_probs", "entropy", "is_top1"))
    peft_model.train()
    return peft_model


# what --compare-hf names as the difference between the two stacks, whatever the switches
HF_SETUP = ("transformers + peft + bitsandbytes as TRL {trl}'s SFTTrainer sets them up: no "
            "prepare_model_for_kbit_training, bf16 adapters (TRL's cast for quantized models; also planned with "
            "peft's fp32), TRL's fused LM head (32768-column tiles), non-reentrant checkpointing, SDPA, an unpacked row")


def hf_differences(settings) -> list[str]:
    """Each difference between qtulu's planned step (``settings``) and HF as TRL sets it up."""
    out = [
        "4-bit matmul: qtulu's NF4 kernels (no dequantized weight) vs bitsandbytes' Linear4bit (dequantizes "
        "the whole weight to bf16 past 1536 rows, forward and backward)",
        "LoRA weights: fp32 (peft's default, kept by qtulu train) vs bf16 (TRL's cast for a quantized model)",
    ]
    if settings.attn_implementation != "sdpa":
        out.append(f"attention: {settings.attn_implementation} on one packed row (padding-free) vs SDPA on an "
                   "unpacked row (TRL's packing=False default)")
    if settings.lora_dropout_impl == "recompute":
        out.append("LoRA dropout: mask regenerated in backward, lora_B cast per use (lora.dropout_impl=recompute) "
                   "vs peft's nn.Dropout (keeps the dropped fp32/bf16 input) and autocast's cached lora_B copies")
    if settings.loss_chunk_size is not None:
        out.append(f"loss tile: {settings.loss_chunk_size} vocabulary columns (train.loss_chunk_size) vs TRL's 32768")
    if settings.activation_offload:
        out.append("checkpointed layer inputs in pinned host memory (train.activation_offload) vs on the GPU")
    if settings.master_weights == "host":
        out.append("fp32 master LoRA weights, gradient sums and the optimizer on the host, the optimizer step on "
                   "the CPU (train.master_weights=host: ZeRO-Offload) vs all on the GPU")
    return out


def _meta_params4bit(out_features: int, in_features: int, blocksize: int, double_quant: bool, dtype: torch.dtype):
    """A bitsandbytes ``Params4bit`` with the NF4 layout of an (out, in) weight, on the meta device."""
    import bitsandbytes as bnb
    from bitsandbytes.functional import QuantState

    n = out_features * in_features
    nb = -(-n // blocksize)
    packed = torch.empty(((n + 1) // 2, 1), dtype=torch.uint8, device="meta")
    code = torch.empty(16, dtype=torch.float32, device="meta")
    if double_quant:
        state2 = QuantState(absmax=torch.empty(-(-nb // 256), dtype=torch.float32, device="meta"),
                            code=torch.empty(256, dtype=torch.float32, device="meta"), blocksize=256,
                            dtype=torch.float32)
        qs = QuantState(absmax=torch.empty(nb, dtype=torch.uint8, device="meta"),
                        shape=torch.Size((out_features, in_features)), code=code, blocksize=blocksize,
                        quant_type="nf4", dtype=dtype, offset=torch.empty((), dtype=torch.float32, device="meta"),
                        state2=state2)
    else:
        qs = QuantState(absmax=torch.empty(nb, dtype=torch.float32, device="meta"),
                        shape=torch.Size((out_features, in_features)), code=code, blocksize=blocksize,
                        quant_type="nf4", dtype=dtype)
    return bnb.nn.Params4bit(packed, requires_grad=False, quant_state=qs, blocksize=blocksize,
                             compress_statistics=double_quant, quant_type="nf4", quant_storage=torch.uint8,
                             bnb_quantized=True)


def quant_state_tensors(model: nn.Module) -> list[torch.Tensor]:
    """The NF4 quant-state tensors of every 4-bit layer (qtulu's or bitsandbytes'): not parameters."""
    out: list[torch.Tensor] = []
    from qtulu.model.quant import Linear4bit

    for m in model.modules():
        if isinstance(m, Linear4bit):
            s = m.quant_state
            out += [t for t in (s.absmax, s.code, s.offset, s.absmax2, s.code2) if t is not None]
        else:
            qs = getattr(getattr(m, "weight", None), "quant_state", None)
            if qs is not None and hasattr(qs, "absmax"):
                out += [t for t in (qs.absmax, qs.code, getattr(qs, "offset", None)) if isinstance(t, torch.Tensor)]
                s2 = getattr(qs, "state2", None)
                if s2 is not None:
                    out += [t for t in (s2.absmax, s2.code) if isinstance(t, torch.Tensor)]
    return out


def to_fake_device(model: nn.Module, device: str = "cpu") -> None:
    """Inside a FakeTensorMode: turn every meta tensor of ``model`` (quant states included) into a
    fake tensor on ``device``."""
    from qtulu.model.quant import Linear4bit

    # bitsandbytes keeps the quant state on its Params4bit, which to_empty turns into a plain
    # Parameter (a tensor subclass cannot wrap a fake tensor): carry the state over as an attribute,
    # where bitsandbytes' Linear4bit.forward looks for it first
    bnb_states = {}
    for m in model.modules():
        qs = getattr(getattr(m, "weight", None), "quant_state", None)
        if qs is not None and not isinstance(m, Linear4bit) and hasattr(qs, "absmax"):
            bnb_states[m] = qs
    model.to_empty(device=device)  # parameters and buffers; qtulu's Linear4bit moves its quant state
    for m in model.modules():
        if isinstance(m, Linear4bit) and m.quant_state.absmax.device.type == "meta":
            m.quant_state = m.quant_state.to(device)
    for m, qs in bnb_states.items():
        _qs_to(qs, device)
        m.weight.quant_state = qs
        m.quant_state = qs


def _qs_to(qs: Any, device: str) -> None:
    for name in ("absmax", "code", "offset"):
        t = getattr(qs, name, None)
        if isinstance(t, torch.Tensor) and t.device.type == "meta":
            setattr(qs, name, torch.empty_like(t, device=device))
    s2 = getattr(qs, "state2", None)
    if s2 is not None:
        _qs_to(s2, device)
