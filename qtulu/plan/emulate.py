"""Planning a CUDA step on a machine without CUDA: steer the device branches, add hidden workspaces.

The planner runs the step on fake *CPU* tensors (a CPU-only torch cannot build fake CUDA tensors
that autograd accepts) with CPU autocast in bf16 standing in for the trainer's CUDA autocast (the
ops of a LLaMA step that autocast touches, linear/matmul/mm/bmm/addmm/baddbmm/SDPA, are in the
lower-precision list of both devices; the CUDA-only fp32 ops, softmax/log_softmax/sum/pow/rsqrt,
only ever see fp32 inputs here: RMSNorm and both loss paths upcast first). Code that branches on
the device is steered to its CUDA branch while `cuda_semantics` is active:

* qtulu's kernels (`qtulu.kernels.nf4`, `qtulu.kernels.varlen_attention`) resolve ``"auto"`` to
  ``"triton"``: their custom ops' fake implementations run (no dequantized weight, no (T, T) scores).
* TRL's chunked log-prob head (the trainer's loss): ``_use_triton`` is True, as on CUDA; its Triton
  fold kernels work in place and allocate nothing, so their launch is a no-op here, and the fp32
  accumulation ``_addmm_fp32`` writes into its fp32 accumulator in place (``addmm(out_dtype=fp32)``
  on CUDA) instead of upcasting its operands as its CPU branch does.
* ``F.scaled_dot_product_attention`` without a mask (the transformers baseline) is the
  flash-attention kernel CUDA picks for bf16 causal attention (saves q, k, v, out and the fp32
  log-sum-exp; no (T, T) scores), through ``aten._scaled_dot_product_flash_attention`` and its
  meta kernels.
* ``F.dropout`` in training is CUDA's fused ``native_dropout`` (it saves a bool mask; the CPU's
  composite dropout saves a float noise tensor).
* torch's AdamW defaults to ``foreach`` on CUDA (`qtulu.plan.step.make_optimizer` asks for it).

Op-internal buffers a fake kernel cannot show are added by `workspace_table` (bytes computed from
the op's arguments, following the code of each kernel's launcher):

* ``qtulu::varlen_attention_bwd``: the FlashAttention-2 "delta" preprocess upcasts ``dO`` and ``O``
  to fp32 and multiplies them (kernels/varlen_attention.py, ``_triton_backward``).
* ``qtulu::nf4_matmul`` / ``nf4_matmul_dx``: an fp32 accumulator for M <= 16 rows (split-K); with
  the torch backend (CPU plans) the weight dequantized inside the op and its temporaries.
* ``bitsandbytes::gemm_4bit``: past M = 1536 rows bitsandbytes' CUDA backend dequantizes the whole
  weight to the activation dtype and calls ``F.linear`` (``_dequant_linear_fallback`` in
  bitsandbytes/backends/cuda/ops.py, 0.50), plus the fp32 absmax of a double-quantized weight.
"""

from __future__ import annotations

import contextlib
import importlib
from typing import Any, Callable, Iterator

import torch

# bitsandbytes' CUDA dispatch: the fused 4-bit GEMM up to this many rows, dequantize + F.linear past it
BNB_GEMM_4BIT_CUSTOM_MAX_M = 1536
NF4_SMALL_M = 16


def _varlen_bwd_ws(args, kwargs) -> int:
    do, q = args[0], args[1]
    n = do.numel()
    total, heads = q.shape[0], q.shape[1]
    up = 0 if do.dtype == torch.float32 else 2 * n * 4  # do.float(), out.float()
    contig = 0 if do.is_contiguous() else n * do.element_size()
    return contig + up + n * 4 + 2 * total * heads * 4  # the product, then delta and its transpose


def _nf4_torch_ws(n: int, dtype: torch.dtype) -> int:
    # qtulu.kernels.nf4_format.dequantize_nf4 inside the op: int32 codes (2 bytes per weight) and the
    # fp32 code values (4) while gathering, then those values and their fp32 product with the absmax
    # (4 + 4), plus the cast to a 16-bit dtype (2) before the values are freed
    return n * (8 if dtype == torch.float32 else 10)


def _nf4_ws(args, kwargs) -> int:
    # nf4_matmul(x (M, in), packed, ..., bias, out_features, in_features, bs, bs2, backend)
    m, n_out, k = args[0].shape[0], int(args[8]), int(args[9])
    if args[12] == "torch":
        return _nf4_torch_ws(n_out * k, args[0].dtype)
    return m * n_out * 4 if 0 < m <= NF4_SMALL_M else 0  # the Triton split-K fp32 output


def _nf4_dx_ws(args, kwargs) -> int:
    # nf4_matmul_dx(grad (M, out), packed, ..., out_features, in_features, bs, bs2, backend)
    m, n_out, k = args[0].shape[0], int(args[7]), int(args[8])
    if args[11] == "torch":
        return _nf4_torch_ws(n_out * k, args[0].dtype)
    return m * k * 4 if 0 < m <= NF4_SMALL_M else 0


def _bnb_gemm_ws(args, kwargs) -> int:
    a, shape_b, blocksize = args[0], args[2], args[4]
    k = a.shape[-1]
    m = a.numel() // max(1, k)
    if m <= BNB_GEMM_4BIT_CUSTOM_MAX_M and k % blocksize == 0:
        return 0  # bitsandbytes' fused kernel (the heuristic may still pick the fallback for some M)
    n = int(shape_b[0])
    nested = kwargs.get("absmax_8bit") if "absmax_8bit" in kwargs else (args[7] if len(args) > 7 else None)
    absmax = 2 * nested.numel() * 4 if nested is not None else 0
    return n * k * a.element_size() + absmax


def workspace_table(cuda: bool = True) -> dict[str, Callable[..., int]]:
    """Op-internal buffers by op name; the Triton and bitsandbytes CUDA entries only for CUDA plans."""
    table: dict[str, Callable[..., int]] = {"qtulu::nf4_matmul": _nf4_ws, "qtulu::nf4_matmul_dx": _nf4_dx_ws}
    if cuda:
        table["qtulu::varlen_attention_bwd"] = _varlen_bwd_ws
        table["bitsandbytes::gemm_4bit"] = _bnb_gemm_ws
    return table


class _NoLaunch:
    """Stands for a Triton kernel that works in place: ``kernel[grid](*args)`` does nothing."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def _flash_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False,
                _orig=None):
    if attn_mask is not None or query.shape[-1] > 256:
        return _orig(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
                     enable_gqa=enable_gqa)
    if key.shape[-3] != query.shape[-3]:
        rep = query.shape[-3] // key.shape[-3]
        key, value = key.repeat_interleave(rep, dim=-3), value.repeat_interleave(rep, dim=-3)
    out = torch.ops.aten._scaled_dot_product_flash_attention(
        query, key, value, dropout_p, is_causal, False, scale=scale
    )[0]
    return out


@contextlib.contextmanager
def _patched(obj: Any, name: str, value: Any) -> Iterator[None]:
    missing = object()
    old = getattr(obj, name, missing)
    if old is missing:
        yield
        return
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


@contextlib.contextmanager
def cuda_semantics() -> Iterator[None]:
    """Steer device branches to their CUDA behaviour (see the module docstring)."""
    from qtulu.kernels import nf4 as nf4_mod
    from qtulu.kernels import varlen_attention as va_mod

    def triton_backend(backend, *tensors):
        from qtulu.kernels.backend import BACKENDS

        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        return "torch" if backend == "torch" else "triton"

    import torch.nn.functional as F

    orig_sdpa = F.scaled_dot_product_attention

    def sdpa(*args, **kwargs):
        return _flash_sdpa(*args, _orig=orig_sdpa, **kwargs)

    orig_dropout = F.dropout

    def dropout(input, p=0.5, training=True, inplace=False):
        # CUDA takes the fused kernel (at::native_dropout): it saves a bool mask; the CPU's
        # composite dropout saves a float noise tensor instead
        if training and 0 < p < 1 and input.numel() > 0 and not inplace:
            return torch.ops.aten.native_dropout(input, p, True)[0]
        return orig_dropout(input, p, training, inplace)

    with contextlib.ExitStack() as stack:
        stack.enter_context(_patched(F, "dropout", dropout))
        stack.enter_context(_patched(nf4_mod, "resolve_backend", triton_backend))
        stack.enter_context(_patched(va_mod, "resolve_backend", triton_backend))
        stack.enter_context(_patched(F, "scaled_dot_product_attention", sdpa))
        try:
            cl = importlib.import_module("trl.kernels.chunked_logprob")
            tu = importlib.import_module("trl.trainer.utils")
        except ImportError:  # pragma: no cover - trl is a dependency
            cl = tu = None
        if cl is not None:
            yes = lambda device: True  # noqa: E731
            stack.enter_context(_patched(cl, "_use_triton", yes))
            stack.enter_context(_patched(tu, "_use_triton", yes))
            stack.enter_context(_patched(cl, "_forward_kernel", _NoLaunch()))
            stack.enter_context(_patched(cl, "_backward_kernel", _NoLaunch()))
            stack.enter_context(_patched(cl, "_addmm_fp32", lambda acc, a, b: None))
        yield


@contextlib.contextmanager
def offload_to_host(tracker) -> Iterator[None]:
    """`qtulu.train.offload` on the planner's fake CPU tensors: they stand for CUDA tensors, and the
    buffers it allocates for them are host memory (not counted on the device)."""
    import qtulu.train.offload as offload

    orig = offload._host_buffer

    def host_buffer(t):
        tracker.host_depth += 1
        try:
            return orig(t)
        finally:
            tracker.host_depth -= 1

    orig_back = offload.OffloadHooks._to_device

    def to_device(self, h, stream=None):
        out = orig_back(self, h, stream)
        tracker.track(out, role="activations")  # a checkpointed input, back for its recomputation
        return out

    with (_patched(offload, "offload_device_type", "cpu"), _patched(offload, "_host_buffer", host_buffer),
          _patched(offload.OffloadHooks, "_to_device", to_device)):
        yield
