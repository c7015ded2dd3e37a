"""Dequantize the NF4 base once for a CPU run instead of at every matmul.

On a GPU the NF4 weight is dequantized tile by tile inside the matmul (the Triton kernel): the
point of QLoRA is that the full-precision weight never exists. On a CPU there is no fused kernel:
`nf4_matmul`'s torch path dequantizes the whole weight and then calls ``F.linear``, at every
forward and again in every backward. For SmolLM2-135M (210 NF4 layers, 106M weights) that
dequantization is ~0.8 s of a ~1 s decoding step and about a third of a training step, on one
core. Holding the dequantized weights (the very values `dequantize_nf4` gives, in the compute
dtype) for the length of a run removes it: outputs are those of the torch path, the base stays NF4
(codes and state unchanged, nothing saved differs), only the memory grows by the dense copy.

So `dense_weights(model)` does it where it pays and fits: CPU tensors only, and only when the dense
copy fits in a quarter of the memory available (``MemAvailable`` in ``/proc/meminfo``; a model too
big for that keeps dequantizing per matmul). ``QTULU_DENSE_CPU=0`` turns it off.
"""

from __future__ import annotations

import contextlib
import os

DENSE_SHARE = 0.25  # at most this share of the available memory goes to the dense copy


def _available_bytes() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def dense_plan(model) -> tuple[list, int]:
    """``(layers, bytes)``: the CPU NF4 layers of ``model`` that would be held dense, and their size."""
    import torch

    from qtulu.model.quant import Linear4bit

    layers = [m for m in model.modules() if isinstance(m, Linear4bit) and m.weight.device.type == "cpu"]
    size = sum(m.in_features * m.out_features * torch.finfo(m.compute_dtype or torch.float32).bits // 8
               for m in layers)
    return layers, size


@contextlib.contextmanager
def dense_weights(model, *, say=None):
    """Hold ``model``'s CPU NF4 weights dequantized (in their compute dtype) for the block (module docstring).

    Yields the bytes held (0 when nothing was done). ``say``: a function told what was done.
    """
    import torch

    layers, size = dense_plan(model)
    avail = _available_bytes()
    off = os.environ.get("QTULU_DENSE_CPU", "1") == "0"
    held = any(getattr(m, "_dense", None) is not None for m in layers)  # an outer block holds them
    if not layers or off or held or (avail is not None and size > DENSE_SHARE * avail):
        yield 0
        return
    try:
        with torch.no_grad():
            for m in layers:
                m._dense = m.dequantize(m.compute_dtype or torch.float32)
        if say is not None:
            say(f"NF4 base held dequantized for this CPU run: {size / 2**30:.2f} GiB "
                "(no fused kernel on the CPU; QTULU_DENSE_CPU=0 to dequantize at each matmul)")
        yield size
    finally:
        for m in layers:
            m._dense = None
