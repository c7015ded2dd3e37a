"""Backend dispatch for qtulu's kernels, in one place.

``backend="auto"`` picks Triton for CUDA tensors and the plain-torch reference elsewhere;
``"triton"`` forces the Triton kernels (on CPU tensors this needs ``TRITON_INTERPRET=1`` set
before triton is imported); ``"torch"`` forces the reference.
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch

BACKENDS = ("auto", "triton", "torch")


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def resolve_backend(backend: str, *tensors: torch.Tensor) -> str:
    """Return "triton" or "torch" for a kernel call on ``tensors``.

    Raises ``ValueError`` for an unknown name and ``RuntimeError`` when "triton" is asked for
    but cannot run on these tensors.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    on_cuda = bool(tensors) and all(t.is_cuda for t in tensors if isinstance(t, torch.Tensor))
    if backend == "torch":
        return "torch"
    if backend == "auto":
        return "triton" if on_cuda and triton_available() else "torch"
    if not triton_available():
        raise RuntimeError("backend='triton' needs the `triton` package: pip install triton")
    if not on_cuda and not triton_interpreting():
        raise RuntimeError(
            "backend='triton' on CPU tensors needs TRITON_INTERPRET=1 set before triton is imported"
        )
    return "triton"
