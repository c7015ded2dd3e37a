"""`qtulu plan --optimize`: the memory switches that lower the peak without changing the maths.

Each switch of `qtulu.plan.settings.REDUCTIONS` is tried in turn on top of those already kept;
it is kept when the planned peak goes down. Candidates are compared on the same model cut to 2
and 3 decoder layers, extrapolated to the full depth: the layers are identical, so the peak of each
window of the step (a phase of one micro-batch) is affine in the depth, ``w(L) = w(2) + (L - 2) x
(w(3) - w(2))``, and the full-depth peak is the largest extrapolated window (`tests/plan/test_plan.py`
checks it against full plans); the winner is then planned in full by the caller. Switches that would change the maths (8-bit optimizer states for a recipe
that asked for 32-bit ones) are measured and reported, never applied.
"""

from __future__ import annotations

import copy
from typing import Any, Callable

from qtulu.plan.settings import REDUCTIONS, PlanSettings

_EXACT_OPTIMIZERS = {"adamw_torch": "adamw_8bit", "adamw_torch_fused": "adamw_8bit", "paged_adamw_32bit": "paged_adamw_8bit"}


def with_layers(config, layers: int):
    """A copy of ``config`` with ``layers`` decoder layers (per-layer lists cut to match)."""
    c = copy.deepcopy(config)
    c.num_hidden_layers = layers
    lt = getattr(c, "layer_types", None)
    if isinstance(lt, list):
        c.layer_types = lt[:layers]
    return c


def estimate(settings: PlanSettings, config, *, stack: str = "qtulu") -> dict[str, int]:
    """``peak_bytes`` and ``paged_bytes`` at full depth, from plans at depths 2 and 3 (or the full
    plan when the model is that shallow)."""
    from qtulu.plan.planner import plan_step

    depth = int(getattr(config, "num_hidden_layers", 0))
    if depth <= 3:
        r = plan_step(settings, stack=stack, config=config)
        return {"peak_bytes": r.peak_bytes, "paged_bytes": r.paged_bytes, "floor_bytes": r.floor_bytes,
                "floor": dict(r.floor), "host": dict(r.host)}
    r2 = plan_step(settings, stack=stack, config=with_layers(config, 2))
    r3 = plan_step(settings, stack=stack, config=with_layers(config, 3))
    # the peak of each window of the step (a phase of a micro-batch) is affine in the depth; windows
    # grow at different rates (the loss window keeps every checkpointed input, a backward window
    # frees them), so the full-depth peak is the largest extrapolated window, not the extrapolated peak
    windows = [k for k in r2.phase_peaks if k in r3.phase_peaks and not k.startswith(("external", "warmup"))]
    peak = max(r2.phase_peaks[k] + (depth - 2) * (r3.phase_peaks[k] - r2.phase_peaks[k]) for k in windows)
    paged = r2.paged_bytes + (depth - 2) * (r3.paged_bytes - r2.paged_bytes)
    # the floor's terms and the host bytes are sums over identical layers too (the recompute set and the
    # loss tile do not grow with depth, so their extrapolation returns them unchanged)
    floor = {k: r2.floor[k] + (depth - 2) * (r3.floor[k] - r2.floor[k]) for k in r2.floor}
    host = {k: r2.host[k] + (depth - 2) * (r3.host[k] - r2.host[k]) for k in r2.host}
    from qtulu.plan.planner import floor_total

    return {"peak_bytes": peak, "paged_bytes": paged, "floor_bytes": floor_total(floor), "floor": floor, "host": host}


def estimate_peak(settings: PlanSettings, config, *, stack: str = "qtulu") -> int:
    """The planned peak at full depth, from plans at depths 2 and 3 (see `estimate`)."""
    return estimate(settings, config, stack=stack)["peak_bytes"]


def optimize(settings: PlanSettings, config, *, log: Callable[[str], None] = lambda m: None):
    """(chosen settings, report dict). The report lists every candidate's estimated peak."""
    current = settings
    best = estimate_peak(current, config)
    log(f"as given: ~{best / 1e9:.2f} GB")
    tried: list[dict[str, Any]] = []
    for key, (value, what) in REDUCTIONS.items():
        if getattr(current, key) == value:
            continue
        if key == "activation_offload" and (not current.gradient_checkpointing or current.device != "cuda"):
            continue  # nothing to offload / a CPU step keeps its tensors where they are
        trial = current.replace(**{key: value})
        peak = estimate_peak(trial, config)
        kept = peak < best
        tried.append({"switch": key, "value": value, "what": what, "estimated_peak_bytes": peak, "kept": kept})
        log(f"{key}={value}: ~{peak / 1e9:.2f} GB ({'kept' if kept else 'no gain'})")
        if kept:
            current, best = trial, peak
    advisories = []
    eight = _EXACT_OPTIMIZERS.get(current.optimizer)
    if eight is not None:
        peak = estimate_peak(current.replace(optimizer=eight), config)
        advisories.append({"switch": "optimizer", "value": eight, "estimated_peak_bytes": peak,
                           "why_not_applied": "8-bit optimizer states change the update (blockwise quantized moments)"})
        log(f"optimizer={eight} would give ~{peak / 1e9:.2f} GB (not applied: it changes the optimizer's maths)")
    report = {
        "switches": {k: getattr(current, k) for k in REDUCTIONS},
        "estimated_peak_bytes": best,
        "tried": tried,
        "not_applied": advisories,
    }
    return current, report
