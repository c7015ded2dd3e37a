"""Build a benchmark model straight into 4-bit, layer by layer, with random weights.

The skeleton is created on the ``meta`` device (no memory), then each decoder linear gets a
random bf16 weight on the target device that is quantized at once and dropped, so the largest
bf16 tensor alive is one linear (65B: 22016 x 8192, 360 MB): a 65B model never exists in bf16.
Both stacks get the same random weights (same seed per layer and projection):

- qtulu: ``qtulu.model.quant.Linear4bit`` (NF4, double quant, blocksize 64) and the ``qtulu_varlen``
  attention (or SDPA for the A/B run without it);
- baseline: what ``from_pretrained(quantization_config=BitsAndBytesConfig(nf4, double quant, bf16
  compute))`` builds: transformers' own ``replace_with_bnb_linear`` then ``bnb.nn.Params4bit``
  quantized on the device, SDPA attention.

LoRA is attached the way TRL's SFTTrainer does for a quantized model: peft ``get_peft_model``
with ``target_modules="all-linear"``, adapter weights cast to the compute dtype, gradient
checkpointing (non-reentrant) and input gradients enabled.
"""

from __future__ import annotations

import zlib
from typing import Callable

import torch
from torch import nn

from qtulu.model.shapes import ShapeSpec

INIT_STD = 0.02  # transformers' LlamaConfig.initializer_range


def _generator(device: torch.device, seed: int) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g


def _random_weight(out_f: int, in_f: int, *, device, dtype, seed: int) -> torch.Tensor:
    w = torch.empty(out_f, in_f, device=device, dtype=dtype)  # (out, in)
    return w.normal_(0.0, INIT_STD, generator=_generator(w.device, seed))


def _layer_seed(seed: int, layer: int, proj: int) -> int:
    return (seed * 1_000_003 + layer * 101 + proj) % (2**63)


def _materialize_rest_(model: nn.Module, config, *, device, dtype, seed: int) -> None:
    """Give every parameter still on meta (embeddings, norms, lm_head) a real value, and rebuild
    the RoPE buffers (computed in __init__, so meta after a meta build)."""
    with torch.no_grad():
        for name, mod in model.named_modules():
            if not any(p.is_meta for p in mod.parameters(recurse=False)):
                continue
            mod.to_empty(device=device, recurse=False)
            for p in mod.parameters(recurse=False):
                if isinstance(mod, (nn.Embedding, nn.Linear)):
                    p.data = p.data.to(dtype).normal_(0.0, INIT_STD, generator=_generator(p.device, seed + zlib.crc32(name.encode())))
                else:  # RMSNorm weights
                    p.data = torch.ones_like(p.data, dtype=dtype)
        inner = model.model
        with torch.device(device):
            inner.rotary_emb = type(inner.rotary_emb)(config=config)
    leftover = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if leftover:
        raise RuntimeError(f"benchmark model still has meta tensors: {leftover[:5]}")


def _skeleton(shape: ShapeSpec, *, attn_implementation: str, dtype, max_position_embeddings: int):
    from transformers import LlamaForCausalLM

    config = shape.llama_config(max_position_embeddings=max_position_embeddings)
    with torch.device("meta"):
        model = LlamaForCausalLM._from_config(config, attn_implementation=attn_implementation, dtype=dtype)
    return model, model.config


def _quantize_layers_(model, shape: ShapeSpec, make: Callable, *, device, dtype, seed: int, progress: bool) -> None:
    from tqdm.auto import tqdm

    names = list(shape.linear_shapes())
    layers = model.model.layers
    for li in tqdm(range(len(layers)), desc="quantizing layers", disable=not progress, leave=False):
        for pi, name in enumerate(names):
            parent = layers[li].self_attn if name.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else layers[li].mlp
            old = getattr(parent, name)
            w = _random_weight(old.out_features, old.in_features, device=device, dtype=dtype, seed=_layer_seed(seed, li, pi))
            setattr(parent, name, make(old, w))
            del w


def build_qtulu_model(
    shape: ShapeSpec,
    *,
    device,
    dtype=torch.bfloat16,
    nf4_backend: str = "auto",
    attn_implementation: str = "qtulu_varlen",
    seed: int = 0,
    max_position_embeddings: int = 2048,
    progress: bool = True,
):
    """A ``LlamaForCausalLM`` of ``shape`` with qtulu NF4 linears (random weights) on ``device``."""
    from qtulu.model.quant import Linear4bit

    if attn_implementation == "qtulu_varlen":
        from qtulu.model.attention import register_attention

        attn_implementation = register_attention()
    device = torch.device(device)
    model, config = _skeleton(
        shape, attn_implementation=attn_implementation, dtype=dtype, max_position_embeddings=max_position_embeddings
    )

    def make(old: nn.Linear, w: torch.Tensor) -> nn.Module:
        lin = nn.Linear(old.in_features, old.out_features, bias=False, device="meta", dtype=dtype)
        lin.weight = nn.Parameter(w, requires_grad=False)
        return Linear4bit.from_linear(lin, blocksize=64, double_quant=True, compute_dtype=dtype, backend=nf4_backend)

    _quantize_layers_(model, shape, make, device=device, dtype=dtype, seed=seed, progress=progress)
    _materialize_rest_(model, config, device=device, dtype=dtype, seed=seed)
    return model


def build_bnb_model(
    shape: ShapeSpec,
    *,
    device,
    dtype=torch.bfloat16,
    seed: int = 0,
    max_position_embeddings: int = 2048,
    progress: bool = True,
):
    """The baseline: the same shape and weights quantized by bitsandbytes (NF4, double quant,
    compute in ``dtype``), built with transformers' bitsandbytes integration, SDPA attention."""
    import bitsandbytes as bnb
    from transformers import BitsAndBytesConfig
    from transformers.integrations.bitsandbytes import replace_with_bnb_linear

    device = torch.device(device)
    model, config = _skeleton(shape, attn_implementation="sdpa", dtype=dtype, max_position_embeddings=max_position_embeddings)
    qconfig = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=dtype,
    )
    model = replace_with_bnb_linear(model, modules_to_not_convert=["lm_head"], quantization_config=qconfig)

    def make(old, w: torch.Tensor) -> nn.Module:
        if not isinstance(old, bnb.nn.Linear4bit):
            raise TypeError(f"replace_with_bnb_linear left a {type(old).__name__}")
        # as transformers' Bnb4bitQuantize does: a Params4bit with the meta param's settings,
        # quantized by moving it to the device
        attrs = {k: v for k, v in old.weight.__dict__.items() if k != "data"}
        attrs["module"] = old
        old.weight = bnb.nn.Params4bit(w, requires_grad=False, **attrs).to(device)
        old._is_hf_initialized = True
        return old

    _quantize_layers_(model, shape, make, device=device, dtype=dtype, seed=seed, progress=progress)
    _materialize_rest_(model, config, device=device, dtype=dtype, seed=seed)
    model.is_loaded_in_4bit = True  # what transformers' bnb quantizer sets; TRL and peft read it
    return model


def attach_lora(model, *, r: int = 64, alpha: int = 16, dropout: float = 0.1, dtype=torch.bfloat16):
    """peft LoRA on every decoder linear, prepared for training as TRL's SFTTrainer does."""
    from peft import LoraConfig, get_peft_model

    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.23's name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:  # the GPU image's older transformers
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules="all-linear", task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, config)
    for p in peft_model.parameters():
        if p.requires_grad:
            p.data = p.data.to(dtype)
    peft_model.enable_input_require_grads()
    peft_model.train()
    return peft_model


OPTIMIZERS = ("adamw", "adamw_8bit")


def make_optimizer(params, name: str = "adamw", lr: float = 1e-4):
    """The same optimizer for every stack: torch AdamW, or bitsandbytes' 8-bit AdamW (its states
    take a quarter of the memory; the non-paged one, so torch's memory statistics count them)."""
    params = list(params)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    if name == "adamw_8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, lr=lr, weight_decay=0.0)
    raise ValueError(f"unknown optimizer {name!r}; choose from {', '.join(OPTIMIZERS)}")
