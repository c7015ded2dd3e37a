"""Packed-sequence (varlen) causal attention: Triton forward/backward + plain-torch reference.

Several examples are packed back to back into one token axis; ``cu_seqlens`` (int32, shape
``(num_seqs + 1,)``, ``cu_seqlens[0] == 0``, ``cu_seqlens[-1] == total_tokens``) marks where each
starts, so no token attends across an example's boundary and no (T, T) mask is ever built.

Layout (flash-attention's varlen API)::

    q    (total_tokens, heads,    head_dim)
    k, v (total_tokens, kv_heads, head_dim)     heads % kv_heads == 0 (grouped-query attention)
    out  (total_tokens, heads,    head_dim)

Example: three examples of 3, 1 and 2 tokens packed into 6 tokens have
``cu_seqlens = tensor([0, 3, 4, 6], dtype=torch.int32)`` and ``max_seqlen = 3``.

Backends (see :func:`qtulu.backend.resolve_backend`): ``"triton"`` runs the kernels below (CPU
tensors need ``TRITON_INTERPRET=1``), ``"torch"`` runs one ``scaled_dot_product_attention`` per
example (the reference), ``"auto"`` picks Triton on CUDA.

The Triton path follows FlashAttention-2: the forward keeps an online softmax in fp32 and saves
the log-sum-exp per row; the backward recomputes the probabilities from it (delta =
rowsum(dO * O) is a torch reduction), with one kernel for dK/dV (a program per key block and KV
head, looping over the query heads of its group, so GQA gradients are summed without atomics) and
one for dQ. Both are registered as ``torch.library.custom_op`` with fake implementations, so
``torch.compile`` can trace through them.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from qtulu.backend import resolve_backend

try:  # triton is optional: the torch reference works without it
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where triton is absent
    triton = None
    tl = None

__all__ = ["varlen_attention", "varlen_attention_torch", "TRITON_DTYPES"]

TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# (BLOCK_M, BLOCK_N) per kernel under TRITON_INTERPRET (one config, no autotuning); tests change
# them (and clear _TUNED) to walk the uneven tilings that the GPU autotuner picks
INTERPRET_BLOCKS = {"fwd": (32, 32), "dq": (32, 32), "dkdv": (32, 32)}
_LOG2E = 1.4426950408889634


# --------------------------------------------------------------------------------------------
# plain-torch reference
# --------------------------------------------------------------------------------------------


def varlen_attention_torch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    causal: bool = True,
    softmax_scale: float | None = None,
) -> torch.Tensor:
    """Reference: one ``F.scaled_dot_product_attention`` per packed example (differentiable)."""
    total, heads, head_dim = q.shape
    group = heads // k.shape[1]
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
        oi = F.scaled_dot_product_attention(qi, ki, vi, is_causal=causal, scale=softmax_scale)
        outs.append(oi.squeeze(0).transpose(0, 1))  # (L, H, D)
    if not outs:
        return q.new_zeros(total, heads, v.shape[-1])
    return torch.cat(outs, dim=0)  # (total, H, D)


# --------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------

if triton is not None:

    def _cfg(bm, bn, warps, stages):
        return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=warps, num_stages=stages)

    def _fwd_configs():
        if _interpreting():
            return [_cfg(*INTERPRET_BLOCKS["fwd"], 4, 1)]
        # BLOCK_N must divide BLOCK_M (the causal split of the key loop relies on it); a short
        # list, since every config is one more compile when a run starts. Each one compiles for
        # sm_90 at head dim 128 (bf16) without spilling registers; the 4-warp 128-row tiles and
        # others that did spill were dropped (`python benchmarks/compile_kernels.py` shows it)
        return [
            _cfg(128, 64, 8, 3), _cfg(128, 64, 8, 4), _cfg(128, 128, 8, 2), _cfg(128, 128, 8, 3),
            _cfg(64, 64, 4, 3), _cfg(64, 64, 8, 3), _cfg(64, 32, 4, 2),
        ]

    def _bwd_configs(kind: str):
        if _interpreting():
            return [_cfg(*INTERPRET_BLOCKS[kind], 4, 1)]
        # as for the forward: none of these spills at head dim 128 on sm_90
        if kind == "dkdv":  # loops over query blocks: BLOCK_M must divide BLOCK_N
            return [_cfg(32, 64, 8, 2), _cfg(32, 64, 8, 3), _cfg(32, 128, 8, 2),
                    _cfg(16, 128, 8, 2), _cfg(16, 64, 4, 2), _cfg(32, 64, 4, 2)]
        # dq loops over key blocks: BLOCK_N must divide BLOCK_M
        return [_cfg(128, 64, 8, 2), _cfg(128, 64, 8, 3), _cfg(128, 32, 8, 2),
                _cfg(64, 64, 8, 2), _cfg(64, 32, 8, 2), _cfg(64, 32, 4, 3), _cfg(64, 16, 4, 2)]

    @triton.jit
    def _dot(a, b, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
        # UPCAST: the Triton interpreter multiplies bf16 tiles as raw uint16 (wrong), so under
        # TRITON_INTERPRET bf16 operands are widened (exactly) to fp32 first
        if UPCAST:
            out = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
        else:
            out = tl.dot(a, b, input_precision=PRECISION)
        return out

    @triton.jit
    def _fwd_inner(
        acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt,
        offs_m, offs_n, offs_d, mask_d, seqlen, lo, hi, qk_scale,
        BLOCK_N: tl.constexpr, MASK: tl.constexpr, IS_CAUSAL: tl.constexpr,
        PRECISION: tl.constexpr, UPCAST: tl.constexpr, INDEX64: tl.constexpr,
    ):
        for start_n in range(lo, hi, BLOCK_N):
            cols = start_n + offs_n  # (BN,)
            if INDEX64:  # offsets inside one sequence fit in int32 unless it is huge (see host)
                cols = cols.to(tl.int64)
            col_ok = cols < seqlen
            kt = tl.load(
                k_base + cols[None, :] * stride_kt + offs_d[:, None],
                mask=col_ok[None, :] & mask_d[:, None], other=0.0,
            )  # (BD, BN)
            qk = _dot(q, kt, PRECISION, UPCAST) * qk_scale  # (BM, BN), log2 units
            if MASK:
                valid = col_ok[None, :]
                if IS_CAUSAL:
                    valid = valid & (offs_m[:, None] >= cols[None, :])
                qk = tl.where(valid, qk, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            p = tl.math.exp2(qk - m_new[:, None])  # (BM, BN)
            alpha = tl.math.exp2(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None]
            v = tl.load(
                v_base + cols[:, None] * stride_vt + offs_d[None, :],
                mask=col_ok[:, None] & mask_d[None, :], other=0.0,
            )  # (BN, BD)
            acc += _dot(p.to(v.dtype), v, PRECISION, UPCAST)
            m_i = m_new
        return acc, l_i, m_i

    @triton.jit
    def _varlen_fwd_kernel(
        Q, K, V, O, LSE, CU, qk_scale,
        stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
        stride_ot, stride_oh, stride_lh, SEQ_BUCKET,
        GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
        IS_CAUSAL: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
        INDEX64: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ):
        # causal: the last query blocks have the most keys; launch them first (less tail idle)
        pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
        head = tl.program_id(1)
        seq = tl.program_id(2)
        start = tl.load(CU + seq).to(tl.int64)
        seqlen = (tl.load(CU + seq + 1) - tl.load(CU + seq)).to(tl.int32)
        start_m = pid_m * BLOCK_M
        if start_m < seqlen:
            kv_head = head // GROUP
            offs_m = start_m + tl.arange(0, BLOCK_M)
            offs_n = tl.arange(0, BLOCK_N)
            offs_d = tl.arange(0, BLOCK_D)
            mask_d = offs_d < HEAD_DIM
            row_ok = offs_m < seqlen
            rows = (start + offs_m).to(tl.int64)
            q = tl.load(
                Q + rows[:, None] * stride_qt + head * stride_qh + offs_d[None, :],
                mask=row_ok[:, None] & mask_d[None, :], other=0.0,
            )  # (BM, BD)
            k_base = K + start * stride_kt + kv_head * stride_kh
            v_base = V + start * stride_vt + kv_head * stride_vh
            m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
            l_i = tl.zeros([BLOCK_M], tl.float32)
            acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
            if IS_CAUSAL:
                n_full = start_m  # blocks left of the diagonal: every key visible to every row
                hi = tl.minimum(start_m + BLOCK_M, seqlen)
            else:
                n_full = (seqlen // BLOCK_N) * BLOCK_N
                hi = seqlen
            acc, l_i, m_i = _fwd_inner(
                acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, offs_m, offs_n, offs_d,
                mask_d, seqlen, 0, n_full, qk_scale, BLOCK_N, False, IS_CAUSAL, PRECISION, UPCAST, INDEX64,
            )
            acc, l_i, m_i = _fwd_inner(
                acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, offs_m, offs_n, offs_d,
                mask_d, seqlen, n_full, hi, qk_scale, BLOCK_N, True, IS_CAUSAL, PRECISION, UPCAST, INDEX64,
            )
            out = acc / l_i[:, None]
            lse = m_i + tl.math.log2(l_i)  # log2 units (saves a rounding in the backward)
            tl.store(
                O + rows[:, None] * stride_ot + head * stride_oh + offs_d[None, :],
                out.to(O.dtype.element_ty), mask=row_ok[:, None] & mask_d[None, :],
            )
            tl.store(LSE + head * stride_lh + start + offs_m, lse, mask=row_ok)

    @triton.jit
    def _dq_inner(
        dq, q, do, lse2, delta, k_base, v_base, stride_kt, stride_vt,
        offs_m, offs_n, offs_d, mask_d, seqlen, lo, hi, qk_scale,
        BLOCK_N: tl.constexpr, MASK: tl.constexpr, IS_CAUSAL: tl.constexpr,
        PRECISION: tl.constexpr, UPCAST: tl.constexpr, INDEX64: tl.constexpr,
    ):
        for start_n in range(lo, hi, BLOCK_N):
            cols = start_n + offs_n
            if INDEX64:
                cols = cols.to(tl.int64)
            col_ok = cols < seqlen
            kt = tl.load(
                k_base + cols[None, :] * stride_kt + offs_d[:, None],
                mask=col_ok[None, :] & mask_d[:, None], other=0.0,
            )  # (BD, BN)
            vt = tl.load(
                v_base + cols[None, :] * stride_vt + offs_d[:, None],
                mask=col_ok[None, :] & mask_d[:, None], other=0.0,
            )  # (BD, BN)
            qk = _dot(q, kt, PRECISION, UPCAST) * qk_scale
            p = tl.math.exp2(qk - lse2[:, None])  # (BM, BN)
            if MASK:
                valid = col_ok[None, :]
                if IS_CAUSAL:
                    valid = valid & (offs_m[:, None] >= cols[None, :])
                p = tl.where(valid, p, 0.0)
            dp = _dot(do, vt, PRECISION, UPCAST)  # (BM, BN)
            ds = p * (dp - delta[:, None])
            dq += _dot(ds.to(kt.dtype), tl.trans(kt), PRECISION, UPCAST)
        return dq

    @triton.jit
    def _varlen_bwd_dq_kernel(
        Q, K, V, DO, DQ, LSE, DELTA, CU, qk_scale, sm_scale,
        stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
        stride_dot, stride_doh, stride_dqt, stride_dqh, stride_lh, SEQ_BUCKET,
        GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
        IS_CAUSAL: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
        INDEX64: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ):
        # causal: the last query blocks have the most keys; launch them first (less tail idle)
        pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
        head = tl.program_id(1)
        seq = tl.program_id(2)
        start = tl.load(CU + seq).to(tl.int64)
        seqlen = (tl.load(CU + seq + 1) - tl.load(CU + seq)).to(tl.int32)
        start_m = pid_m * BLOCK_M
        if start_m < seqlen:
            kv_head = head // GROUP
            offs_m = start_m + tl.arange(0, BLOCK_M)
            offs_n = tl.arange(0, BLOCK_N)
            offs_d = tl.arange(0, BLOCK_D)
            mask_d = offs_d < HEAD_DIM
            row_ok = offs_m < seqlen
            rows = (start + offs_m).to(tl.int64)
            tile_ok = row_ok[:, None] & mask_d[None, :]
            q = tl.load(Q + rows[:, None] * stride_qt + head * stride_qh + offs_d[None, :],
                        mask=tile_ok, other=0.0)  # (BM, BD)
            do = tl.load(DO + rows[:, None] * stride_dot + head * stride_doh + offs_d[None, :],
                         mask=tile_ok, other=0.0)  # (BM, BD)
            lse2 = tl.load(LSE + head * stride_lh + rows, mask=row_ok, other=0.0)
            delta = tl.load(DELTA + head * stride_lh + rows, mask=row_ok, other=0.0)
            k_base = K + start * stride_kt + kv_head * stride_kh
            v_base = V + start * stride_vt + kv_head * stride_vh
            dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
            if IS_CAUSAL:
                n_full = start_m
                hi = tl.minimum(start_m + BLOCK_M, seqlen)
            else:
                n_full = (seqlen // BLOCK_N) * BLOCK_N
                hi = seqlen
            dq = _dq_inner(dq, q, do, lse2, delta, k_base, v_base, stride_kt, stride_vt, offs_m,
                           offs_n, offs_d, mask_d, seqlen, 0, n_full, qk_scale, BLOCK_N, False,
                           IS_CAUSAL, PRECISION, UPCAST, INDEX64)
            dq = _dq_inner(dq, q, do, lse2, delta, k_base, v_base, stride_kt, stride_vt, offs_m,
                           offs_n, offs_d, mask_d, seqlen, n_full, hi, qk_scale, BLOCK_N, True,
                           IS_CAUSAL, PRECISION, UPCAST, INDEX64)
            dq = dq * sm_scale
            tl.store(DQ + rows[:, None] * stride_dqt + head * stride_dqh + offs_d[None, :],
                     dq.to(DQ.dtype.element_ty), mask=tile_ok)

    @triton.jit
    def _dkdv_inner(
        dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qt, stride_dot,
        offs_n, offs_m0, offs_d, mask_d, seqlen, lo, hi, qk_scale,
        BLOCK_M: tl.constexpr, IS_CAUSAL: tl.constexpr,
        PRECISION: tl.constexpr, UPCAST: tl.constexpr, INDEX64: tl.constexpr,
    ):
        for start_m in range(lo, hi, BLOCK_M):
            rows = start_m + offs_m0  # (BM,)
            if INDEX64:
                rows = rows.to(tl.int64)
            row_ok = rows < seqlen
            tile_ok = row_ok[:, None] & mask_d[None, :]
            q = tl.load(q_base + rows[:, None] * stride_qt + offs_d[None, :], mask=tile_ok,
                        other=0.0)  # (BM, BD)
            do = tl.load(do_base + rows[:, None] * stride_dot + offs_d[None, :], mask=tile_ok,
                         other=0.0)  # (BM, BD)
            lse2 = tl.load(lse_base + rows, mask=row_ok, other=0.0)
            delta = tl.load(delta_base + rows, mask=row_ok, other=0.0)
            qkt = _dot(k, tl.trans(q), PRECISION, UPCAST) * qk_scale  # (BN, BM)
            pt = tl.math.exp2(qkt - lse2[None, :])  # (BN, BM)
            valid = row_ok[None, :] & (offs_n[:, None] < seqlen)
            if IS_CAUSAL:
                valid = valid & (rows[None, :] >= offs_n[:, None])
            pt = tl.where(valid, pt, 0.0)
            dv += _dot(pt.to(do.dtype), do, PRECISION, UPCAST)  # (BN, BD)
            dpt = _dot(v, tl.trans(do), PRECISION, UPCAST)  # (BN, BM)
            dst = pt * (dpt - delta[None, :])
            dk += _dot(dst.to(q.dtype), q, PRECISION, UPCAST)  # (BN, BD)
        return dk, dv

    @triton.jit
    def _varlen_bwd_dkdv_kernel(
        Q, K, V, DO, DK, DV, LSE, DELTA, CU, qk_scale, sm_scale,
        stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
        stride_dot, stride_doh, stride_dkt, stride_dkh, stride_dvt, stride_dvh, stride_lh,
        SEQ_BUCKET,
        GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
        IS_CAUSAL: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
        INDEX64: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ):
        pid_n = tl.program_id(0)
        kv_head = tl.program_id(1)
        seq = tl.program_id(2)
        start = tl.load(CU + seq).to(tl.int64)
        seqlen = (tl.load(CU + seq + 1) - tl.load(CU + seq)).to(tl.int32)
        start_n = pid_n * BLOCK_N
        if start_n < seqlen:
            offs_n = start_n + tl.arange(0, BLOCK_N)
            offs_m0 = tl.arange(0, BLOCK_M)
            offs_d = tl.arange(0, BLOCK_D)
            mask_d = offs_d < HEAD_DIM
            col_ok = offs_n < seqlen
            cols = (start + offs_n).to(tl.int64)
            tile_ok = col_ok[:, None] & mask_d[None, :]
            k = tl.load(K + cols[:, None] * stride_kt + kv_head * stride_kh + offs_d[None, :],
                        mask=tile_ok, other=0.0)  # (BN, BD)
            v = tl.load(V + cols[:, None] * stride_vt + kv_head * stride_vh + offs_d[None, :],
                        mask=tile_ok, other=0.0)  # (BN, BD)
            dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
            dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
            # one masked loop over the query blocks from the diagonal on. Splitting it into
            # masked and unmasked loops (as the forward does) made every config spill registers
            # on sm_90: each loop copy keeps its own pipelined tiles alive (measured with
            # benchmarks/compile_kernels.py); the mask is one compare and select per tile.
            m_lo = start_n if IS_CAUSAL else 0
            for g in range(GROUP):
                head = kv_head * GROUP + g
                q_base = Q + start * stride_qt + head * stride_qh
                do_base = DO + start * stride_dot + head * stride_doh
                lse_base = LSE + head * stride_lh + start
                delta_base = DELTA + head * stride_lh + start
                dk, dv = _dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base,
                                     stride_qt, stride_dot, offs_n, offs_m0, offs_d, mask_d,
                                     seqlen, m_lo, seqlen, qk_scale, BLOCK_M, IS_CAUSAL,
                                     PRECISION, UPCAST, INDEX64)
            dk = dk * sm_scale
            tl.store(DK + cols[:, None] * stride_dkt + kv_head * stride_dkh + offs_d[None, :],
                     dk.to(DK.dtype.element_ty), mask=tile_ok)
            tl.store(DV + cols[:, None] * stride_dvt + kv_head * stride_dvh + offs_d[None, :],
                     dv.to(DV.dtype.element_ty), mask=tile_ok)


def _interpreting() -> bool:
    from qtulu.backend import triton_interpreting

    return triton_interpreting()


_TUNED: dict[str, object] = {}
_INDEX32_LIMIT = 2**31  # tests lower it to cover the int64 path


def _kernel(name: str):
    """The launcher for kernel ``name``: autotuned on a GPU, a single small config interpreted."""
    if name not in _TUNED:
        keys = ["HEAD_DIM", "GROUP", "IS_CAUSAL", "SEQ_BUCKET"]
        if name == "fwd":
            _TUNED[name] = triton.autotune(_fwd_configs(), key=keys)(_varlen_fwd_kernel)
        elif name == "dq":
            _TUNED[name] = triton.autotune(_bwd_configs("dq"), key=keys)(_varlen_bwd_dq_kernel)
        else:
            _TUNED[name] = triton.autotune(_bwd_configs("dkdv"), key=keys)(_varlen_bwd_dkdv_kernel)
    return _TUNED[name]


def _seq_bucket(max_seqlen: int) -> int:
    # autotune key: a few coarse classes of the longest example, so that a training run whose
    # packed rows vary tunes (benchmarks every config) a handful of times, not once per length
    for bound in (256, 1024, 4096):
        if max_seqlen <= bound:
            return bound
    return 16384


def _upcast(q: torch.Tensor) -> bool:
    return q.dtype == torch.bfloat16 and not q.is_cuda


def _index64(max_seqlen: int, *tensors: torch.Tensor) -> bool:
    # the inner loops index tokens relative to their sequence's start in int32 (64-bit index
    # math costs registers, and the backward kernels spilled with it); switch to int64 only for
    # a sequence long enough to overflow (e.g. 262k tokens at 64 heads x 128)
    return max_seqlen * max(t.stride(0) for t in tensors) >= _INDEX32_LIMIT


def _precision(dtype: torch.dtype) -> str:
    # fp32 inputs get exact fp32 products (tf32 would be 10x less accurate than torch's fp32)
    return "ieee" if dtype == torch.float32 else None


def _triton_forward(q, k, v, cu_seqlens, max_seqlen, causal, softmax_scale):
    total, heads, head_dim = q.shape
    out = torch.empty_like(q)  # (total, H, D)
    lse = torch.empty(heads, total, device=q.device, dtype=torch.float32)  # (H, total), log2 units
    num_seqs = cu_seqlens.numel() - 1
    if total == 0 or num_seqs == 0 or max_seqlen == 0:
        return out.zero_(), lse.fill_(float("-inf"))

    def grid(meta):
        return (triton.cdiv(max_seqlen, meta["BLOCK_M"]), heads, num_seqs)

    _kernel("fwd")[grid](
        q, k, v, out, lse, cu_seqlens, softmax_scale * _LOG2E,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        out.stride(0), out.stride(1), lse.stride(0), _seq_bucket(max_seqlen),
        GROUP=heads // k.shape[1], HEAD_DIM=head_dim,
        BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
        IS_CAUSAL=causal, PRECISION=_precision(q.dtype), UPCAST=_upcast(q),
        INDEX64=_index64(max_seqlen, q, k, v, out),
    )
    return out, lse


def _triton_backward(do, q, k, v, out, lse, cu_seqlens, max_seqlen, causal, softmax_scale):
    total, heads, head_dim = q.shape
    kv_heads = k.shape[1]
    dq = torch.empty_like(q)
    dk = torch.empty_like(k)
    dv = torch.empty_like(v)
    num_seqs = cu_seqlens.numel() - 1
    if total == 0 or num_seqs == 0 or max_seqlen == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    do = do.contiguous()
    # the FlashAttention-2 "preprocess" step: a plain memory-bound reduction
    delta = (do.float() * out.float()).sum(-1).transpose(0, 1).contiguous()  # (H, total)
    meta = dict(
        GROUP=heads // kv_heads, HEAD_DIM=head_dim,
        BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
        IS_CAUSAL=causal, PRECISION=_precision(q.dtype), UPCAST=_upcast(q),
        INDEX64=_index64(max_seqlen, q, k, v, do, dq, dk, dv),
    )
    bucket = _seq_bucket(max_seqlen)
    _kernel("dq")[lambda m: (triton.cdiv(max_seqlen, m["BLOCK_M"]), heads, num_seqs)](
        q, k, v, do, dq, lse, delta, cu_seqlens, softmax_scale * _LOG2E, softmax_scale,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        do.stride(0), do.stride(1), dq.stride(0), dq.stride(1), lse.stride(0), bucket, **meta,
    )
    _kernel("dkdv")[lambda m: (triton.cdiv(max_seqlen, m["BLOCK_N"]), kv_heads, num_seqs)](
        q, k, v, do, dk, dv, lse, delta, cu_seqlens, softmax_scale * _LOG2E, softmax_scale,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        do.stride(0), do.stride(1), dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1),
        lse.stride(0), bucket, **meta,
    )
    return dq, dk, dv


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
) -> tuple[torch.Tensor, torch.Tensor]:
    return _triton_forward(q, k, v, cu_seqlens, max_seqlen, causal, softmax_scale)


@_varlen_fwd_op.register_fake
def _(q, k, v, cu_seqlens, max_seqlen, causal, softmax_scale):
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
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _triton_backward(do, q, k, v, out, lse, cu_seqlens, max_seqlen, causal, softmax_scale)


@_varlen_bwd_op.register_fake
def _(do, q, k, v, out, lse, cu_seqlens, max_seqlen, causal, softmax_scale):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, cu_seqlens, max_seqlen, causal, softmax_scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_seqlens)
    ctx.max_seqlen, ctx.causal, ctx.softmax_scale = max_seqlen, causal, softmax_scale


def _backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse, cu_seqlens = ctx.saved_tensors
    dq, dk, dv = _varlen_bwd_op(
        grad_out, q, k, v, out, lse, cu_seqlens, ctx.max_seqlen, ctx.causal, ctx.softmax_scale
    )
    return dq, dk, dv, None, None, None, None


_varlen_fwd_op.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------------------------
# public entry point
# --------------------------------------------------------------------------------------------


def _check_inputs(q, k, v, cu_seqlens):
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

    Returns:
        ``(total_tokens, heads, head_dim)`` in q's dtype.
    """
    _check_inputs(q, k, v, cu_seqlens)
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
        return varlen_attention_torch(q, k, v, cu_seqlens, causal, softmax_scale)
    if cu_seqlens.dtype != torch.int32:
        cu_seqlens = cu_seqlens.to(torch.int32)
    if max_seqlen is None:
        max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max()) if cu_seqlens.numel() > 1 else 0
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    out, _ = _varlen_fwd_op(q, k, v, cu_seqlens.contiguous(), int(max_seqlen), bool(causal),
                            float(softmax_scale))
    return out
