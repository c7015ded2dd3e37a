"""LoRA dropout that keeps no dropped copy of the input: the mask is regenerated in backward.

peft computes a LoRA branch as ``lora_B(lora_A(dropout(x.to(A.dtype)))) * scaling``. For the
weight gradient of ``lora_A`` autograd keeps the *dropped* input (and, on CPU, dropout keeps its
scaled mask; on CUDA a bool mask), one copy per adapted module: q, k and v each keep their own
copy of the same normed hidden states, gate and up another two. Under CUDA autocast the fp32
LoRA weights also make peft upcast ``x`` to fp32 first, then autocast casts it back to bf16 for
the matmul: that bf16 copy is what gets saved, again one per module.

`DropoutLoraA` replaces ``lora_A`` + ``lora_dropout`` of a vanilla peft LoRA layer by one autograd
function that saves only ``x`` itself (which the q/k/v and gate/up branches share), the LoRA weight
(fp32, the master copy: cast to the compute dtype per use, nothing cached) and the random-number
generator's state before the mask was drawn. Backward restores that state and draws the mask
again. The maths is peft's, op for op: the mask is ``bernoulli_(1 - p)`` on a tensor of the dtype
dropout would see, divided by ``1 - p`` (torch's ``dropout`` on CPU), the matmuls run in the
autocast dtype when autocast is on and in the LoRA weight's dtype otherwise (peft's cast). On the
CPU the random stream is consumed exactly as ``nn.Dropout`` consumes it, so a training step gives
the same bits as peft's (``tests/train/test_lora_dropout.py``); CUDA's fused dropout kernel draws its
mask from the Philox stream differently, so there the masks are other draws of the same
distribution (same maths in expectation).

Checkpoint recomputation replays the forward with the RNG state restored (``preserve_rng_state``),
so the recomputed mask, and the one regenerated from it in backward, are the forward's.

The same switch swaps ``lora_B`` for `CastPerUseLoraB`: under autocast an fp32 ``lora_B`` weight
is cast to bf16 by autocast's *cached* cast, which keeps one bf16 copy of every ``lora_B`` alive
from its first use to the end of the forward (0.87 GB at LLaMA-65B, r 64, all linears); the
module casts it itself, per use (the same bits), so the copy lives only while the matmul needs it.

Switch: recipe ``lora.dropout_impl: recompute`` (default ``peft``). Adapter files are unchanged
(the weights keep their names ``lora_A.<adapter>.weight``, ``lora_B.<adapter>.weight``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["CastPerUseLoraB", "DropoutLoraA", "use_recompute_dropout", "dropout_lora_a"]


def _rng_state(device: torch.device) -> torch.Tensor:
    if device.type == "cuda":
        return torch.cuda.get_rng_state(device)
    return torch.get_rng_state()


def _draw(shape, dtype: torch.dtype, device: torch.device, p: float, torch_noise: bool) -> torch.Tensor:
    """The mask. ``torch_noise``: torch's CPU dropout noise ``empty.bernoulli_(1 - p).div_(1 - p)``
    (the very draws ``nn.Dropout`` makes on the CPU); otherwise a 0/1 keep mask in ``dtype``."""
    noise = torch.empty(shape, dtype=dtype, device=device)
    noise.bernoulli_(1 - p)
    return noise.div_(1 - p) if torch_noise else noise


class _DropoutLinearA(torch.autograd.Function):
    """``dropout(x) @ A.T`` saving x, A and the RNG state (not the dropped x, not the mask)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, p: float, cdtype: torch.dtype, noise_dtype):
        # noise_dtype: None (autocast path: 0/1 mask in cdtype, then * 1/(1-p), as CUDA's fused dropout)
        # or the dtype of torch's CPU dropout noise (draw for draw nn.Dropout's)
        ctx.p, ctx.cdtype, ctx.noise_dtype = p, cdtype, noise_dtype
        ctx.x_dtype, ctx.w_dtype = x.dtype, weight.dtype
        state = None
        if p > 0:
            state = _rng_state(x.device)
            if noise_dtype is not None:
                xd = x.to(noise_dtype) * _draw(x.shape, noise_dtype, x.device, p, True)
            else:
                xd = _draw(x.shape, cdtype, x.device, p, False)
                xd.mul_(x.to(cdtype)).mul_(1.0 / (1 - p))  # zero where dropped, x * scale rounded once
        else:
            xd = x
        y = F.linear(xd.to(cdtype), weight.to(cdtype))
        ctx.save_for_backward(x, weight, state)
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight, state = ctx.saved_tensors
        p, cdtype, noise_dtype = ctx.p, ctx.cdtype, ctx.noise_dtype
        mask = None
        if p > 0:
            cuda = x.device.type == "cuda"
            with torch.random.fork_rng(devices=[x.device] if cuda else []):
                if cuda:
                    torch.cuda.set_rng_state(state, x.device)
                else:
                    torch.set_rng_state(state)
                mask = _draw(x.shape, noise_dtype or cdtype, x.device, p, noise_dtype is not None)
        grad = grad.to(cdtype)
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            gx = grad @ weight.to(cdtype)  # (..., in)
            if mask is not None:
                gx = gx.to(noise_dtype) * mask if noise_dtype is not None else gx.mul_(mask).mul_(1.0 / (1 - p))
            grad_x = gx.to(ctx.x_dtype)
            del gx
        if ctx.needs_input_grad[1]:
            if mask is None:
                xd = x.to(cdtype)
            elif noise_dtype is not None:
                xd = (x.to(noise_dtype) * mask).to(cdtype)
            else:
                xd = mask.mul_(x.to(cdtype)).mul_(1.0 / (1 - p))  # the mask's memory becomes the dropped x
            grad_w = (grad.reshape(-1, grad.shape[-1]).t() @ xd.reshape(-1, x.shape[-1])).to(ctx.w_dtype)  # (r, in)
        return grad_x, grad_w, None, None, None


def dropout_lora_a(x: torch.Tensor, weight: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """peft's ``lora_A(dropout(x.to(A.dtype)))``, without saving the dropped input.

    Under autocast (GPU training in bf16) the matmul runs in the autocast dtype and the mask is a 0/1
    mask in that dtype, multiplied in place by ``x`` and ``1 / (1 - p)`` (one rounding of
    ``x * scale``, as CUDA's fused fp32 dropout followed by autocast's cast); otherwise the dropout is torch's CPU dropout in the LoRA weight's dtype, draw for
    draw, and the matmul runs in that dtype (peft's cast of ``x``).
    """
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        cdtype, noise_dtype = torch.get_autocast_dtype(device_type), None
    else:
        cdtype = noise_dtype = weight.dtype
    return _DropoutLinearA.apply(x, weight, float(p) if training else 0.0, cdtype, noise_dtype)


class DropoutLoraA(nn.Linear):
    """peft's ``lora_A`` (same weight Parameter) with the dropout folded in; see the module docstring."""

    def __init__(self, lora_a: nn.Linear, p: float) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = lora_a.in_features, lora_a.out_features
        self.weight = lora_a.weight
        self.register_parameter("bias", None)
        self.p = float(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout_lora_a(x, self.weight, self.p, self.training)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, dropout={self.p} (mask regenerated in backward)"


class CastPerUseLoraB(nn.Linear):
    """peft's ``lora_B`` (same Parameters) cast to the autocast dtype per use, outside autocast's cache."""

    def __init__(self, lora_b: nn.Linear) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = lora_b.in_features, lora_b.out_features
        self.weight = lora_b.weight
        if lora_b.bias is None:
            self.register_parameter("bias", None)
        else:
            self.bias = lora_b.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        device_type = x.device.type
        if torch.is_autocast_enabled(device_type) and self.weight.dtype == torch.float32:
            c = torch.get_autocast_dtype(device_type)
            # an explicit .to() is not cached by autocast; F.linear then sees no fp32 operand to cast
            bias = None if self.bias is None else self.bias.to(c)
            return F.linear(x.to(c), self.weight.to(c), bias)
        return F.linear(x, self.weight, self.bias)


def use_recompute_dropout(model: nn.Module) -> int:
    """Swap every vanilla peft LoRA linear of ``model`` to `DropoutLoraA` (and its ``lora_B`` to
    `CastPerUseLoraB`); returns how many ``lora_A`` were swapped.

    Layers with a LoRA variant (DoRA...) or a bias on ``lora_A`` keep peft's path. Idempotent.
    """
    from peft.tuners.lora.layer import Linear as LoraLinear

    n = 0
    for module in model.modules():
        if not isinstance(module, LoraLinear):
            continue
        swapped = False
        for name, lora_a in list(module.lora_A.items()):
            if name in getattr(module, "lora_variant", {}) or lora_a.bias is not None:
                continue
            if isinstance(lora_a, DropoutLoraA):
                continue
            if type(lora_a) is not nn.Linear:
                continue
            drop = module.lora_dropout[name]
            p = float(drop.p) if isinstance(drop, nn.Dropout) else 0.0
            module.lora_A[name] = DropoutLoraA(lora_a, p)
            module.lora_dropout[name] = nn.Identity()
            lora_b = module.lora_B[name]
            if type(lora_b) is nn.Linear:
                module.lora_B[name] = CastPerUseLoraB(lora_b)
            swapped = True
            n += 1
        if swapped:
            # peft would upcast x to the (fp32) LoRA weight's dtype before lora_A: the function does
            # the cast itself, per use, so x is kept once, in its own dtype
            module.cast_input_dtype_enabled = False
    return n
