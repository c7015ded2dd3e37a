"""Activation offload: the checkpointed layer inputs live in pinned host memory between forward and backward.

With activation checkpointing, what a step keeps on the GPU between forward and backward is one
hidden state per decoder layer (``layers x tokens x hidden`` bf16: 2.7 GB for LLaMA-65B at 2,048
tokens). `enable_activation_offload` wraps each layer's checkpoint call in saved-tensor hooks that
move exactly those inputs to pinned host memory: non-reentrant ``torch.utils.checkpoint`` saves a
layer's inputs through the hooks active *around* it (``_NoopSaveInputs``), while the tensors saved
inside the layer go to checkpoint's own hooks, so nothing else is touched.

Overlap (CUDA): the device-to-host copy runs on a side stream, after the compute stream reaches the
point where the input exists, while the next layer computes (``record_stream`` keeps the caching
allocator from reusing the input's memory until the copy is done). In backward, layers are
recomputed last to first; when one layer's input is brought back, the copy of the next one down
is started on the side stream, so it is ready when its recomputation begins (one layer's input of
extra device memory). transformers 5.2x has ``activation_checkpointing_enable(offload=True)``,
which wraps the same call in ``torch.autograd.graph.save_on_cpu``: correct, but its copies run on
the compute stream (it says so), and the GPU image's transformers 5.17 predates it.

Off by default (recipe ``train.activation_offload: true``); tensors not on CUDA are left alone, so
on a CPU-only machine the switch changes nothing. The planner (`qtulu.plan`) counts the host
buffers as host memory.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from qtulu.errors import QtuluError

__all__ = ["OffloadHooks", "enable_activation_offload", "offload_device_type", "offload_callback", "OffloadError"]

class OffloadError(QtuluError, RuntimeError):
    """Activation offload asked for a model it cannot apply to."""


MIN_BYTES = 1 << 20  # smaller inputs stay where they are (position tables, masks)

# which device's tensors are offloaded; the planner sets "cpu" to offload its fake CPU tensors
offload_device_type = "cuda"


def copy_to_host_async(src: torch.Tensor, host: torch.Tensor, side: "torch.cuda.Stream") -> "torch.cuda.Event":
    """Copy the CUDA tensor ``src`` into pinned ``host`` on stream ``side``, after the current
    stream has produced it; ``src``'s memory is not reused before the copy is done, which the
    returned event marks (also used by `qtulu.train.master_weights` for gradients)."""
    side.wait_stream(torch.cuda.current_stream(src.device))
    with torch.cuda.stream(side):
        host.copy_(src, non_blocking=True)
        src.record_stream(side)
        return side.record_event()


def _host_buffer(t: torch.Tensor) -> torch.Tensor:
    """A host tensor to hold ``t`` (pinned when CUDA is there: asynchronous copies)."""
    return torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=t.device.type == "cuda")


class _Handle:
    __slots__ = ("host", "device", "copied", "prefetched", "ready", "shape", "dtype")

    def __init__(self, host, device, copied, shape, dtype):
        self.host, self.device, self.copied = host, device, copied
        self.prefetched = None
        self.ready = None
        self.shape, self.dtype = shape, dtype


class OffloadHooks(torch.autograd.graph.saved_tensors_hooks):
    """Saved-tensor hooks moving large non-parameter tensors of ``offload_device_type`` to the host."""

    def __init__(self, min_bytes: int = MIN_BYTES) -> None:
        self.min_bytes = min_bytes
        self.pending: list[_Handle] = []  # packed, not yet unpacked: the backward takes them last first
        self._stream = None
        super().__init__(self._pack, self._unpack)

    def _side_stream(self, device):
        if self._stream is None:
            self._stream = torch.cuda.Stream(device)
        return self._stream

    def _pack(self, t: torch.Tensor) -> Any:
        if (
            t.device.type != offload_device_type
            or isinstance(t, torch.nn.Parameter)
            or t.numel() * t.element_size() < self.min_bytes
        ):
            return t
        host = _host_buffer(t)
        copied = None
        if t.device.type == "cuda":
            copied = copy_to_host_async(t, host, self._side_stream(t.device))
        else:
            host.copy_(t)
        h = _Handle(host, t.device, copied, t.shape, t.dtype)
        self.pending.append(h)
        return h

    def _to_device(self, h: _Handle, stream=None) -> torch.Tensor:
        out = torch.empty(h.shape, dtype=h.dtype, device=h.device)
        if h.device.type == "cuda":
            if h.copied is not None:
                (stream or torch.cuda.current_stream(h.device)).wait_event(h.copied)
            out.copy_(h.host, non_blocking=True)
        else:
            out.copy_(h.host)
        return out

    def _unpack(self, h: Any) -> torch.Tensor:
        if not isinstance(h, _Handle):
            return h
        if h in self.pending:
            self.pending.remove(h)
        if h.prefetched is not None:
            out, h.prefetched = h.prefetched, None
            current = torch.cuda.current_stream(h.device)
            current.wait_event(h.ready)
            out.record_stream(current)
        else:
            out = self._to_device(h)
        if self.pending and h.device.type == "cuda":
            nxt = self.pending[-1]  # the next layer down: recomputed next
            if nxt.prefetched is None:
                side = self._side_stream(nxt.device)
                with torch.cuda.stream(side):
                    nxt.prefetched = self._to_device(nxt, side)
                    nxt.ready = side.record_event()
        return out


def _wrap(checkpoint_fn, hooks: OffloadHooks):
    if getattr(checkpoint_fn, "_qtulu_offload", None) is not None:
        return checkpoint_fn

    @functools.wraps(checkpoint_fn)
    def offloaded(function, *args, **kwargs):
        with hooks:
            return checkpoint_fn(function, *args, **kwargs)

    offloaded._qtulu_offload = hooks
    return offloaded


def enable_activation_offload(model: torch.nn.Module, min_bytes: int = MIN_BYTES) -> int:
    """Offload the inputs of every checkpointed layer of ``model``; returns how many layers.

    Call after activation checkpointing is on (``qtulu train`` does it when training starts).
    Idempotent. Requires non-reentrant checkpointing (qtulu's and transformers' default).
    """
    hooks = None
    n = 0
    for m in model.modules():
        fn = getattr(m, "_gradient_checkpointing_func", None)
        if fn is None or not getattr(m, "gradient_checkpointing", False):
            continue
        if hooks is None:
            hooks = getattr(fn, "_qtulu_offload", None) or OffloadHooks(min_bytes)
        m._gradient_checkpointing_func = _wrap(fn, hooks)
        n += 1
    return n


def offload_callback():
    """A ``TrainerCallback`` turning the offload on when training starts (after HF Trainer has
    enabled activation checkpointing on the model)."""
    from transformers import TrainerCallback

    class _Offload(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            if model is not None and enable_activation_offload(model) == 0:
                raise OffloadError("train.activation_offload: the model has no checkpointed layers to offload "
                                 "(train.gradient_checkpointing must be true)")

    return _Offload()
