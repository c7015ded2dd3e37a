"""Packed-sequence (varlen) causal attention: the API, a plain-torch reference, autograd.

Several examples are packed back to back into one token axis; ``cu_seqlens`` (int32, shape
``(num_seqs + 1,)``, ``cu_seqlens[0] == 0``, ``cu_seqlens[-1] == total_tokens``) marks where each
starts, so no token attends across an example's boundary and no (T, T) mask is ever built.

Layout (flash-attention's varlen API)::

    q    (total_tokens, heads,    head_dim)
    k, v (total_tokens, kv_heads, head_dim)     heads % kv_heads == 0 (grouped-query attention)
    out  (total_tokens, heads,    head_dim)

Example: three examples of 3, 1 and 2 tokens packed into 6 tokens have
``cu_seqlens = tensor([0, 3, 4, 6], dtype=torch.int32)`` and ``max_seqlen = 3``.

Per-model variants (both in the Triton kernels and in the reference):

* ``window`` (sliding-window attention: Mistral, Qwen2, Gemma-2, Phi-3): query ``i`` attends to
  key ``j`` of its example iff ``0 <= i - j < window`` (transformers' ``sliding_window``:
  ``kv_idx > q_idx - sliding_window``); causal only.
* ``softcap`` (Gemma-2's ``attn_logit_softcapping``): each score ``s = scale * q.k`` becomes
  ``softcap * tanh(s / softcap)`` before the mask and the softmax.

Backends (see :func:`qtulu.kernels.backend.resolve_backend`): ``"triton"`` runs the kernels of
:mod:`qtulu.kernels.varlen_attention_triton` (CPU tensors need ``TRITON_INTERPRET=1``),
``"torch"`` runs the reference (one ``scaled_dot_product_attention`` per example, or the explicit
softmax when there is a softcap), ``"auto"`` picks Triton on CUDA. The kernels are registered as
``torch.library.custom_op`` with fake implementations, so ``torch.compile`` can trace them.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from qtulu.kernels.backend import resolve_backend
from qtulu.kernels.varlen_attention_triton import triton_backward, triton_forward

__all__ = ["varlen_attention", "varlen_attention_torch", "TRITON_DTYPES"]

TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# --------------------------------------------------------------------------------------------
# plain-torch reference
# --------------------------------------------------------------------------------------------


def _example_attention(qi, ki, vi, causal, scale, window, softcap):
    """One example: qi (1, H, L, D), ki/vi (1, H, L, D) -> (1, H, L, D)."""
    length = qi.shape[2]
    keep = None
    if window:
        i = torch.arange(length, device=qi.device)
        keep = (i[:, None] - i[None, :] < window) & (i[:, None] >= i[None, :])  # (L, L)
    if not softcap:
        return F.scaled_dot_product_attention(qi, ki, vi, attn_mask=keep, is_causal=causal and keep is None,
                                              scale=scale)
    # softcap: SDPA has no hook for it, so the softmax is spelled out (in fp32 for half inputs,
    # as SDPA accumulates on the CPU)
    work = torch.float32 if qi.dtype in (torch.float16, torch.bfloat16) else qi.dtype
    s = (qi.to(work) @ ki.to(work).transpose(-1, -2)) * scale  # (1, H, L, L)
    s = torch.tanh(s / softcap) * softcap
    if keep is None and causal:
        keep = torch.ones(length, length, dtype=torch.bool, device=qi.device).tril()
    if keep is not None:
        s = s.masked_fill(~keep, float("-inf"))
    return (s.softmax(-1) @ vi.to(work)).to(qi.dtype)


def varlen_attention_torch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    causal: bool = True,
    softmax_scale: float | None = None,
    window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Reference: attention of each packed example on its own (differentiable)."""
    total, heads, head_dim = q.shape
    group = heads // k.shape[1]
    if softmax_scale is None:
        softmax_scale = 1.0 / math.sqrt(head_dim)
    bounds = [int(b) for b in cu_seqlens.tolist()]
    if bounds[-1] != total:
        raise ValueError(f"cu_seqlens[-1] = {bounds[-1]} but q has {total} tokens")
    outs = []
    for start, end in zip(bounds[:-1], bounds[1:]):
        if end == start:
            continue
        qi = q[start:end].transpose(0, 1).unsqueeze(0)  # (1, H, L, D)
        ki = k[start:end].transpose(0, 1).unsqueeze(0)  # (1, Hkv, L, D)
        vi = v[start:end].transpose(0, 1).unsqueeze(0)  # (1, Hkv, L, D)
        if group > 1:
            ki = ki.repeat_interleave(group, dim=1)  # (1, H, L, D)
            vi = vi.repeat_interleave(group, dim=1)  # (1, H, L, D)
        oi = _example_attention(qi, ki, vi, causal, softmax_scale, window, softcap)
        outs.append(oi.squeeze(0).transpose(0, 1))  # (L, H, D)
    if not outs:
        return q.new_zeros(total, heads, v.shape[-1])
    return torch.cat(outs, dim=0)  # (total, H, D)


# --------------------------------------------------------------------------------------------
# custom ops (so torch.compile traces through the kernels) + autograd
# --------------------------------------------------------------------------------------------


@torch.library.custom_op("qtulu::varlen_attention_fwd", mutates_args=())
def _varlen_fwd_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    causal: bool,
    softmax_scale: float,
    window: int,
    softcap: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    return triton_forward(q, k, v, cu_seqlens, max_seqlen, causal, softmax_scale, window, softcap)


@_varlen_fwd_op.register_fake
def _(q, k, v, cu_seqlens, max_seqlen, causal, softmax_scale, window, softcap):
    return torch.empty_like(q), q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)


@torch.library.custom_op("qtulu::varlen_attention_bwd", mutates_args=())
def _varlen_bwd_op(
    do: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    causal: bool,
    softmax_scale: float,
    window: int,
    softcap: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return triton_backward(do, q, k, v, out, lse, cu_seqlens, max_seqlen, causal, softmax_scale, window, softcap)


@_varlen_bwd_op.register_fake
def _(do, q, k, v, out, lse, cu_seqlens, max_seqlen, causal, softmax_scale, window, softcap):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, cu_seqlens, max_seqlen, causal, softmax_scale, window, softcap = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_seqlens)
    ctx.args = (max_seqlen, causal, softmax_scale, window, softcap)


def _backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse, cu_seqlens = ctx.saved_tensors
    dq, dk, dv = _varlen_bwd_op(grad_out, q, k, v, out, lse, cu_seqlens, *ctx.args)
    return dq, dk, dv, None, None, None, None, None, None


_varlen_fwd_op.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------------------------
# public entry point
# --------------------------------------------------------------------------------------------


def _check_inputs(q, k, v, cu_seqlens, causal, window, softcap):
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        raise ValueError(
            "varlen_attention expects q (total, heads, head_dim) and k, v (total, kv_heads, "
            f"head_dim); got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if k.shape != v.shape or k.shape[0] != q.shape[0] or k.shape[2] != q.shape[2]:
        raise ValueError(
            f"k and v must be (total={q.shape[0]}, kv_heads, head_dim={q.shape[2]}) and alike; "
            f"got k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if q.shape[1] % k.shape[1] != 0:
        raise ValueError(f"heads ({q.shape[1]}) must be a multiple of kv_heads ({k.shape[1]})")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
        raise ValueError(f"cu_seqlens must be 1-D of shape (num_seqs + 1,), got {tuple(cu_seqlens.shape)}")
    if cu_seqlens.dtype.is_floating_point or cu_seqlens.dtype == torch.bool:
        raise ValueError(f"cu_seqlens must be an integer tensor (int32), got {cu_seqlens.dtype}")
    if cu_seqlens.device != q.device:
        raise ValueError(f"cu_seqlens is on {cu_seqlens.device} but q is on {q.device}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share a dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    if window is not None:
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ValueError(f"window must be a positive int (keys visible, the query's own included), got {window!r}")
        if not causal:
            raise ValueError("window (sliding-window attention) is only defined for causal attention")
    if softcap is not None and not (isinstance(softcap, (int, float)) and math.isfinite(softcap) and softcap > 0):
        raise ValueError(f"softcap must be a positive finite number, got {softcap!r}")


def triton_supports(q: torch.Tensor) -> bool:
    """Whether the Triton kernels handle this dtype and head dim (16..256)."""
    return q.dtype in TRITON_DTYPES and 16 <= q.shape[-1] <= 256


def varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int | None,
    causal: bool = True,
    softmax_scale: float | None = None,
    backend: str = "auto",
    *,
    window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Attention over packed examples; differentiable in q, k and v.

    Args:
        q: ``(total_tokens, heads, head_dim)``.
        k, v: ``(total_tokens, kv_heads, head_dim)``; ``heads`` a multiple of ``kv_heads``.
        cu_seqlens: int32 ``(num_seqs + 1,)``, starts of the examples, ``[0, ..., total_tokens]``.
        max_seqlen: longest example, at least (``None``: computed from ``cu_seqlens``, a device
            sync); the Triton grid is sized by it, so a smaller value leaves rows uncomputed.
        causal: causal attention within each example.
        softmax_scale: defaults to ``1 / sqrt(head_dim)``.
        backend: ``"auto"`` | ``"triton"`` | ``"torch"``.
        window: sliding window (keys visible to a query, its own included); None = unlimited.
        softcap: logit soft-capping ``softcap * tanh(score / softcap)``; None = off.

    Returns:
        ``(total_tokens, heads, head_dim)`` in q's dtype.
    """
    _check_inputs(q, k, v, cu_seqlens, causal, window, softcap)
    if softmax_scale is None:
        softmax_scale = 1.0 / math.sqrt(q.shape[-1])
    chosen = resolve_backend(backend, q, k, v)
    if chosen == "triton" and not triton_supports(q):
        if backend == "triton":
            raise ValueError(
                f"the Triton varlen kernel supports dtypes {TRITON_DTYPES} and head_dim 16..256; "
                f"got {q.dtype}, head_dim {q.shape[-1]} (use backend='torch')"
            )
        chosen = "torch"
    if chosen == "torch":
        return varlen_attention_torch(q, k, v, cu_seqlens, causal, softmax_scale, window, softcap)
    if cu_seqlens.dtype != torch.int32:
        cu_seqlens = cu_seqlens.to(torch.int32)
    if max_seqlen is None:
        max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max()) if cu_seqlens.numel() > 1 else 0
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    out, _ = _varlen_fwd_op(q, k, v, cu_seqlens.contiguous(), int(max_seqlen), bool(causal),
                            float(softmax_scale), int(window or 0), float(softcap or 0.0))
    return out
