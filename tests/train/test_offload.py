"""Activation offload (qtulu.train.offload): the checkpointed layer inputs go to the host and come back.

On this machine there is no CUDA, so the hooks are pointed at CPU tensors (``offload_device_type``):
the copies are then synchronous, but the packing, the order of the round trips (last layer first,
with the next one "prefetched"), and the identity of what is offloaded are the ones a GPU run uses.
The loss and every gradient must be unchanged.
"""

from __future__ import annotations

import copy

import pytest
import torch

import qtulu.train.offload as offload


def _model(seed=0):
    from qtulu.model.load import attach_lora
    from qtulu.recipes import LoraSpec
    from qtulu.model.tiny import build_tiny_llama

    base = build_tiny_llama(seed, vocab_size=96, num_hidden_layers=3)
    torch.manual_seed(seed)
    model = attach_lora(base, LoraSpec(r=4, alpha=8, dropout=0.0), gradient_checkpointing=True)
    for n, p in model.named_parameters():
        if "lora_B" in n:
            with torch.no_grad():
                p.normal_(0, 0.05)
    model.train()
    return model


def _step(model):
    torch.manual_seed(1)
    ids = torch.randint(4, 96, (2, 40))
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_offloaded_step_equals_plain_step(monkeypatch):
    monkeypatch.setattr(offload, "offload_device_type", "cpu")
    ref = _model()
    ours = copy.deepcopy(ref)
    assert offload.enable_activation_offload(ours, min_bytes=0) >= 3
    assert offload.enable_activation_offload(ours, min_bytes=0) >= 3  # idempotent: wrapped once
    hooks = ours.get_base_model().model.layers[0]._gradient_checkpointing_func._qtulu_offload
    packed, unpacked = [], []
    pack, unpack = hooks._pack, hooks._unpack

    def recording_pack(t):
        h = pack(t)
        if h is not t:
            packed.append(tuple(t.shape))
        return h

    hooks.pack_hook = recording_pack
    hooks.unpack_hook = lambda h: (unpacked.append(h) if isinstance(h, offload._Handle) else None, unpack(h))[1]

    loss_ref, g_ref = _step(ref)
    loss_ours, g_ours = _step(ours)
    assert torch.equal(loss_ref, loss_ours)
    for n in g_ref:
        assert torch.equal(g_ref[n], g_ours[n]), n
    # exactly the three checkpointed layer inputs (batch, seq, hidden) went to the host and came back
    assert packed == [(2, 40, 64)] * 3
    assert len(unpacked) == 3 and hooks.pending == []


def test_cpu_tensors_are_left_alone_by_default():
    assert offload.offload_device_type == "cuda"
    hooks = offload.OffloadHooks(min_bytes=0)
    t = torch.randn(64, 64)
    assert hooks._pack(t) is t


@pytest.mark.parametrize("min_bytes", [1 << 30])
def test_small_tensors_and_parameters_stay(monkeypatch, min_bytes):
    monkeypatch.setattr(offload, "offload_device_type", "cpu")
    hooks = offload.OffloadHooks(min_bytes=0)
    p = torch.nn.Parameter(torch.randn(8, 8))
    assert hooks._pack(p) is p
    small = offload.OffloadHooks(min_bytes=min_bytes)
    t = torch.randn(8, 8)
    assert small._pack(t) is t
    h = hooks._pack(t)
    assert isinstance(h, offload._Handle) and h.host is not t
    back = hooks._unpack(h)
    assert torch.equal(back, t) and back.data_ptr() != t.data_ptr()
