"""Torch intra-op threads sized to the model and to the cores nobody else is using.

Two measurements decide it (2-core VM, docs/benchmarks.md):

* On a model of ~100k parameters every matmul is a few microseconds of work: more intra-op
  threads only add synchronisation. One tiny QLoRA step took 27.6 s wall with torch's default 2
  threads against 2.8 s with 1 while another process was busy (issue 19). Below ~20M parameters:
  one thread.
* On SmolLM2-135M (the ``cpu`` preset's step, `benchmarks/bench_smollm2_cpu.py`) two threads win
  when both cores are free (2.60 s against 4.03 s a step) and lose badly beside one busy process
  (7.18 s against 3.15 s): a thread that waits for a core it does not get stalls every parallel
  region. So a larger model gets one thread per core that is idle when the run starts
  (`free_cores`, read from ``/proc/stat`` over a quarter of a second), at least one, at most the
  cores this process may run on.

``fitted_threads(model)`` sets them for a block and restores them after (train's optimizer steps);
``fit_threads(model)`` sets them for the rest of the process (the eval CLI). Neither does anything
when the user chose: ``OMP_NUM_THREADS`` set in the environment, or ``QTULU_THREADS=N`` (forces N).
"""

from __future__ import annotations

import contextlib
import os
import time

SMALL_MODEL_PARAMS = 20_000_000  # below this, one intra-op thread is fastest (module docstring)
SAMPLE_S = 0.25  # how long free_cores watches /proc/stat


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not Linux
        return max(1, os.cpu_count() or 1)


def _cpu_times() -> tuple[int, int] | None:
    """``(busy, total)`` jiffies of all CPUs from ``/proc/stat``; None where there is none."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    if len(fields) < 5:
        return None
    idle = fields[3] + fields[4]  # idle + iowait
    total = sum(fields[:8])  # user nice system idle iowait irq softirq steal (guest is inside user)
    return total - idle, total


def free_cores(interval: float = SAMPLE_S) -> int | None:
    """Cores idle over the next ``interval`` seconds (this process sleeps meanwhile); None if unknown."""
    a = _cpu_times()
    time.sleep(interval)
    b = _cpu_times()
    if a is None or b is None or b[1] <= a[1]:
        return None
    busy_share = (b[0] - a[0]) / (b[1] - a[1])  # of all the machine's CPUs
    n_cpus = os.cpu_count() or 1
    return max(0, n_cpus - int(busy_share * n_cpus + 0.5))  # half a busy core counts as busy


def threads_for(n_params: int) -> int:
    """Intra-op threads for a model of ``n_params`` (module docstring): 1 for a small model, else the free cores."""
    forced = os.environ.get("QTULU_THREADS")
    if forced:
        return max(1, int(forced))
    if n_params < SMALL_MODEL_PARAMS:
        return 1
    usable = usable_cores()
    free = free_cores()
    return usable if free is None else max(1, min(usable, free))


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
    """`fit_threads` for the duration of a block (yields the count); torch's previous setting is restored after."""
    import torch

    before = torch.get_num_threads()
    n = fit_threads(model)
    try:
        yield n
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)
