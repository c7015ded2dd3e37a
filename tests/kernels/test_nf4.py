"""NF4 format parity with bitsandbytes, and the Triton dequant-GEMM (forward and dX) against a
float64 reference, under TRITON_INTERPRET=1 on the CPU (set by tests/conftest.py)."""

from __future__ import annotations

import pytest
import torch

from qtulu.kernels.nf4 import (
    NF4State,
    bnb_codes_and_state,
    dequantize_absmax,
    dequantize_nf4,
    dynamic_map,
    nf4_matmul,
    quantize_nf4,
)

bnbF = pytest.importorskip("bitsandbytes.functional", reason="bitsandbytes is the format reference")

DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def _weight(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * 0.02
    w.view(-1)[:64] = 0.0  # an all-zero block: absmax 0, bnb stores code 7
    w.view(-1)[100] = 0.5  # an outlier block
    return w.to(dtype)


# ----------------------------------------------------------------------------------------------
# format: bit-identical to bitsandbytes both ways
# ----------------------------------------------------------------------------------------------


def test_dynamic_map_matches_bitsandbytes():
    assert torch.equal(dynamic_map(), bnbF.create_dynamic_map())


# (7, 131): odd element count (a padded nibble); bnb compiles its odd-shape dequantize with
# torch.compile (seconds per dtype), so that shape runs for one dtype only
@pytest.mark.parametrize(
    "dtype,shape",
    [(dt, sh) for dt in DTYPES for sh in [(320, 192), (66, 130)]] + [(torch.float16, (7, 131))],
    ids=str,
)
@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "dq"])
def test_quantize_matches_bitsandbytes(dtype, double_quant, shape, bnb_dequantize):
    w = _weight(shape, dtype)
    packed, st = quantize_nf4(w, blocksize=64, double_quant=double_quant)
    bp, bs = bnbF.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=double_quant)
    assert packed.dtype == torch.uint8 and packed.shape == bp.shape
    assert torch.equal(packed, bp)
    assert torch.equal(st.absmax, bs.absmax)
    assert st.nested == bs.nested
    if double_quant:
        assert torch.equal(st.offset, bs.offset)
        assert torch.equal(st.absmax2, bs.state2.absmax)
        assert torch.equal(st.code2, bs.state2.code)
    # qtulu dequantizes bnb's bits, bnb dequantizes qtulu's: identical values, original dtype
    ours = dequantize_nf4(bp, NF4State.from_bnb(bs))
    theirs = bnb_dequantize(packed, st.to_bnb())  # bnb's portable dequantizer: see conftest
    assert ours.dtype == dtype and ours.shape == shape
    assert torch.equal(ours, theirs)
    assert torch.equal(ours, bnb_dequantize(bp, bs))


def test_nan_and_blocksize_128_match_bitsandbytes(bnb_dequantize):
    w = _weight((64, 96), torch.float32)
    w[3, 5] = float("nan")
    for dq in (False, True):
        packed, st = quantize_nf4(w, blocksize=128, double_quant=dq)
        bp, bs = bnbF.quantize_4bit(w, blocksize=128, quant_type="nf4", compress_statistics=dq)
        assert torch.equal(packed, bp)
        assert torch.equal(st.absmax, bs.absmax) or torch.equal(st.absmax.isnan(), bs.absmax.isnan())
        a, b = dequantize_nf4(packed, st), bnb_dequantize(bp, bs)
        assert torch.equal(a.isnan(), b.isnan())
        assert torch.equal(a.nan_to_num(), b.nan_to_num())


@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "dq"])
def test_reads_a_layer_bitsandbytes_repacked_for_its_cpu_kernel(double_quant):
    """bitsandbytes on an AVX512-BF16 CPU repacks a Linear4bit in place at its first eval forward
    (conftest). qtulu reads such a layer back: the same codes, the absmax bnb now computes with
    (bf16-rounded, single level), the same weights as the standard layout with that absmax. The
    repack is bnb's own function, so this runs on any CPU."""
    import copy

    w = _weight((96, 192), torch.float32)
    bp, bs = bnbF.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=double_quant)
    plain_absmax = dequantize_absmax(NF4State.from_bnb(bs))  # fp32, one per block of 64
    tiles, qs = bnbF._convert_weight_packed_for_cpu(bp.clone(), copy.deepcopy(bs))
    assert qs.packing_format_for_cpu and tiles.shape == (96, 96)
    with pytest.raises(ValueError, match="repacked"):
        NF4State.from_bnb(qs)
    codes, st, repacked = bnb_codes_and_state(tiles, qs)
    assert repacked and not st.nested and st.dtype == torch.float32
    assert torch.equal(codes, bp)  # the tile permutation undone exactly
    assert torch.equal(st.absmax, plain_absmax.bfloat16().float())
    want = dequantize_nf4(bp, NF4State(absmax=st.absmax, shape=w.shape, dtype=torch.float32, blocksize=64))
    assert torch.equal(dequantize_nf4(codes, st), want)
    _, _, again = bnb_codes_and_state(bp, bs)  # a standard layer: as it is
    assert not again


def test_state_roundtrips_and_validation():
    w = _weight((96, 64), torch.bfloat16)
    packed, st = quantize_nf4(w)
    back = NF4State.from_bnb(st.to_bnb())
    back2 = NF4State.from_tensors(st.as_tensors())
    for s in (back, back2):
        assert s.shape == st.shape and s.dtype == st.dtype and s.blocksize == st.blocksize
        assert torch.equal(s.absmax, st.absmax) and torch.equal(s.absmax2, st.absmax2)
        assert torch.equal(dequantize_nf4(packed, s), dequantize_nf4(packed, st))
    with pytest.raises(ValueError, match="blocksize"):
        quantize_nf4(w, blocksize=48)
    with pytest.raises(ValueError, match="bf16/fp16/fp32"):
        quantize_nf4(w.to(torch.float64))
    with pytest.raises(KeyError, match="absmax"):
        NF4State.from_tensors({"quant_map": st.code}, where="model.safetensors:layer.weight")
    fp4p, fp4s = bnbF.quantize_4bit(w, quant_type="fp4")
    with pytest.raises(ValueError, match="nf4"):
        NF4State.from_bnb(fp4s)


# ----------------------------------------------------------------------------------------------
# the matmul: Triton (interpreted) and torch against float64
# ----------------------------------------------------------------------------------------------


def _errors(dtype, m, k, n, bias_on, double_quant=True, seed=0):
    """max-abs errors vs float64 of (triton, torch-same-dtype) for y and dX, and db equality."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.05
    packed, st = quantize_nf4(w.to(dtype), double_quant=double_quant)
    w_q = dequantize_nf4(packed, st, dtype=dtype)  # the weight both paths use, in x's dtype
    x = torch.randn(m, k, generator=g).to(dtype)
    b = (torch.randn(n, generator=g) * 0.1).to(dtype) if bias_on else None
    dy = torch.randn(m, n, generator=g).to(dtype)

    w64, x64 = w_q.double(), x.double()
    y_ref = x64 @ w64.T + (b.double() if bias_on else 0.0)
    dx_ref = dy.double() @ w64

    def run(backend):
        xx = x.clone().requires_grad_(True)
        bb = b.clone().requires_grad_(True) if bias_on else None
        y = nf4_matmul(xx, packed, st, bb, backend=backend)
        y.backward(dy)
        return y, xx.grad, (bb.grad if bias_on else None)

    y_t, dx_t, db_t = run("triton")
    assert y_t.dtype == dtype and dx_t.dtype == dtype
    err = lambda a, ref: (a.double() - ref).abs().max().item()  # noqa: E731
    # plain torch in the same dtype; its CPU GEMM blocks K differently on one thread and on several
    # (a test that set one thread changed the baseline by 2x in fp32), so its error is the larger of both
    plain_y, plain_dx = 0.0, 0.0
    threads = torch.get_num_threads()
    try:
        for n_threads in sorted({1, max(threads, 2)}):
            torch.set_num_threads(n_threads)
            plain_y = max(plain_y, err(torch.nn.functional.linear(x, w_q, b), y_ref))
            plain_dx = max(plain_dx, err(dy @ w_q, dx_ref))
    finally:
        torch.set_num_threads(threads)
    if bias_on:
        assert torch.allclose(db_t.double(), dy.double().sum(0), rtol=1e-2, atol=1e-2)
    return (err(y_t, y_ref), plain_y), (err(dx_t, dx_ref), plain_dx)


def _assert_within(pair, dtype, what):
    ours, plain = pair
    tiny = torch.finfo(dtype).tiny  # plain torch can be exact on tiny cases
    assert ours <= 2 * plain + tiny, f"{what}: triton err {ours:.3e} > 2x torch err {plain:.3e}"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("m", [1, 7, 33, 130])
@pytest.mark.parametrize("bias_on", [False, True], ids=["nobias", "bias"])
def test_triton_matches_float64_192x320(dtype, m, bias_on):
    fwd, bwd = _errors(dtype, m, k=192, n=320, bias_on=bias_on, seed=m)
    _assert_within(fwd, dtype, "forward")
    _assert_within(bwd, dtype, "dX")


@pytest.mark.parametrize(
    "dtype,m", [(torch.bfloat16, 7), (torch.float16, 7), (torch.float32, 7), (torch.bfloat16, 33)], ids=str
)
def test_triton_matches_float64_256x704(dtype, m):
    fwd, bwd = _errors(dtype, m, k=256, n=704, bias_on=True, seed=100 + m)
    _assert_within(fwd, dtype, "forward")
    _assert_within(bwd, dtype, "dX")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("m", [3, 40])
def test_triton_odd_in_features_and_plain_absmax(dtype, m):
    # in=131: quant blocks and packed bytes straddle rows; absmax not double-quantized
    fwd, bwd = _errors(dtype, m, k=131, n=67, bias_on=True, double_quant=False, seed=7)
    _assert_within(fwd, dtype, "forward")
    _assert_within(bwd, dtype, "dX")


def test_nf4_matmul_batched_shapes_and_errors():
    w = torch.randn(48, 32) * 0.1
    packed, st = quantize_nf4(w)
    x = torch.randn(2, 3, 32)
    y = nf4_matmul(x, packed, st, backend="torch")
    assert y.shape == (2, 3, 48)
    torch.testing.assert_close(y, x @ dequantize_nf4(packed, st, torch.float32).T)
    with pytest.raises(ValueError, match="features"):
        nf4_matmul(torch.randn(2, 31), packed, st)
    with pytest.raises(ValueError, match="bias"):
        nf4_matmul(x, packed, st, bias=torch.zeros(47))
    with pytest.raises(ValueError, match="backend"):
        nf4_matmul(x, packed, st, backend="cuda")


def test_custom_op_opcheck_and_compile():
    w = torch.randn(40, 24) * 0.1
    packed, st = quantize_nf4(w)
    x = torch.randn(5, 24, requires_grad=True)
    b = torch.randn(40, requires_grad=True)
    from qtulu.kernels.nf4 import _state_args

    args = (x, packed, *_state_args(st), b, 40, 24, st.blocksize, st.blocksize2, "torch")
    torch.library.opcheck(torch.ops.qtulu.nf4_matmul.default, args)

    def f(x, b):
        return nf4_matmul(x, packed, st, b, backend="torch").square().sum()

    eager = f(x, b)
    gx, gb = torch.autograd.grad(eager, (x, b))
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    out = compiled(x, b)
    cgx, cgb = torch.autograd.grad(out, (x, b))
    torch.testing.assert_close(out, eager)
    torch.testing.assert_close(cgx, gx)
    torch.testing.assert_close(cgb, gb)


_COMPILE_SCRIPT = r"""
import qtulu.bench.compile as ck  # sets TRITON_INTERPRET aside before triton is imported

seen = set()
for label, fn, sig, consts, cfg, extra, aligned in ck.nf4_cases("bfloat16"):
    if label in seen:  # the first GPU config of each path (small, tiled) and direction (fwd, dX)
        continue
    seen.add(label)
    options = {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages, **extra}
    k = ck._compile(fn, sig, consts, 90, options, aligned)
    assert "mma" in k.asm["ptx"], f"{label}: no tensor-core instruction in the PTX"
print("compiled")
"""


def test_triton_kernel_compiles_for_sm90():
    """The kernel is only *run* under the interpreter here; this compiles it to PTX/cubin for an
    H100 (sm_90) with triton's bundled ptxas, so a GPU-only compile error cannot hide."""
    import os
    import subprocess
    import sys

    triton = pytest.importorskip("triton")
    from pathlib import Path

    if not (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas").exists():
        pytest.skip("triton's bundled ptxas is absent: cannot compile for CUDA on this machine")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(Path(os.environ.get("TMPDIR", "/tmp")) / "qtulu-triton-cache-test")
    res = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT], env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0 and "compiled" in res.stdout, res.stderr[-3000:]
