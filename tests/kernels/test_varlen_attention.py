"""Varlen (packed) attention: Triton kernel vs a float64 reference, forward and dq/dk/dv.

Tolerance follows flash-attention's tests: the kernel's max error against a float64 reference
must be at most twice that of plain torch attention computed in the same dtype, plus twice the
rounding error of representing the reference's values in that dtype (flash-attention's own
``atol`` term). "Plain torch" is the worse of torch's two usual implementations in that dtype:
``scaled_dot_product_attention`` (on CPU it accumulates half types in fp32, which a GPU flash
kernel that rounds P and dS to bf16 cannot match) and matmul-softmax-matmul (which, for rows with
two keys, gets a softmax gradient nearly exact that the FlashAttention-2 ``delta = rowsum(dO*O)``
identity only gets to within a few ulps).
"""

from __future__ import annotations

import math

import pytest
import torch

from qtulu.kernels.varlen_attention import varlen_attention, varlen_attention_torch

triton = pytest.importorskip("triton")
tl = triton.language
from qtulu.kernels.varlen_attention_triton import _tanh  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")

# CPU: the Triton interpreter (TRITON_INTERPRET=1, set by conftest); with a GPU, the real kernels
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _cu(lens, device=DEVICE):
    cu = [0]
    for n in lens:
        cu.append(cu[-1] + n)
    return torch.tensor(cu, dtype=torch.int32, device=device)


def naive_attention(q, k, v, cu_seqlens, causal=True, scale=None, window=None, softcap=None):
    """Plain torch in the inputs' dtype (no fused kernel, no upcast): the error baseline, and in
    float64 the independent oracle. Window and softcap as transformers defines them
    (masking_utils.sliding_window_overlay: ``kv_idx > q_idx - sliding_window``; gemma2's
    eager_attention_forward: ``tanh(scores / softcap) * softcap`` before the mask), transformers 5.24."""
    total, heads, dim = q.shape
    group = heads // k.shape[1]
    scale = 1.0 / math.sqrt(dim) if scale is None else scale
    outs = []
    bounds = cu_seqlens.tolist()
    for s, e in zip(bounds[:-1], bounds[1:]):
        if e == s:
            continue
        qi = q[s:e].transpose(0, 1)  # (H, L, D)
        ki = k[s:e].transpose(0, 1).repeat_interleave(group, 0)  # (H, L, D)
        vi = v[s:e].transpose(0, 1).repeat_interleave(group, 0)  # (H, L, D)
        scores = (qi @ ki.transpose(1, 2)) * scale  # (H, L, L)
        if softcap is not None:
            scores = torch.tanh(scores / softcap) * softcap
        if causal:
            keep = torch.ones(e - s, e - s, dtype=torch.bool, device=q.device).tril()
            if window is not None:
                idx = torch.arange(e - s, device=q.device)
                keep &= idx[None, :] > idx[:, None] - window
            scores = scores.masked_fill(~keep, float("-inf"))
        outs.append((scores.softmax(-1) @ vi).transpose(0, 1))  # (L, H, D)
    return torch.cat(outs)


def _run(fn, q, k, v, do):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = fn(q, k, v)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), do)
    return out.detach(), dq, dk, dv


def _check(lens, heads, kv_heads, dim, dtype, causal=True, seed=0, window=None, softcap=None):
    torch.manual_seed(seed)
    total = sum(lens)
    cu = _cu(lens)
    q = torch.randn(total, heads, dim, dtype=torch.float64).to(DEVICE)
    k = torch.randn(total, kv_heads, dim, dtype=torch.float64).to(DEVICE)
    v = torch.randn(total, kv_heads, dim, dtype=torch.float64).to(DEVICE)
    do = torch.randn(total, heads, dim, dtype=torch.float64).to(DEVICE)
    low = [t.to(dtype) for t in (q, k, v, do)]
    kw = dict(window=window, softcap=softcap)
    ref = _run(lambda a, b, c: varlen_attention(a, b, c, cu, max(lens), causal, backend="torch", **kw),
               q, k, v, do)
    if window is not None or softcap is not None:  # the reference itself, against the oracle
        oracle = _run(lambda a, b, c: naive_attention(a, b, c, cu, causal, **kw), q, k, v, do)
        for r, o in zip(ref, oracle):
            torch.testing.assert_close(r, o, rtol=1e-10, atol=1e-10)
    ours = _run(lambda a, b, c: varlen_attention(a, b, c, cu, max(lens), causal, backend="triton", **kw),
                *low)
    naive = _run(lambda a, b, c: naive_attention(a, b, c, cu, causal, **kw), *low)
    sdpa = _run(lambda a, b, c: varlen_attention(a, b, c, cu, max(lens), causal, backend="torch", **kw),
                *low)
    for name, r, o, p1, p2 in zip(("out", "dq", "dk", "dv"), ref, ours, naive, sdpa):
        assert o.dtype == dtype and o.shape == r.shape
        assert torch.isfinite(o).all(), name
        err = (o.double() - r).abs().max().item()
        err_torch = max((p.double() - r).abs().max().item() for p in (p1, p2))
        rlow = r.to(dtype)
        atol = 2 * ((rlow + 0.3 - 0.3) - rlow).abs().max().item()
        assert err <= 2 * err_torch + atol, (
            f"{name}: kernel error {err:.3g} > 2 x torch's {err_torch:.3g} + {atol:.3g}"
        )


@pytest.mark.parametrize(
    "dtype,heads,kv_heads",
    [
        (torch.float32, 4, 2),
        (torch.bfloat16, 4, 2),
        (torch.float16, 4, 2),
        (torch.bfloat16, 4, 4),
    ],
    ids=["fp32-gqa", "bf16-gqa", "fp16-gqa", "bf16-mha"],
)
def test_causal_matches_reference(dtype, heads, kv_heads):
    _check([1, 17, 100, 129], heads, kv_heads, 32, dtype)


def test_non_causal():
    # (fp32 non-causal runs in test_uneven_tilings)
    _check([1, 17, 100, 129], 4, 2, 32, torch.bfloat16, causal=False)


@pytest.mark.skipif(DEVICE == "cuda", reason="tilings are autotuned on a GPU")
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_uneven_tilings(monkeypatch, causal):
    """The GPU configs' shapes: dK/dV key blocks 2x the query blocks, dQ the other way round."""
    from qtulu.kernels import varlen_attention_triton as va

    monkeypatch.setattr(va, "INTERPRET_BLOCKS", {"fwd": (64, 32), "dq": (64, 32), "dkdv": (32, 64)})
    monkeypatch.setattr(va, "_TUNED", {})
    _check([1, 17, 100, 129], 4, 2, 32, torch.float32, causal=causal, seed=6)


def test_int64_offsets_path(monkeypatch):
    """Offsets inside a sequence are int32 unless ``max_seqlen x stride`` could overflow; force
    the int64 path (normally only for sequences of ~262k+ tokens) and check it gives the same."""
    from qtulu.kernels import varlen_attention_triton as va

    monkeypatch.setattr(va, "_INDEX32_LIMIT", 1)
    calls = []
    real = va._index64
    monkeypatch.setattr(va, "_index64", lambda *a: calls.append(real(*a)) or calls[-1])
    _check([1, 17, 100, 129], 4, 2, 32, torch.bfloat16, seed=3)
    assert calls and all(calls), "the int64 path was not taken"


# ------------------------------------------------------- sliding window and logit softcapping


def test_sliding_window():
    """Mistral/Qwen2-style window, narrower than the tile (13 < 32) and crossing tile edges."""
    _check([1, 17, 70], 4, 2, 32, torch.bfloat16, seed=8, window=13)


def test_softcap():
    """Gemma-2's softcap, small enough (2.0 on unit-variance scores) that tanh bends the scores."""
    _check([1, 17, 70], 4, 2, 32, torch.float32, seed=9, softcap=2.0)


@pytest.mark.skipif(DEVICE == "cuda", reason="tilings are autotuned on a GPU")
def test_window_and_softcap_uneven_tilings(monkeypatch):
    """Both at once (Gemma-2's sliding layers), on the GPU configs' uneven tile shapes; a window
    wider than a query tile plus a key tile (so the loop has masked, unmasked and diagonal
    parts) but shorter than the example."""
    from qtulu.kernels import varlen_attention_triton as va

    monkeypatch.setattr(va, "INTERPRET_BLOCKS", {"fwd": (32, 16), "dq": (32, 16), "dkdv": (16, 32)})
    monkeypatch.setattr(va, "_TUNED", {})
    _check([3, 70], 2, 1, 16, torch.float16, seed=10, window=50, softcap=1.5)


def test_window_of_one_and_wider_than_every_example():
    """window=1: each token sees only itself (out == v); a window >= every length is plain causal."""
    torch.manual_seed(11)
    cu = _cu([5, 9])
    q, k, v = (torch.randn(14, 2, 16).to(DEVICE) for _ in range(3))
    for backend in ("torch", "triton"):
        out = varlen_attention(q, k, v, cu, 9, backend=backend, window=1)
        torch.testing.assert_close(out, v, rtol=1e-6, atol=1e-6)
        wide = varlen_attention(q, k, v, cu, 9, backend=backend, window=9)
        torch.testing.assert_close(wide, varlen_attention(q, k, v, cu, 9, backend=backend), rtol=1e-6, atol=1e-6)


@triton.jit
def _tanh_probe(X, Y, N: tl.constexpr):
    offs = tl.arange(0, N)
    tl.store(Y + offs, _tanh(tl.load(X + offs)))


def test_triton_tanh_accuracy():
    """The kernel's tanh (no tl.tanh runs both compiled and interpreted): <= 2 ulp in fp32."""
    x = torch.cat([torch.linspace(-12, 12, 3905), torch.logspace(-7, 0, 95), -torch.logspace(-7, 0, 96)])
    x = x.to(DEVICE)  # 4096 values (tl.arange wants a power of two)
    y = torch.empty_like(x)
    _tanh_probe[(1,)](x, y, N=x.numel())
    ref = torch.tanh(x.double())
    r32 = ref.float().abs()
    spacing = (torch.nextafter(r32, torch.full_like(r32, float("inf"))) - r32).double()  # 1 ulp at ref
    ulp = (y.double() - ref).abs() / spacing
    assert ulp.max().item() <= 2.0, ulp.max().item()


def test_single_long_sequence_head_dim_64():
    _check([300], 2, 1, 64, torch.bfloat16, seed=1)


def test_head_dim_not_power_of_two():
    _check([3, 40], 2, 1, 48, torch.float32, seed=2)


def test_empty_sequences_in_cu_seqlens():
    torch.manual_seed(3)
    cu = torch.tensor([0, 0, 5, 5, 12], dtype=torch.int32, device=DEVICE)
    q, k, v = (torch.randn(12, 2, 16).to(DEVICE) for _ in range(3))
    ref = varlen_attention_torch(q.double(), k.double(), v.double(), cu)
    out = varlen_attention(q, k, v, cu, 7, backend="triton")
    assert (out.double() - ref).abs().max().item() < 1e-5
    # the two examples are independent: the second equals running it alone
    alone = varlen_attention_torch(q[5:].double(), k[5:].double(), v[5:].double(),
                                   torch.tensor([0, 7], dtype=torch.int32, device=DEVICE))
    torch.testing.assert_close(ref[5:], alone, rtol=0, atol=0)


def test_softmax_scale_and_max_seqlen_none():
    torch.manual_seed(4)
    cu = _cu([9, 4])
    q, k, v = (torch.randn(13, 2, 16, dtype=torch.float64).to(DEVICE) for _ in range(3))
    ref = naive_attention(q, k, v, cu, scale=0.3)
    out = varlen_attention(q.float(), k.float(), v.float(), cu, None, softmax_scale=0.3,
                           backend="triton")
    assert (out.double() - ref).abs().max().item() < 1e-5
    torch.testing.assert_close(varlen_attention(q, k, v, cu, 9, softmax_scale=0.3, backend="torch"),
                               ref, rtol=1e-12, atol=1e-12)


def test_custom_op_registration():
    """Schema, fake (meta) and autograd registration agree with the real kernel."""
    from qtulu.kernels.varlen_attention import _varlen_fwd_op

    torch.manual_seed(5)
    q = torch.randn(8, 2, 16).to(DEVICE).requires_grad_()
    k = torch.randn(8, 1, 16).to(DEVICE).requires_grad_()
    v = torch.randn(8, 1, 16).to(DEVICE).requires_grad_()
    cu = _cu([3, 5])
    torch.library.opcheck(_varlen_fwd_op, (q, k, v, cu, 5, True, 0.25, 3, 4.0),
                          test_utils=("test_schema", "test_autograd_registration",
                                      "test_faketensor"))


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_torch_compile_traces_through_the_kernels():
    """fullgraph: the custom ops (fake + autograd registrations) need no graph break."""
    torch.manual_seed(7)
    cu = _cu([3, 5])
    leaves = [torch.randn(8, h, 16).to(DEVICE).requires_grad_() for h in (2, 1, 1)]
    compiled = torch.compile(lambda q, k, v: varlen_attention(q, k, v, cu, 5, backend="triton"),
                             backend="aot_eager", fullgraph=True)
    out = compiled(*leaves)
    grads = torch.autograd.grad(out.square().sum(), leaves)
    eager = varlen_attention(*leaves, cu, 5, backend="triton")
    eager_grads = torch.autograd.grad(eager.square().sum(), leaves)
    torch.testing.assert_close(out, eager, rtol=0, atol=0)
    for a, b in zip(grads, eager_grads):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_bad_inputs_raise_clear_errors():
    q = torch.randn(6, 4, 16, device=DEVICE)
    kv = torch.randn(6, 3, 16, device=DEVICE)
    cu = _cu([6])
    with pytest.raises(ValueError, match="multiple of kv_heads"):
        varlen_attention(q, kv, kv, cu, 6)
    with pytest.raises(ValueError, match=r"q \(total, heads, head_dim\)"):
        varlen_attention(q[0], kv, kv, cu, 6)
    with pytest.raises(ValueError, match="integer"):
        varlen_attention(q, q, q, cu.float(), 6)
    with pytest.raises(ValueError, match="cu_seqlens\\[-1\\]"):
        varlen_attention(q, q, q, _cu([4]), 4, backend="torch")
    with pytest.raises(ValueError, match="Triton varlen kernel supports"):
        varlen_attention(q.double(), q.double(), q.double(), cu, 6, backend="triton")
    with pytest.raises(ValueError, match="backend must be one of"):
        varlen_attention(q, q, q, cu, 6, backend="cuda")
    with pytest.raises(ValueError, match="window must be a positive int"):
        varlen_attention(q, q, q, cu, 6, window=0)
    with pytest.raises(ValueError, match="only defined for causal"):
        varlen_attention(q, q, q, cu, 6, causal=False, window=3)
    with pytest.raises(ValueError, match="softcap must be a positive"):
        varlen_attention(q, q, q, cu, 6, softcap=float("inf"))
