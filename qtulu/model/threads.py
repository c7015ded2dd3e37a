"""Torch intra-op threads sized to the model: one for a small model, torch's default otherwise.

On a model of ~100k parameters every matmul is a few microseconds of work: more intra-op threads
only add synchronisation, and on a machine whose cores are shared they oversubscribe them. One
tiny QLoRA step took 27.6 s wall with torch's default 2 threads against 2.8 s with 1 while another
process was busy (2 cores, issue 19). Models from ~20M parameters up get torch's default.

``fitted_threads(model)`` sets them for a block and restores them after (train's optimizer steps);
``fit_threads(model)`` sets them for the rest of the process (the eval CLI). Neither does anything
when the user chose: ``OMP_NUM_THREADS`` set in the environment, or ``QTULU_THREADS=N`` (forces N).
"""

from __future__ import annotations

import contextlib
import os

SMALL_MODEL_PARAMS = 20_000_000  # below this, one intra-op thread is fastest (module docstring)


def threads_for(n_params: int) -> int:
    """Intra-op threads for a model of ``n_params``: 1 for a small one, torch's default otherwise."""
    import torch

    forced = os.environ.get("QTULU_THREADS")
    if forced:
        return max(1, int(forced))
    return 1 if n_params < SMALL_MODEL_PARAMS else torch.get_num_threads()


def fit_threads(model) -> int:
    """Set torch's intra-op threads for ``model``'s size (unless the user set them); returns the count."""
    import torch

    if os.environ.get("OMP_NUM_THREADS") and not os.environ.get("QTULU_THREADS"):
        return torch.get_num_threads()
    n = threads_for(sum(p.numel() for p in model.parameters()))
    if n != torch.get_num_threads():
        torch.set_num_threads(n)
    return n


@contextlib.contextmanager
def fitted_threads(model):
    """`fit_threads` for the duration of a block; torch's previous setting is restored after."""
    import torch

    before = torch.get_num_threads()
    fit_threads(model)
    try:
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)
