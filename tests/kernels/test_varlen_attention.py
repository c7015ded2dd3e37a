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

pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")

# CPU: the Triton interpreter (TRITON_INTERPRET=1, set by conftest); with a GPU, the real kernels
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _cu(lens, device=DEVICE):
    cu = [0]
    for n in lens:
        cu.append(cu[-1] + n)
    return torch.tensor(cu, dtype=torch.int32, device=device)


def naive_attention(q, k, v, cu_seqlens, causal=True, scale=None):
    """Plain torch in the inputs' dtype (no fused kernel, no upcast): the error baseline."""
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
        if causal:
            keep = torch.ones(e - s, e - s, dtype=torch.bool, device=q.device).tril()
            scores = scores.masked_fill(~keep, float("-inf"))
        outs.append((scores.softmax(-1) @ vi).transpose(0, 1))  # (L, H, D)
    return torch.cat(outs)


def _run(fn, q, k, v, do):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = fn(q, k, v)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), do)
    return out.detach(), dq, dk, dv


def _check(lens, heads, kv_heads, dim, dtype, causal=True, seed=0):
    torch.manual_seed(seed)
    total = sum(lens)
    cu = _cu(lens)
    q = torch.randn(total, heads, dim, dtype=torch.float64).to(DEVICE)
    k = torch.randn(total, kv_heads, dim, dtype=torch.float64).to(DEVICE)
    v = torch.randn(total, kv_heads, dim, dtype=torch.float64).to(DEVICE)
    do = torch.randn(total, heads, dim, dtype=torch.float64).to(DEVICE)
    low = [t.to(dtype) for t in (q, k, v, do)]
    ref = _run(lambda a, b, c: varlen_attention(a, b, c, cu, max(lens), causal, backend="torch"),
               q, k, v, do)
    ours = _run(lambda a, b, c: varlen_attention(a, b, c, cu, max(lens), causal, backend="triton"),
                *low)
    naive = _run(lambda a, b, c: naive_attention(a, b, c, cu, causal), *low)
    sdpa = _run(lambda a, b, c: varlen_attention(a, b, c, cu, max(lens), causal, backend="torch"),
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
    from qtulu.kernels import varlen_attention as va

    monkeypatch.setattr(va, "INTERPRET_BLOCKS", {"fwd": (64, 32), "dq": (64, 32), "dkdv": (32, 64)})
    monkeypatch.setattr(va, "_TUNED", {})
    _check([1, 17, 100, 129], 4, 2, 32, torch.float32, causal=causal, seed=6)


def test_int64_offsets_path(monkeypatch):
    """Offsets inside a sequence are int32 unless ``max_seqlen x stride`` could overflow; force
    the int64 path (normally only for sequences of ~262k+ tokens) and check it gives the same."""
    from qtulu.kernels import varlen_attention as va

    monkeypatch.setattr(va, "_INDEX32_LIMIT", 1)
    calls = []
    real = va._index64
    monkeypatch.setattr(va, "_index64", lambda *a: calls.append(real(*a)) or calls[-1])
    _check([1, 17, 100, 129], 4, 2, 32, torch.bfloat16, seed=3)
    assert calls and all(calls), "the int64 path was not taken"


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
    torch.library.opcheck(_varlen_fwd_op, (q, k, v, cu, 5, True, 0.25),
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
