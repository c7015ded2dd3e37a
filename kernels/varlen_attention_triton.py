"""Triton kernels of the packed (varlen) causal attention: forward, dQ, dK/dV, and their launchers.

The public API, the plain-torch reference and the autograd/custom-op wiring live in
:mod:`qtulu.kernels.varlen_attention`; this module only holds what runs on the device.

FlashAttention-2 structure: the forward keeps an online softmax in fp32 and saves the log-sum-exp
per row (log2 units); the backward recomputes the probabilities from it (``delta = rowsum(dO*O)``
is a torch reduction), with one kernel for dK/dV (a program per key block and KV head, looping
over the query heads of its group, so GQA gradients are summed without atomics) and one for dQ.

Two per-model variants, each a ``constexpr`` switch so that the plain causal kernel compiles to
exactly the code it had before they existed:

* ``HAS_WINDOW`` (Mistral / Qwen2 / Gemma-2 / Phi-3 sliding window): query ``i`` sees key ``j``
  of its own example iff ``0 <= i - j < window`` (transformers' ``sliding_window_overlay``:
  ``kv_idx > q_idx - sliding_window``). The key loop starts at the window's first block, so a
  window also saves work; blocks the window cuts are masked, blocks wholly inside it are not.
* ``HAS_SOFTCAP`` (Gemma-2 ``attn_logit_softcapping``): the score ``s = scale * q.k`` becomes
  ``softcap * tanh(s / softcap)`` before the softmax; the backward multiplies dS by the
  derivative ``1 - tanh^2``. ``tanh`` is computed here (Triton has none that runs both compiled
  and interpreted): an odd Taylor polynomial below 0.625 and ``1 - 2 / (exp(2|x|) + 1)`` above,
  1.6 ulp at worst in fp32 (numpy's fp32 tanh: 1.4 ulp), measured over [-20, 20].
"""

from __future__ import annotations

try:  # triton is optional: the torch reference works without it
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where triton is absent
    triton = None
    tl = None

# (BLOCK_M, BLOCK_N) per kernel under TRITON_INTERPRET (one config, no autotuning); tests change
# them (and clear _TUNED) to walk the uneven tilings that the GPU autotuner picks
INTERPRET_BLOCKS = {"fwd": (32, 32), "dq": (32, 32), "dkdv": (32, 32)}
LOG2E = 1.4426950408889634
_INDEX32_LIMIT = 2**31  # tests lower it to cover the int64 path
_TUNED: dict[str, object] = {}


def _interpreting() -> bool:
    from qtulu.kernels.backend import triton_interpreting

    return triton_interpreting()


if triton is not None:

    def _cfg(bm, bn, warps, stages):
        return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=warps, num_stages=stages)

    # (BLOCK_M, BLOCK_N, warps, stages) configs that spill registers on sm_90 at head dim 128
    # (bf16) once the window mask and the softcap tanh are in (`python benchmarks/compile_kernels.py
    # --kernels varlen`: 6 of 20 did); the window/softcap variants are tuned without them
    _SPILL_WITH_VARIANT = {
        "fwd": {(128, 128, 8, 2), (128, 128, 8, 3), (64, 64, 4, 3)},
        "dq": {(64, 32, 4, 3)},
        "dkdv": {(32, 128, 8, 2), (32, 64, 4, 2)},
    }

    def _keep(kind: str, configs: list, variant: bool) -> list:
        if not variant:
            return configs
        bad = _SPILL_WITH_VARIANT[kind]
        return [c for c in configs
                if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) not in bad]

    def _fwd_configs(variant: bool = False):
        if _interpreting():
            return [_cfg(*INTERPRET_BLOCKS["fwd"], 4, 1)]
        # BLOCK_N must divide BLOCK_M (the causal split of the key loop relies on it); a short
        # list, since every config is one more compile when a run starts. Each one compiles for
        # sm_90 at head dim 128 (bf16) without spilling registers; the 4-warp 128-row tiles and
        # others that did spill were dropped (`python benchmarks/compile_kernels.py` shows it)
        return _keep("fwd", [
            _cfg(128, 64, 8, 3), _cfg(128, 64, 8, 4), _cfg(128, 128, 8, 2), _cfg(128, 128, 8, 3),
            _cfg(64, 64, 4, 3), _cfg(64, 64, 8, 3), _cfg(64, 32, 4, 2),
        ], variant)

    def _bwd_configs(kind: str, variant: bool = False):
        if _interpreting():
            return [_cfg(*INTERPRET_BLOCKS[kind], 4, 1)]
        # as for the forward: none of these spills at head dim 128 on sm_90
        if kind == "dkdv":  # loops over query blocks: BLOCK_M must divide BLOCK_N
            return _keep(kind, [_cfg(32, 64, 8, 2), _cfg(32, 64, 8, 3), _cfg(32, 128, 8, 2),
                                _cfg(16, 128, 8, 2), _cfg(16, 64, 4, 2), _cfg(32, 64, 4, 2)], variant)
        # dq loops over key blocks: BLOCK_N must divide BLOCK_M
        return _keep(kind, [_cfg(128, 64, 8, 2), _cfg(128, 64, 8, 3), _cfg(128, 32, 8, 2),
                            _cfg(64, 64, 8, 2), _cfg(64, 32, 8, 2), _cfg(64, 32, 4, 3), _cfg(64, 16, 4, 2)],
                     variant)

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
    def _tanh(x):
        # fp32 tanh, <= 1.6 ulp (see the module docstring): Taylor terms up to x^17 below 0.625,
        # where 1 - 2 / (e^2x + 1) would cancel; that formula above (exp overflow gives 1)
        ax = tl.abs(x)
        x2 = ax * ax
        p = 0.000590027440945586
        p = p * x2 - 0.0014558343870513183
        p = p * x2 + 0.003592128036572481
        p = p * x2 - 0.008863235529902197
        p = p * x2 + 0.021869488536155203
        p = p * x2 - 0.05396825396825397
        p = p * x2 + 0.13333333333333333
        p = p * x2 - 0.3333333333333333
        small = ax + ax * x2 * p
        big = 1.0 - 2.0 / (tl.exp(2.0 * ax) + 1.0)
        r = tl.where(ax < 0.625, small, big)
        return tl.where(x < 0, -r, r)

    @triton.jit
    def _visible(rows, cols, seqlen, window, IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr):
        # (len(rows), len(cols)) bool: key `col` exists and query `row` may attend to it
        valid = cols[None, :] < seqlen
        if IS_CAUSAL:
            valid = valid & (rows[:, None] >= cols[None, :])
        if HAS_WINDOW:
            valid = valid & (rows[:, None] - cols[None, :] < window)
        return valid

    @triton.jit
    def _key_ranges(start_m, seqlen, window, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr):
        # key blocks of the query block at start_m: [lo, full_lo) cut by the window (masked),
        # [full_lo, n_full) visible to every row (unmasked), [n_full, hi) the diagonal (masked)
        if IS_CAUSAL:
            n_full = start_m
            hi = tl.minimum(start_m + BLOCK_M, seqlen)
        else:
            n_full = (seqlen // BLOCK_N) * BLOCK_N
            hi = seqlen
        lo = 0
        full_lo = 0
        if HAS_WINDOW:  # causal only (the host refuses a window without causal)
            lo = (tl.maximum(start_m - window + 1, 0) // BLOCK_N) * BLOCK_N
            full_lo = ((tl.maximum(start_m + BLOCK_M - window, 0) + BLOCK_N - 1) // BLOCK_N) * BLOCK_N
            full_lo = tl.minimum(tl.maximum(full_lo, lo), n_full)
        return lo, full_lo, n_full, hi

    @triton.jit
    def _fwd_inner(
        acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt,
        offs_m, offs_n, offs_d, mask_d, seqlen, lo, hi, qk_scale, cap_in, cap_out, window,
        BLOCK_N: tl.constexpr, MASK: tl.constexpr, IS_CAUSAL: tl.constexpr,
        HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
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
            s = _dot(q, kt, PRECISION, UPCAST)  # (BM, BN)
            if HAS_SOFTCAP:
                qk = _tanh(s * cap_in) * cap_out  # softcap * tanh(scale * s / softcap), log2 units
            else:
                qk = s * qk_scale  # log2 units
            if MASK:
                qk = tl.where(_visible(offs_m, cols, seqlen, window, IS_CAUSAL, HAS_WINDOW), qk, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            if HAS_WINDOW:
                # a row may see no key of this block (left of its window): keep exp2 away from -inf - -inf
                m_new = tl.where(m_new == float("-inf"), 0.0, m_new)
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
        Q, K, V, O, LSE, CU, qk_scale, cap_in, cap_out, window,
        stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
        stride_ot, stride_oh, stride_lh, SEQ_BUCKET,
        GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
        IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
        PRECISION: tl.constexpr, UPCAST: tl.constexpr,
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
            lo, full_lo, n_full, hi = _key_ranges(start_m, seqlen, window, BLOCK_M, BLOCK_N, IS_CAUSAL, HAS_WINDOW)
            if HAS_WINDOW:
                acc, l_i, m_i = _fwd_inner(
                    acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, offs_m, offs_n, offs_d,
                    mask_d, seqlen, lo, full_lo, qk_scale, cap_in, cap_out, window, BLOCK_N, True,
                    IS_CAUSAL, HAS_WINDOW, HAS_SOFTCAP, PRECISION, UPCAST, INDEX64,
                )
            acc, l_i, m_i = _fwd_inner(
                acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, offs_m, offs_n, offs_d,
                mask_d, seqlen, full_lo, n_full, qk_scale, cap_in, cap_out, window, BLOCK_N, False,
                IS_CAUSAL, HAS_WINDOW, HAS_SOFTCAP, PRECISION, UPCAST, INDEX64,
            )
            acc, l_i, m_i = _fwd_inner(
                acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, offs_m, offs_n, offs_d,
                mask_d, seqlen, n_full, hi, qk_scale, cap_in, cap_out, window, BLOCK_N, True,
                IS_CAUSAL, HAS_WINDOW, HAS_SOFTCAP, PRECISION, UPCAST, INDEX64,
            )
            if HAS_WINDOW:  # padding rows past the example's end may see no key: no 0/0 for them
                l_i = tl.where(l_i == 0.0, 1.0, l_i)
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
        offs_m, offs_n, offs_d, mask_d, seqlen, lo, hi, qk_scale, cap_in, cap_out, window,
        BLOCK_N: tl.constexpr, MASK: tl.constexpr, IS_CAUSAL: tl.constexpr,
        HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
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
            s = _dot(q, kt, PRECISION, UPCAST)
            if HAS_SOFTCAP:
                t = _tanh(s * cap_in)
                qk = t * cap_out
            else:
                qk = s * qk_scale
            p = tl.math.exp2(qk - lse2[:, None])  # (BM, BN)
            if MASK:
                p = tl.where(_visible(offs_m, cols, seqlen, window, IS_CAUSAL, HAS_WINDOW), p, 0.0)
            dp = _dot(do, vt, PRECISION, UPCAST)  # (BM, BN)
            ds = p * (dp - delta[:, None])
            if HAS_SOFTCAP:
                ds = ds * (1.0 - t * t)  # d(softcap * tanh(x)) / d(softcap * x)
            dq += _dot(ds.to(kt.dtype), tl.trans(kt), PRECISION, UPCAST)
        return dq

    @triton.jit
    def _varlen_bwd_dq_kernel(
        Q, K, V, DO, DQ, LSE, DELTA, CU, qk_scale, sm_scale, cap_in, cap_out, window,
        stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
        stride_dot, stride_doh, stride_dqt, stride_dqh, stride_lh, SEQ_BUCKET,
        GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
        IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
        PRECISION: tl.constexpr, UPCAST: tl.constexpr,
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
            lo, full_lo, n_full, hi = _key_ranges(start_m, seqlen, window, BLOCK_M, BLOCK_N, IS_CAUSAL, HAS_WINDOW)
            if HAS_WINDOW:
                dq = _dq_inner(dq, q, do, lse2, delta, k_base, v_base, stride_kt, stride_vt, offs_m,
                               offs_n, offs_d, mask_d, seqlen, lo, full_lo, qk_scale, cap_in, cap_out,
                               window, BLOCK_N, True, IS_CAUSAL, HAS_WINDOW, HAS_SOFTCAP, PRECISION,
                               UPCAST, INDEX64)
            dq = _dq_inner(dq, q, do, lse2, delta, k_base, v_base, stride_kt, stride_vt, offs_m,
                           offs_n, offs_d, mask_d, seqlen, full_lo, n_full, qk_scale, cap_in, cap_out,
                           window, BLOCK_N, False, IS_CAUSAL, HAS_WINDOW, HAS_SOFTCAP, PRECISION,
                           UPCAST, INDEX64)
            dq = _dq_inner(dq, q, do, lse2, delta, k_base, v_base, stride_kt, stride_vt, offs_m,
                           offs_n, offs_d, mask_d, seqlen, n_full, hi, qk_scale, cap_in, cap_out,
                           window, BLOCK_N, True, IS_CAUSAL, HAS_WINDOW, HAS_SOFTCAP, PRECISION,
                           UPCAST, INDEX64)
            dq = dq * sm_scale
            tl.store(DQ + rows[:, None] * stride_dqt + head * stride_dqh + offs_d[None, :],
                     dq.to(DQ.dtype.element_ty), mask=tile_ok)

    @triton.jit
    def _dkdv_inner(
        dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qt, stride_dot,
        offs_n, offs_m0, offs_d, mask_d, seqlen, lo, hi, qk_scale, cap_in, cap_out, window,
        BLOCK_M: tl.constexpr, IS_CAUSAL: tl.constexpr,
        HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
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
            st = _dot(k, tl.trans(q), PRECISION, UPCAST)  # (BN, BM)
            if HAS_SOFTCAP:
                t = _tanh(st * cap_in)
                qkt = t * cap_out
            else:
                qkt = st * qk_scale
            pt = tl.math.exp2(qkt - lse2[None, :])  # (BN, BM)
            valid = row_ok[None, :] & (offs_n[:, None] < seqlen)
            if IS_CAUSAL:
                valid = valid & (rows[None, :] >= offs_n[:, None])
            if HAS_WINDOW:
                valid = valid & (rows[None, :] - offs_n[:, None] < window)
            pt = tl.where(valid, pt, 0.0)
            dv += _dot(pt.to(do.dtype), do, PRECISION, UPCAST)  # (BN, BD)
            dpt = _dot(v, tl.trans(do), PRECISION, UPCAST)  # (BN, BM)
            dst = pt * (dpt - delta[None, :])
            if HAS_SOFTCAP:
                dst = dst * (1.0 - t * t)
            dk += _dot(dst.to(q.dtype), q, PRECISION, UPCAST)  # (BN, BD)
        return dk, dv

    @triton.jit
    def _varlen_bwd_dkdv_kernel(
        Q, K, V, DO, DK, DV, LSE, DELTA, CU, qk_scale, sm_scale, cap_in, cap_out, window,
        stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
        stride_dot, stride_doh, stride_dkt, stride_dkh, stride_dvt, stride_dvh, stride_lh,
        SEQ_BUCKET,
        GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
        IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
        PRECISION: tl.constexpr, UPCAST: tl.constexpr,
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
            m_hi = seqlen
            if HAS_WINDOW:  # the last query that sees key start_n + BLOCK_N - 1 is window - 1 later
                m_hi = tl.minimum(seqlen, start_n + BLOCK_N - 1 + window)
            for g in range(GROUP):
                head = kv_head * GROUP + g
                q_base = Q + start * stride_qt + head * stride_qh
                do_base = DO + start * stride_dot + head * stride_doh
                lse_base = LSE + head * stride_lh + start
                delta_base = DELTA + head * stride_lh + start
                dk, dv = _dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base,
                                     stride_qt, stride_dot, offs_n, offs_m0, offs_d, mask_d,
                                     seqlen, m_lo, m_hi, qk_scale, cap_in, cap_out, window, BLOCK_M,
                                     IS_CAUSAL, HAS_WINDOW, HAS_SOFTCAP, PRECISION, UPCAST, INDEX64)
            dk = dk * sm_scale
            tl.store(DK + cols[:, None] * stride_dkt + kv_head * stride_dkh + offs_d[None, :],
                     dk.to(DK.dtype.element_ty), mask=tile_ok)
            tl.store(DV + cols[:, None] * stride_dvt + kv_head * stride_dvh + offs_d[None, :],
                     dv.to(DV.dtype.element_ty), mask=tile_ok)


# --------------------------------------------------------------------------------------------
# launchers
# --------------------------------------------------------------------------------------------


def _kernel(name: str, variant: bool = False):
    """The launcher for kernel ``name``: autotuned on a GPU, a single small config interpreted;
    ``variant`` (a window or a softcap): over the configs that do not spill with them."""
    if (name, variant) not in _TUNED:
        keys = ["HEAD_DIM", "GROUP", "IS_CAUSAL", "HAS_WINDOW", "HAS_SOFTCAP", "SEQ_BUCKET"]
        if name == "fwd":
            tuned = triton.autotune(_fwd_configs(variant), key=keys)(_varlen_fwd_kernel)
        elif name == "dq":
            tuned = triton.autotune(_bwd_configs("dq", variant), key=keys)(_varlen_bwd_dq_kernel)
        else:
            tuned = triton.autotune(_bwd_configs("dkdv", variant), key=keys)(_varlen_bwd_dkdv_kernel)
        _TUNED[(name, variant)] = tuned
    return _TUNED[(name, variant)]


def _seq_bucket(max_seqlen: int) -> int:
    # autotune key: a few coarse classes of the longest example, so that a training run whose
    # packed rows vary tunes (benchmarks every config) a handful of times, not once per length
    for bound in (256, 1024, 4096):
        if max_seqlen <= bound:
            return bound
    return 16384


def _upcast(q) -> bool:
    import torch

    return q.dtype == torch.bfloat16 and not q.is_cuda


def _index64(max_seqlen: int, *tensors) -> bool:
    # the inner loops index tokens relative to their sequence's start in int32 (64-bit index
    # math costs registers, and the backward kernels spilled with it); switch to int64 only for
    # a sequence long enough to overflow (e.g. 262k tokens at 64 heads x 128)
    return max_seqlen * max(t.stride(0) for t in tensors) >= _INDEX32_LIMIT


def _precision(dtype) -> str | None:
    import torch

    # fp32 inputs get exact fp32 products (tf32 would be 10x less accurate than torch's fp32)
    return "ieee" if dtype == torch.float32 else None


def _variant(softmax_scale: float, window: int, softcap: float) -> tuple[tuple, dict]:
    """(runtime scalars after the pointers, constexprs) for a window / softcap setting."""
    cap = float(softcap) if softcap else 0.0
    scalars = (
        softmax_scale * LOG2E,
        softmax_scale / cap if cap else 1.0,  # cap_in: scale / softcap
        cap * LOG2E if cap else 1.0,  # cap_out: softcap, in log2 units
        int(window) if window else 0,
    )
    return scalars, dict(HAS_WINDOW=bool(window), HAS_SOFTCAP=bool(cap))


def triton_forward(q, k, v, cu_seqlens, max_seqlen, causal, softmax_scale, window=0, softcap=0.0):
    """(out (total, H, D), lse (H, total) in log2 units)."""
    import torch

    total, heads, head_dim = q.shape
    out = torch.empty_like(q)  # (total, H, D)
    lse = torch.empty(heads, total, device=q.device, dtype=torch.float32)  # (H, total), log2 units
    num_seqs = cu_seqlens.numel() - 1
    if total == 0 or num_seqs == 0 or max_seqlen == 0:
        return out.zero_(), lse.fill_(float("-inf"))
    (qk_scale, cap_in, cap_out, win), flags = _variant(softmax_scale, window, softcap)

    def grid(meta):
        return (triton.cdiv(max_seqlen, meta["BLOCK_M"]), heads, num_seqs)

    _kernel("fwd", flags["HAS_WINDOW"] or flags["HAS_SOFTCAP"])[grid](
        q, k, v, out, lse, cu_seqlens, qk_scale, cap_in, cap_out, win,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        out.stride(0), out.stride(1), lse.stride(0), _seq_bucket(max_seqlen),
        GROUP=heads // k.shape[1], HEAD_DIM=head_dim,
        BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
        IS_CAUSAL=causal, PRECISION=_precision(q.dtype), UPCAST=_upcast(q),
        INDEX64=_index64(max_seqlen, q, k, v, out), **flags,
    )
    return out, lse


def triton_backward(do, q, k, v, out, lse, cu_seqlens, max_seqlen, causal, softmax_scale, window=0, softcap=0.0):
    """(dq, dk, dv) of :func:`triton_forward`."""
    import torch

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
    (qk_scale, cap_in, cap_out, win), flags = _variant(softmax_scale, window, softcap)
    meta = dict(
        GROUP=heads // kv_heads, HEAD_DIM=head_dim,
        BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
        IS_CAUSAL=causal, PRECISION=_precision(q.dtype), UPCAST=_upcast(q),
        INDEX64=_index64(max_seqlen, q, k, v, do, dq, dk, dv), **flags,
    )
    bucket = _seq_bucket(max_seqlen)
    variant = flags["HAS_WINDOW"] or flags["HAS_SOFTCAP"]
    _kernel("dq", variant)[lambda m: (triton.cdiv(max_seqlen, m["BLOCK_M"]), heads, num_seqs)](
        q, k, v, do, dq, lse, delta, cu_seqlens, qk_scale, softmax_scale, cap_in, cap_out, win,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        do.stride(0), do.stride(1), dq.stride(0), dq.stride(1), lse.stride(0), bucket, **meta,
    )
    _kernel("dkdv", variant)[lambda m: (triton.cdiv(max_seqlen, m["BLOCK_N"]), kv_heads, num_seqs)](
        q, k, v, do, dk, dv, lse, delta, cu_seqlens, qk_scale, softmax_scale, cap_in, cap_out, win,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        do.stride(0), do.stride(1), dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1),
        lse.stride(0), bucket, **meta,
    )
    return dq, dk, dv
