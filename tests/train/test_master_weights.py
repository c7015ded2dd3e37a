"""fp32 master LoRA weights on the host (qtulu.train.master_weights): the same training, less device memory.

Reference: the usual set-up, fp32 LoRA weights on the device (peft's default) with their fp32
gradients and the optimizer there, under bf16 autocast as HF Trainer runs a GPU step (CPU autocast
here). With host masters the device holds bf16 copies: the forward sees the same bf16 weights
(autocast would cast the fp32 ones to exactly these), the micro-batch gradients have the same bf16
values and are summed in fp32 on the host. Two optimizer steps of two micro-batches each, with
clipping, must give the same losses and the same fp32 weights, bit for bit: with peft's dropout 0.1
too (the dropout must see the fp32 input and draw the same mask in both set-ups:
`HostMaster.match_input_casts`), and with qtulu's recompute dropout.
"""

from __future__ import annotations

import copy

import pytest
import torch

from qtulu.train.master_weights import MASTER_FILE, HostMaster, host_optimizer_name
from qtulu.plan.step import run_step


def _model(dropout=0.0, impl="peft"):
    from qtulu.model.load import attach_lora
    from qtulu.model.quant import quantize_model_
    from qtulu.recipes import LoraSpec
    from qtulu.model.tiny import build_tiny_llama

    base = build_tiny_llama(0, vocab_size=96)
    quantize_model_(base, compute_dtype=torch.bfloat16)
    base.to(torch.bfloat16)
    torch.manual_seed(0)
    model = attach_lora(base, LoraSpec(r=4, alpha=8, dropout=dropout), gradient_checkpointing=True)
    if impl == "recompute":
        from qtulu.train.lora_dropout import use_recompute_dropout

        assert use_recompute_dropout(model) > 0
    model.train()
    return model


def _batches():
    g = torch.Generator().manual_seed(3)
    return [{"input_ids": (ids := torch.randint(4, 96, (1, 48), generator=g)), "labels": ids.clone()} for _ in range(2)]


def _loss(model, batch, num_items):
    return model(**batch, num_items_in_batch=num_items).loss


@pytest.mark.parametrize("autocast,dropout,impl", [
    (torch.bfloat16, 0.0, "peft"), (None, 0.0, "peft"),
    (torch.bfloat16, 0.1, "peft"), (None, 0.1, "peft"), (torch.bfloat16, 0.1, "recompute"),
])
def test_two_steps_equal_device_masters_bit_for_bit(autocast, dropout, impl):
    ref = _model(dropout, impl)
    host_model = copy.deepcopy(ref)
    if autocast is None:  # no autocast: peft's fp32 LoRA compute; the device copies stay fp32
        for m in (ref, host_model):
            m.float()
    params = [p for p in ref.parameters() if p.requires_grad]
    opt_ref = torch.optim.AdamW(params, lr=5e-2, foreach=False)
    master = HostMaster(host_model.named_parameters(), compute_dtype=autocast or torch.float32)
    patched = master.match_input_casts(host_model)
    assert patched == (0 if autocast is None else len(master.params) // 2)  # one per LoRA layer (A and B)
    opt_host = master.attach(torch.optim.AdamW(master.masters, lr=5e-2, foreach=False), max_grad_norm=0.5)
    assert all(p.dtype == (autocast or torch.float32) for p in master.params)
    batches = _batches()
    for step in range(2):
        torch.manual_seed(10 + step)  # the same dropout masks in both runs, other masks each step
        l_ref = run_step(ref, opt_ref, batches, loss_fn=_loss, autocast_dtype=autocast, max_grad_norm=0.5)
        torch.manual_seed(10 + step)
        l_host = run_step(host_model, opt_host, batches, loss_fn=_loss, autocast_dtype=autocast, max_grad_norm=0.5)
        assert [float(x) for x in l_ref] == [float(x) for x in l_host]
        assert all(p.grad is None for p in master.params)  # nothing kept on the "device"
    names = [n for n, p in ref.named_parameters() if p.requires_grad]
    ref_w = dict(ref.named_parameters())
    for n, m in zip(master.names, master.masters):
        assert n in names
        assert torch.equal(m.detach(), ref_w[n].detach().float()), n
        assert m.dtype == torch.float32


def test_checkpoint_file_and_adapter_state(tmp_path):
    model = _model()
    master = HostMaster(model.named_parameters(), compute_dtype=torch.bfloat16)
    with torch.no_grad():
        for m in master.masters:
            m.add_(1e-4)  # below bf16's resolution for most entries: only the masters keep it
    path = master.save(tmp_path / MASTER_FILE)
    other = HostMaster(copy.deepcopy(model).named_parameters(), compute_dtype=torch.bfloat16)
    other.load(path)
    for a, b in zip(master.masters, other.masters):
        assert torch.equal(a, b)
    state = master.adapter_state(model)
    assert state and all(v.dtype == torch.float32 for v in state.values())
    assert all(".default." not in k for k in state)  # peft's saved key names


def test_host_optimizer_is_unpaged():
    assert host_optimizer_name("paged_adamw_8bit") == "adamw_8bit"
    assert host_optimizer_name("adamw_torch") == "adamw_torch"
