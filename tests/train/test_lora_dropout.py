"""LoRA dropout without a saved copy (qtulu.train.lora_dropout): peft's maths, less memory.

The reference is peft's own ``lora.Linear`` with ``nn.Dropout`` (peft 0.21, tuners/lora/layer.py
``Linear.forward``: ``lora_B(lora_A(dropout(x))) * scaling``): on the CPU the recompute version
draws the same masks from the same random stream, so a whole training step (gradient
checkpointing included) must give the same loss and the same gradients.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from qtulu.train.lora_dropout import DropoutLoraA, dropout_lora_a, use_recompute_dropout


def _peft_model(dropout: float, seed: int = 0, checkpointing: bool = True):
    from qtulu.model.load import attach_lora
    from qtulu.recipes import LoraSpec
    from qtulu.model.tiny import build_tiny_llama

    base = build_tiny_llama(seed, vocab_size=96)
    torch.manual_seed(seed)
    model = attach_lora(base, LoraSpec(r=4, alpha=8, dropout=dropout), gradient_checkpointing=checkpointing)
    for n, p in model.named_parameters():  # lora_B starts at 0: give it values so every grad is non-trivial
        if "lora_B" in n:
            with torch.no_grad():
                p.normal_(0, 0.05)
    model.train()
    return model


def _step(model, seed: int):
    torch.manual_seed(seed)
    ids = torch.randint(4, 96, (2, 24))
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return out.loss.detach(), grads


@pytest.mark.parametrize("checkpointing", [True, False])
def test_step_equals_peft_dropout_bit_for_bit_on_cpu(checkpointing):
    ref = _peft_model(0.3, checkpointing=checkpointing)
    ours = copy.deepcopy(ref)
    assert use_recompute_dropout(ours) == 14  # 7 linears x 2 layers
    assert not any(isinstance(m, nn.Dropout) for m in ours.modules())
    loss_ref, g_ref = _step(ref, seed=5)
    loss_ours, g_ours = _step(ours, seed=5)
    assert torch.equal(loss_ref, loss_ours)
    assert g_ref.keys() == g_ours.keys()
    for n in g_ref:
        assert torch.equal(g_ref[n], g_ours[n]), n
    # and a different seed gives different masks, hence a different loss (the dropout is live)
    loss_other, _ = _step(ours, seed=6)
    ref_other, _ = _step(ref, seed=6)
    assert torch.equal(loss_other, ref_other)


def test_eval_mode_and_state_dict_are_peft_s():
    ref = _peft_model(0.5, checkpointing=False)
    ours = copy.deepcopy(ref)
    use_recompute_dropout(ours)
    assert ref.state_dict().keys() == ours.state_dict().keys()
    ref.eval(), ours.eval()
    ids = torch.randint(4, 96, (1, 16))
    with torch.no_grad():
        assert torch.equal(ref(input_ids=ids).logits, ours(input_ids=ids).logits)


def test_saves_only_the_input_weight_and_rng_state():
    x = torch.randn(8, 32, requires_grad=True)
    w = torch.randn(4, 32, requires_grad=True)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = dropout_lora_a(x, w, 0.25)
    assert y.shape == (8, 4)
    big = [t for t in saved if t.is_floating_point() and t.numel() >= x.numel()]
    assert len(big) == 1 and big[0] is x  # not a dropped copy, not a mask
    assert [t.dtype for t in saved if not t.is_floating_point()] == [torch.uint8]  # the CPU generator state
    # peft's path keeps the dropped copy and the (float) mask on top
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        nn.functional.linear(nn.functional.dropout(x, 0.25, training=True), w)
    assert sum(t.is_floating_point() and t.numel() >= x.numel() and t is not x for t in saved) >= 1


def test_autocast_path_matches_fp32_dropout_then_cast():
    """Under (CPU) autocast the mask path gives what peft + autocast give on CUDA for the same mask:
    fp32 dropout as CUDA's fused kernel computes it, x * mask * (1 / (1 - p)), then autocast's bf16
    cast and a bf16 matmul."""
    torch.manual_seed(0)
    x = torch.randn(16, 64, dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(8, 64, requires_grad=True)
    p = 0.1
    state = torch.get_rng_state()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = dropout_lora_a(x, w, p)
    y.float().sum().backward()
    torch.set_rng_state(state)
    keep = torch.empty(x.shape, dtype=torch.bfloat16).bernoulli_(1 - p)
    x2 = x.detach().clone().requires_grad_(True)
    w2 = w.detach().clone().requires_grad_(True)
    xd = x2.float() * keep.float() * (1.0 / (1 - p))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y2 = nn.functional.linear(xd, w2)
    y2.float().sum().backward()
    assert y.dtype == y2.dtype == torch.bfloat16
    assert torch.equal(y, y2)
    assert torch.equal(w.grad, w2.grad)
    assert torch.equal(x.grad, x2.grad)


def test_module_is_an_nn_linear_sharing_the_weight():
    lin = nn.Linear(16, 4, bias=False)
    mod = DropoutLoraA(lin, 0.2)
    assert isinstance(mod, nn.Linear) and mod.weight is lin.weight
    mod.eval()
    x = torch.randn(3, 16)
    assert torch.equal(mod(x), lin(x))


def _live_bf16_copies_of_lora_b(model) -> int:
    """bf16 casts of an fp32 ``lora_B`` weight still alive when the forward has returned (still inside
    autocast: autocast's weight cache lives until the autocast region ends)."""
    import gc
    import weakref

    from torch.utils._python_dispatch import TorchDispatchMode

    b_weights = {id(p) for n, p in model.named_parameters() if "lora_B" in n}
    refs = []

    class Watch(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func is torch.ops.aten._to_copy.default and id(args[0]) in b_weights and out.dtype == torch.bfloat16:
                refs.append(weakref.ref(out))
            return out

    ids = torch.randint(4, 96, (1, 24))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with Watch():
            out = model(input_ids=ids, labels=ids)
        gc.collect()
        alive = sum(r() is not None for r in refs)
    out.loss.backward()
    return alive


def test_lora_b_autocast_copies_avoided_same_gradients():
    """peft's ``lora_B`` under autocast keeps a cached bf16 copy of each fp32 weight to the end of the
    forward; `CastPerUseLoraB` keeps none, and the step's loss and gradients stay bit for bit."""
    ref = _peft_model(0.0)
    ours = copy.deepcopy(ref)
    use_recompute_dropout(ours)
    assert sum(isinstance(m, nn.Linear) and type(m).__name__ == "CastPerUseLoraB" for m in ours.modules()) == 14
    assert _live_bf16_copies_of_lora_b(ref) == 14  # one per lora_B: 7 linears x 2 layers
    assert _live_bf16_copies_of_lora_b(ours) == 0
    for m in (ref, ours):
        m.zero_grad(set_to_none=True)
    torch.manual_seed(3)
    ids = torch.randint(4, 96, (2, 24))
    losses, grads = [], []
    for m in (ref, ours):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = m(input_ids=ids, labels=ids).loss
        loss.backward()
        losses.append(loss.detach())
        grads.append({n: p.grad.clone() for n, p in m.named_parameters() if p.requires_grad})
    assert torch.equal(*losses)
    for n in grads[0]:
        assert torch.equal(grads[0][n], grads[1][n]), n
