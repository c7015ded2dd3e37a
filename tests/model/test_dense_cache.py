"""The NF4 base held dequantized on the CPU (qtulu.model.dense_cache) computes what the per-matmul path does."""

from __future__ import annotations

import pytest
import torch

from qtulu.model.dense_cache import dense_plan, dense_weights
from qtulu.model.quant import Linear4bit


def _layer(dtype, bias, seed=0):
    g = torch.Generator().manual_seed(seed)
    lin = torch.nn.Linear(67, 45, bias=bias)  # odd shapes: a block straddles rows
    with torch.no_grad():
        lin.weight.copy_(torch.randn(45, 67, generator=g))
        if bias:
            lin.bias.copy_(torch.randn(45, generator=g))
    return Linear4bit.from_linear(lin, compute_dtype=dtype, backend="torch")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [True, False])
def test_outputs_and_input_grads_equal_the_per_matmul_path(dtype, bias):
    layer = _layer(dtype, bias)
    x = torch.randn(3, 5, 67, generator=torch.Generator().manual_seed(1)).to(dtype).requires_grad_()
    y_ref = layer(x)
    (g_ref,) = torch.autograd.grad(y_ref.float().square().sum(), x)
    with dense_weights(layer) as held:
        assert held == 45 * 67 * torch.finfo(dtype).bits // 8
        assert layer._dense is not None and layer._dense.dtype == dtype
        y = layer(x)
        (g,) = torch.autograd.grad(y.float().square().sum(), x)
    assert layer._dense is None  # released after the block
    assert torch.equal(y, y_ref)  # the same F.linear on the same dequantized values
    torch.testing.assert_close(g, g_ref, rtol=0, atol=0)


def test_nested_blocks_keep_the_outer_copy_and_the_switch_turns_it_off(monkeypatch):
    layer = _layer(torch.float32, True)
    with dense_weights(layer) as outer:
        with dense_weights(layer) as inner:
            assert outer > 0 and inner == 0
        assert layer._dense is not None  # the inner block did not release the outer one's copy
    monkeypatch.setenv("QTULU_DENSE_CPU", "0")
    with dense_weights(layer) as held:
        assert held == 0 and layer._dense is None


def test_too_big_for_the_available_memory_is_left_quantized(monkeypatch):
    from qtulu.model import dense_cache

    layer = _layer(torch.float32, False)
    _, size = dense_plan(layer)
    monkeypatch.setattr(dense_cache, "_available_bytes", lambda: int(size / dense_cache.DENSE_SHARE) - 1)
    with dense_weights(layer) as held:
        assert held == 0 and layer._dense is None
    monkeypatch.setattr(dense_cache, "_available_bytes", lambda: int(size / dense_cache.DENSE_SHARE) + 1)
    with dense_weights(layer) as held:
        assert held == size
