"""NF4 matmul that dequantizes inside the GEMM (Triton), with its torch reference.

One kernel, four places: this module holds the Triton kernel (``_nf4_gemm_kernel``), its
launcher, the autograd registration (``torch.library.custom_op`` + ``register_autograd``) and the
plain-torch reference (``nf4_matmul_reference``: dequantize + ``F.linear``). The format itself
(bitsandbytes' NF4 layout, ``NF4State``, ``quantize_nf4``, ``dequantize_nf4``) lives in
:mod:`qtulu.kernels.nf4_format` and is re-exported here.

Shapes: ``x (..., K)`` with ``K = in_features``; ``W (N, K)`` with ``N = out_features``;
``nf4_matmul(x) = x @ W.T + bias`` of shape ``(..., N)``.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from qtulu.kernels.backend import resolve_backend
from qtulu.kernels.nf4_format import (  # noqa: F401  (re-exported: the public NF4 API)
    NESTED_BLOCKSIZE,
    NF4_CODE,
    VALID_BLOCKSIZES,
    NF4State,
    bnb_codes_and_state,
    dequantize_absmax,
    dequantize_nf4,
    dynamic_map,
    nf4_code,
    quantize_nf4,
)

__all__ = [
    "NF4_CODE",
    "NF4State",
    "bnb_codes_and_state",
    "quantize_nf4",
    "dequantize_nf4",
    "dequantize_absmax",
    "nf4_matmul",
    "nf4_matmul_reference",
    "dynamic_map",
]


# ------------------------------------------------------------------------------------------
# The matmul: torch reference, Triton kernels, custom op + autograd
# ------------------------------------------------------------------------------------------


def nf4_matmul_reference(
    x: torch.Tensor, packed: torch.Tensor, state: NF4State, bias: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """Plain torch: dequantize W to x's dtype, then ``F.linear`` (what bitsandbytes/Unsloth do)."""
    w = dequantize_nf4(packed, state, dtype=x.dtype)  # (N, K)
    return F.linear(x, w, None if bias is None else bias.to(x.dtype))


def _state_args(state: NF4State):
    dev = state.absmax.device
    empty = torch.empty(0, device=dev)
    if state.nested:
        return (state.absmax, state.code, state.offset.reshape(1).float(), state.absmax2, state.code2)
    return (state.absmax, state.code, empty, empty, empty)


def _rebuild_state(absmax, code, offset, absmax2, code2, n: int, k: int, blocksize: int, blocksize2: int):
    nested = absmax.dtype == torch.uint8
    return NF4State(
        absmax=absmax,
        shape=(n, k),
        dtype=torch.float32,
        blocksize=blocksize,
        code=code,
        offset=offset.reshape(()) if nested else None,
        absmax2=absmax2 if nested else None,
        code2=code2 if nested else None,
        blocksize2=blocksize2,
    )


@torch.library.custom_op("qtulu::nf4_matmul", mutates_args=())
def _nf4_matmul_op(
    x: torch.Tensor,
    packed: torch.Tensor,
    absmax: torch.Tensor,
    code: torch.Tensor,
    offset: torch.Tensor,
    absmax2: torch.Tensor,
    code2: torch.Tensor,
    bias: Optional[torch.Tensor],
    out_features: int,
    in_features: int,
    blocksize: int,
    blocksize2: int,
    backend: str,
) -> torch.Tensor:
    # x is 2-D (M, K) here: returning a reshaped (view) output from inside the op would forbid
    # in-place updates of it later (peft's mixed-batch forward adds into the base output)
    if backend == "triton":
        y = _triton_nf4_gemm(
            x, packed, absmax, code, offset, absmax2, code2, bias,
            n_out=out_features, k_in=in_features, blocksize=blocksize, blocksize2=blocksize2,
            transpose_w=True,
        )
    else:
        st = _rebuild_state(absmax, code, offset, absmax2, code2, out_features, in_features, blocksize, blocksize2)
        y = nf4_matmul_reference(x, packed, st, bias)
    return y


@_nf4_matmul_op.register_fake
def _(x, packed, absmax, code, offset, absmax2, code2, bias, out_features, in_features, blocksize, blocksize2, backend):
    return x.new_empty((x.shape[0], out_features))


@torch.library.custom_op("qtulu::nf4_matmul_dx", mutates_args=())
def _nf4_matmul_dx_op(
    grad: torch.Tensor,
    packed: torch.Tensor,
    absmax: torch.Tensor,
    code: torch.Tensor,
    offset: torch.Tensor,
    absmax2: torch.Tensor,
    code2: torch.Tensor,
    out_features: int,
    in_features: int,
    blocksize: int,
    blocksize2: int,
    backend: str,
) -> torch.Tensor:
    """dX = dY @ dequant(W): ``grad (M, N) -> (M, K)``."""
    if backend == "triton":
        dx = _triton_nf4_gemm(
            grad, packed, absmax, code, offset, absmax2, code2, None,
            n_out=out_features, k_in=in_features, blocksize=blocksize, blocksize2=blocksize2,
            transpose_w=False,
        )
    else:
        st = _rebuild_state(absmax, code, offset, absmax2, code2, out_features, in_features, blocksize, blocksize2)
        dx = grad @ dequantize_nf4(packed, st, dtype=grad.dtype)  # (M, K)
    return dx


@_nf4_matmul_dx_op.register_fake
def _(grad, packed, absmax, code, offset, absmax2, code2, out_features, in_features, blocksize, blocksize2, backend):
    return grad.new_empty((grad.shape[0], in_features))


def _setup_context(ctx, inputs, output):
    x, packed, absmax, code, offset, absmax2, code2, bias, n, k, bs, bs2, backend = inputs
    ctx.save_for_backward(packed, absmax, code, offset, absmax2, code2)
    ctx.meta = (n, k, bs, bs2, backend, bias is not None, None if bias is None else bias.dtype)


def _backward(ctx, grad):
    packed, absmax, code, offset, absmax2, code2 = ctx.saved_tensors
    n, k, bs, bs2, backend, has_bias, bias_dtype = ctx.meta
    dx = None
    if ctx.needs_input_grad[0]:
        dx = _nf4_matmul_dx_op(grad, packed, absmax, code, offset, absmax2, code2, n, k, bs, bs2, backend)
    dbias = None
    if has_bias and ctx.needs_input_grad[7]:
        dbias = grad.sum(0).to(bias_dtype)
    return dx, None, None, None, None, None, None, dbias, None, None, None, None, None


_nf4_matmul_op.register_autograd(_backward, setup_context=_setup_context)


def nf4_matmul(
    x: torch.Tensor,
    packed: torch.Tensor,
    state: NF4State,
    bias: Optional[torch.Tensor] = None,
    backend: str = "auto",
) -> torch.Tensor:
    """``x @ dequant(W).T (+ bias)`` for ``x (..., K)`` -> ``(..., N)`` in x's dtype.

    Differentiable in ``x`` (dX = dY @ dequant(W), fused in the Triton path too) and ``bias``.
    ``backend``: "triton" (dequantizes tiles inside the GEMM; CPU tensors need TRITON_INTERPRET=1),
    "torch" (dequantize then ``F.linear``), "auto" (Triton on CUDA, torch elsewhere).
    """
    if not isinstance(state, NF4State):
        state = NF4State.from_bnb(state)
    if len(state.shape) != 2:
        raise ValueError(f"nf4_matmul: the weight must be 2-D (out, in), got shape {tuple(state.shape)}")
    n, k = state.shape
    if x.shape[-1] != k:
        raise ValueError(f"nf4_matmul: x has {x.shape[-1]} features, the weight expects {k}")
    if x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"nf4_matmul: x must be bf16/fp16/fp32, got {x.dtype}")
    if bias is not None and bias.shape != (n,):
        raise ValueError(f"nf4_matmul: bias must have shape ({n},), got {tuple(bias.shape)}")
    resolved = resolve_backend(backend, x, packed)
    y = _nf4_matmul_op(
        x.reshape(-1, k), packed.reshape(-1, 1), *_state_args(state), bias, n, k,
        state.blocksize, state.blocksize2, resolved,
    )  # (M, N)
    return y.reshape(*x.shape[:-1], n)


# ------------------------------------------------------------------------------------------
# Triton: one GEMM kernel C = A @ op(dequant(W)) used for the forward (op = transpose) and for
# dX (op = identity). Built lazily so that importing this module needs no triton.
# ------------------------------------------------------------------------------------------

SMALL_M = 16  # rows up to this use the memory-bound path (one pass over the codes, split-K)


def _interpreting() -> bool:
    from qtulu.kernels.backend import triton_interpreting

    return triton_interpreting()


def _m_bucket(m: int) -> int:
    # autotune key: the next power of two, capped, so each M range keeps its own best config
    return min(1 << max(m - 1, 0).bit_length(), 8192)


try:  # optional: the torch path needs no triton
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton is installed on Linux
    triton = None
    tl = None

_KERNELS: dict = {}

if triton is not None:

    @triton.jit
    def _round_bf16(x):
        # fp32 -> fp32 holding the round-to-nearest-even bf16 value. Only used under
        # TRITON_INTERPRET, whose fp32->bf16 cast truncates (GPUs round to nearest even).
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        return bits.to(tl.float32, bitcast=True)

    @triton.jit
    def _grouped_tile(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
        # the (row tile, column tile) of this program in grouped order: GROUP_M row tiles in a row
        # share W tiles in L2
        pid = tl.program_id(0)
        num_m = tl.cdiv(M, BLOCK_M)
        num_n = tl.cdiv(N, BLOCK_N)
        group = GROUP_M * num_n
        first_m = (pid // group) * GROUP_M
        gm = tl.minimum(num_m - first_m, GROUP_M)
        return first_m + ((pid % group) % gm), (pid % group) // gm

    @triton.jit
    def _load_code(code_ptr):
        # the 16 code values as scalars, loaded once per program and kept in registers
        return (tl.load(code_ptr + 0), tl.load(code_ptr + 1), tl.load(code_ptr + 2), tl.load(code_ptr + 3),
                tl.load(code_ptr + 4), tl.load(code_ptr + 5), tl.load(code_ptr + 6), tl.load(code_ptr + 7),
                tl.load(code_ptr + 8), tl.load(code_ptr + 9), tl.load(code_ptr + 10), tl.load(code_ptr + 11),
                tl.load(code_ptr + 12), tl.load(code_ptr + 13), tl.load(code_ptr + 14), tl.load(code_ptr + 15))

    @triton.jit
    def _select_code(nib, c0, c1, c2, c3, c4, c5, c6, c7, c8, c9, c10, c11, c12, c13, c14, c15):
        # code[nib] by a binary select tree on the nibble's bits (what bnb's CUDA dequantizer does):
        # ALU work instead of a dependent gather, which the software pipeliner stages through
        # shared memory (sm_90: 130 vs 66 KiB at 128x128x64). Which is faster is a measurement:
        # the autotune lists carry configs of both kinds.
        b0 = (nib & 1) != 0
        b1 = (nib & 2) != 0
        b2 = (nib & 4) != 0
        v03 = tl.where(b1, tl.where(b0, c3, c2), tl.where(b0, c1, c0))
        v47 = tl.where(b1, tl.where(b0, c7, c6), tl.where(b0, c5, c4))
        v8b = tl.where(b1, tl.where(b0, c11, c10), tl.where(b0, c9, c8))
        vcf = tl.where(b1, tl.where(b0, c15, c14), tl.where(b0, c13, c12))
        return tl.where((nib & 8) != 0, tl.where(b2, vcf, v8b), tl.where(b2, v47, v03))

    @triton.jit
    def _tile_scale(absmax_ptr, absmax2_ptr, code2_ptr, offset, flat, wmask, offs_k, offs_n, mask_k, mask_n,
                    k_first, n_first, W_COLS, SCALE_MODE: tl.constexpr, NESTED: tl.constexpr,
                    BLOCKSIZE: tl.constexpr, BLOCKSIZE2: tl.constexpr):
        # the absmax of each element of the (BK, BN) W tile, broadcastable to it: with aligned quant
        # blocks a tile needs one scale per column (SCALE_MODE 1, forward) or per row (2, dX)
        # instead of one gather per element (0)
        if SCALE_MODE == 1:
            blk = (offs_n * W_COLS + k_first) // BLOCKSIZE  # (BN,)
            smask = mask_n
        elif SCALE_MODE == 2:
            blk = (offs_k.to(offs_n.dtype) * W_COLS + n_first) // BLOCKSIZE  # (BK,)
            smask = mask_k
        else:
            blk = flat // BLOCKSIZE  # (BK, BN)
            smask = wmask
        if NESTED:
            qa = tl.load(absmax_ptr + blk, mask=smask, other=0).to(tl.int32)
            a2 = tl.load(absmax2_ptr + blk // BLOCKSIZE2, mask=smask, other=0.0)
            scale = tl.load(code2_ptr + qa, mask=smask, other=0.0) * a2 + offset
        else:
            scale = tl.load(absmax_ptr + blk, mask=smask, other=0.0)
        if SCALE_MODE == 1:
            scale = scale[None, :]
        elif SCALE_MODE == 2:
            scale = scale[:, None]
        return scale

    @triton.jit
    def _dot(acc, a, w, IEEE: tl.constexpr, INTERPRET_BF16: tl.constexpr):
        # acc + a @ w, with w (fp32) rounded once to the activation dtype, as bnb does
        if INTERPRET_BF16:
            # The interpreter's bf16 dot is wrong (numpy has no bf16): round W to bf16 values
            # (RNE, as the GPU cast does) and multiply in fp32, which is exact for bf16
            # products with fp32 accumulation, i.e. what the tensor cores compute.
            acc += tl.dot(a.to(tl.float32), _round_bf16(w), input_precision="ieee")
        elif IEEE:
            acc += tl.dot(a, w, input_precision="ieee")  # fp32 activations: no TF32, like torch
        else:
            acc += tl.dot(a, w.to(a.dtype))
        return acc

    @triton.jit
    def _nf4_gemm_kernel(
        a_ptr, packed_ptr, absmax_ptr, code_ptr, offset_ptr, absmax2_ptr, code2_ptr, bias_ptr, c_ptr,
        M, N, K, W_COLS, stride_am, stride_cm, M_BUCKET,
        TRANSPOSE_W: tl.constexpr, HAS_BIAS: tl.constexpr, NESTED: tl.constexpr,
        BLOCKSIZE: tl.constexpr, BLOCKSIZE2: tl.constexpr, IEEE: tl.constexpr, ATOMIC: tl.constexpr,
        INTERPRET_BF16: tl.constexpr, INDEX64: tl.constexpr, ALIGNED: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        SPLIT_K: tl.constexpr, GROUP_M: tl.constexpr, LUT_SELECT: tl.constexpr,
    ):
        # C (M, N) = A (M, K) @ B (K, N), B[k, n] = W[n, k] (TRANSPOSE_W, forward) or W[k, n] (dX).
        # W (rows, W_COLS) is never materialized: each (BLOCK_K, BLOCK_N) tile is dequantized in
        # registers right before the dot. ALIGNED: W_COLS % BLOCKSIZE == 0 (quant blocks never
        # straddle rows); then SCALE_MODE 1/2 (see _tile_scale) load one absmax per column/row of
        # the tile. (plain constexpr arithmetic: the compiler folds it, so the branches are static)
        SCALE_MODE: tl.constexpr = ALIGNED * (
            TRANSPOSE_W * (BLOCKSIZE % BLOCK_K == 0) + (1 - TRANSPOSE_W) * (BLOCKSIZE % BLOCK_N == 0) * 2
        )
        pid_m, pid_n = _grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
        pid_k = tl.program_id(1)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        if INDEX64:  # 32-bit index math is cheaper; widen only for tensors past 2**31 elements
            offs_m = offs_m.to(tl.int64)
            offs_n = offs_n.to(tl.int64)
        mask_m = offs_m < M
        mask_n = offs_n < N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        if NESTED:
            offset = tl.load(offset_ptr)
        else:
            offset = 0.0  # unused: plain absmax
        if LUT_SELECT:  # the 16 code values in registers (see _select_code)
            c0, c1, c2, c3, c4, c5, c6, c7, c8, c9, c10, c11, c12, c13, c14, c15 = _load_code(code_ptr)
        k_per_split = tl.cdiv(tl.cdiv(K, BLOCK_K), SPLIT_K) * BLOCK_K
        k_start = pid_k * k_per_split
        for k0 in range(0, k_per_split, BLOCK_K):
            offs_k = k_start + k0 + tl.arange(0, BLOCK_K)
            mask_k = offs_k < K
            a = tl.load(a_ptr + offs_m[:, None] * stride_am + offs_k[None, :],
                        mask=mask_m[:, None] & mask_k[None, :], other=0.0)  # (BM, BK)
            if TRANSPOSE_W:
                flat = offs_n[None, :] * W_COLS + offs_k[:, None]  # (BK, BN)
            else:
                flat = offs_k[:, None].to(offs_n.dtype) * W_COLS + offs_n[None, :]  # (BK, BN)
            wmask = mask_k[:, None] & mask_n[None, :]
            # dequantize the W tile in registers. bnb keeps the even flat index in the high nibble.
            byte = tl.load(packed_ptr + (flat >> 1), mask=wmask, other=0).to(tl.int32)
            nib = tl.where((flat & 1) == 0, byte >> 4, byte & 15)
            if LUT_SELECT:
                val = _select_code(nib, c0, c1, c2, c3, c4, c5, c6, c7, c8, c9, c10, c11, c12, c13, c14, c15)
            else:
                val = tl.load(code_ptr + nib, mask=wmask, other=0.0)  # 16-entry table, in L1
            # (the select tree gives code[0] rather than 0 where the tile is masked: harmless, as
            # A is zero past K and columns past N are never stored)
            scale = _tile_scale(absmax_ptr, absmax2_ptr, code2_ptr, offset, flat, wmask, offs_k, offs_n, mask_k,
                                mask_n, k_start + k0, pid_n * BLOCK_N, W_COLS, SCALE_MODE, NESTED, BLOCKSIZE,
                                BLOCKSIZE2)
            acc = _dot(acc, a, val * scale, IEEE, INTERPRET_BF16)  # (BK, BN) fp32 tile of W
        if HAS_BIAS:
            b = tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
            acc += tl.where(pid_k == 0, b, 0.0)[None, :]  # split-K: only one split adds the bias
        c_ptrs = c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :]
        cmask = mask_m[:, None] & mask_n[None, :]
        if ATOMIC:
            tl.atomic_add(c_ptrs, acc, mask=cmask)
        else:
            if INTERPRET_BF16:
                acc = _round_bf16(acc)
            tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=cmask)

    key = ["M_BUCKET", "N", "K", "TRANSPOSE_W"]
    if _interpreting():
        # the interpreter runs every candidate: one small config per path keeps CPU tests fast
        # (chosen so that the tests reach every branch: split-K, per-column, per-row and per-element
        # absmax, N and K tails, both code lookups: gather on the small path, select tree tiled)
        small_cfgs = [triton.Config({"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 64, "SPLIT_K": 2, "GROUP_M": 1,
                                     "LUT_SELECT": False})]
        tiled_cfgs = [triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "SPLIT_K": 1, "GROUP_M": 2,
                                     "LUT_SELECT": True})]
    else:
        # (LUT_SELECT: code values by select tree instead of a gather; see the kernel.) Each
        # config compiles for sm_90 within the shared-memory limit and without spilling in at
        # least one direction (forward or dX; both share these lists, the autotuner skips a
        # config over the limit): `python benchmarks/compile_kernels.py --kernels nf4`.
        small_cfgs = [
            triton.Config({"BLOCK_M": 16, "BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": sk, "GROUP_M": 1,
                           "LUT_SELECT": sel}, num_warps=nw, num_stages=ns)
            for bn, bk, sk, nw, ns, sel in [
                (32, 128, 1, 4, 4, False), (64, 128, 1, 4, 4, False), (32, 256, 2, 4, 3, False),
                (64, 128, 2, 4, 4, False), (32, 128, 4, 4, 4, False), (128, 64, 8, 4, 4, False),
                (64, 64, 8, 4, 4, False), (16, 256, 1, 2, 4, False), (16, 128, 2, 2, 4, False),
                (128, 64, 8, 4, 4, True), (64, 64, 8, 4, 4, True), (32, 128, 1, 4, 4, True),
                (64, 128, 2, 4, 4, True), (16, 128, 2, 2, 4, True),
            ]
        ]
        tiled_cfgs = [
            triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": 1, "GROUP_M": 8,
                           "LUT_SELECT": sel}, num_warps=nw, num_stages=ns)
            for bm, bn, bk, nw, ns, sel in [
                (128, 128, 64, 8, 3, False), (128, 256, 64, 8, 3, False), (256, 128, 64, 8, 3, False),
                (64, 128, 64, 4, 4, False), (128, 64, 64, 4, 4, False), (64, 64, 64, 4, 4, False),
                (32, 64, 64, 4, 4, False), (64, 256, 32, 8, 4, False),
                (128, 128, 64, 8, 3, True), (128, 256, 64, 8, 3, True), (256, 128, 64, 8, 3, True),
                (128, 128, 128, 8, 2, True), (64, 128, 64, 4, 4, True), (64, 64, 64, 4, 4, True),
            ]
        ]
    small = triton.autotune(configs=small_cfgs, key=key, reset_to_zero=["c_ptr"])(_nf4_gemm_kernel)
    tiled = triton.autotune(configs=tiled_cfgs, key=key)(_nf4_gemm_kernel)
    _KERNELS = {"small": small, "tiled": tiled}




def _triton_nf4_gemm(
    a: torch.Tensor,
    packed: torch.Tensor,
    absmax: torch.Tensor,
    code: torch.Tensor,
    offset: torch.Tensor,
    absmax2: torch.Tensor,
    code2: torch.Tensor,
    bias: Optional[torch.Tensor],
    *,
    n_out: int,
    k_in: int,
    blocksize: int,
    blocksize2: int,
    transpose_w: bool,
) -> torch.Tensor:
    """Launch the Triton GEMM. Forward (``transpose_w``): ``a (M, k_in) -> (M, n_out)``;
    dX: ``a (M, n_out) -> (M, k_in)``. Output in a's dtype."""
    if triton is None:
        raise RuntimeError("backend='triton' needs the `triton` package: pip install triton")
    ks = _KERNELS
    a = a.contiguous()
    m = a.shape[0]
    n, k = (n_out, k_in) if transpose_w else (k_in, n_out)
    nested = absmax.dtype == torch.uint8
    if not nested:  # the kernel never reads them, but it needs valid pointers
        offset = absmax2 = code2 = absmax
    small = m <= SMALL_M
    c = torch.zeros((m, n), device=a.device, dtype=torch.float32) if small else torch.empty(
        (m, n), device=a.device, dtype=a.dtype
    )
    if m == 0:
        return c.to(a.dtype)
    kernel = ks["small"] if small else ks["tiled"]

    def grid(meta):
        return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]), meta["SPLIT_K"])

    kernel[grid](
        a, packed, absmax, code, offset, absmax2, code2, bias if bias is not None else a, c,
        m, n, k, k_in, a.stride(0), c.stride(0), _m_bucket(m),
        TRANSPOSE_W=transpose_w, HAS_BIAS=bias is not None, NESTED=nested,
        BLOCKSIZE=blocksize, BLOCKSIZE2=blocksize2, IEEE=a.dtype == torch.float32, ATOMIC=small,
        INTERPRET_BF16=a.dtype == torch.bfloat16 and not a.is_cuda,
        INDEX64=max(a.numel(), c.numel(), n * k, 2 * packed.numel()) >= 2**31 - 1,
        ALIGNED=k_in % blocksize == 0,
        # no mul+add -> fma contraction: the absmax must round exactly like bnb's (mul, then add)
        enable_fp_fusion=False,
    )
    return c.to(a.dtype) if small else c
