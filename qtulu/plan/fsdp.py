"""Per-rank memory of an FSDP2 step (``qtulu plan --gpus N``, ``train.fsdp``), from the one-device plan.

FSDP2 (``fully_shard``) keeps 1/N of every parameter on each rank (the packed NF4 codes, the frozen
norms and embedding, the LoRA weights) and so 1/N of their gradients and optimizer states; qtulu's
NF4 quant state is not a parameter and stays whole on every rank. A unit's parameters are gathered
whole for its forward and backward. The units are those accelerate's ``fsdp2_prepare_model`` makes
(and `shard_like_accelerate` makes for the measurement): each decoder layer, the tail (final norm and
LM head, kept gathered from forward to backward) and the root (the rest: the embedding), also kept
gathered. So at the one-device peak, per rank:

- ``(weights + lora + grads + optimizer) / N`` + ``quant_state`` + the per-rank batch's activations,
  loss and transients (the same micro-batch per rank as on one device);
- the gathered working set: root + tail, plus, with ``full_shard``, two decoder layers (the one
  computing and the one prefetched) or, with ``shard_grad_op`` (no resharding after forward), every
  layer; plus one layer's unsharded LoRA gradients before their reduce-scatter.

`tests/plan/test_fsdp_plan.py` checks it against the CPU allocator's per-rank peak of a real 2-rank
gloo step (`measure_fsdp_rank`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from qtulu.plan.units import fsdp_units, layers_and_tail

__all__ = ["MODES", "SHARDED", "RankPlan", "fsdp_units", "per_rank", "shard_like_accelerate", "measure_fsdp_rank",
           "estimate_full_depth"]

MODES = ("full_shard", "shard_grad_op")
SHARDED = ("weights", "lora", "grads", "optimizer")


@dataclass
class RankPlan:
    """The planned per-rank peak of an FSDP2 step on ``gpus`` ranks (bytes)."""

    gpus: int
    mode: str
    peak_bytes: int
    breakdown: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def per_rank(breakdown: dict[str, int], units: dict[str, Any], gpus: int, mode: str) -> RankPlan:
    """The per-rank peak of an FSDP2 step from the one-device ``breakdown`` at its peak (see the module)."""
    from qtulu.plan.errors import PlanError

    if mode not in MODES:
        raise PlanError(f"FSDP mode must be one of {', '.join(MODES)}, got {mode!r}")
    if gpus < 2:
        raise PlanError(f"--gpus must be at least 2 for FSDP, got {gpus}")
    out = {k: (v + gpus - 1) // gpus if k in SHARDED else v for k, v in breakdown.items()}
    layers = units["all_layers"][0] if mode == "shard_grad_op" else min(2, units["layers"]) * units["layer"][0]
    out["gathered"] = units["root"][0] + units["tail"][0] + layers + units["layer"][1]
    return RankPlan(gpus=gpus, mode=mode, peak_bytes=sum(out.values()), breakdown=out)


def shard_like_accelerate(model, mode: str):
    """``fully_shard`` ``model`` as accelerate's ``fsdp2_prepare_model`` does (each decoder layer, the tail
    gathered from forward to backward, the root); needs a process group. Returns the model."""
    from torch.distributed.fsdp import fully_shard

    layers, tail = layers_and_tail(model)
    for m in layers:
        fully_shard(m, reshard_after_forward=mode == "full_shard")
    if tail:
        fully_shard(tail, reshard_after_forward=False)
    fully_shard(model)
    return model


def measure_fsdp_rank(settings, mode: str, *, config=None, seed: int = 0):
    """This rank's CPU-allocator peak of one real FSDP2 step (run every rank under torchrun, gloo):
    `qtulu.plan.measure.measure_step`'s method on a model sharded by `shard_like_accelerate`."""
    import gc
    import warnings

    import torch
    from torch.distributed.tensor import DTensor
    from torch.profiler import ProfilerActivity, profile

    from qtulu.plan.measure import Measurement, _unique_bytes, allocator_peak, build_real_step, resident_tensors
    from qtulu.plan.models import resolve_config
    from qtulu.plan.step import create_optimizer_states, run_step

    if config is None:
        config = resolve_config(settings.shape, settings.config, seq_len=settings.seq_len)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(seed)
        model, _, batches, kw = build_real_step(settings, stack="qtulu", config=config, device="cpu")
        shard_like_accelerate(model, mode)
        from qtulu.plan.step import make_optimizer

        optimizer = make_optimizer(model, settings, cuda=False)  # over the sharded parameters
        create_optimizer_states(optimizer)
        gc.collect()
        local = [t.to_local() if isinstance(t, DTensor) else t for t in resident_tensors(model, optimizer, batches)]
        resident = _unique_bytes(local)
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=False) as prof:
            losses = run_step(model, optimizer, batches, **kw)
    peak, n = allocator_peak(prof)
    return Measurement(peak_bytes=resident + peak, resident_bytes=resident, step_peak_bytes=peak,
                       losses=[float(x) for x in losses], events=n)


def estimate_full_depth(settings, config) -> tuple[dict[str, int], dict[str, Any], str]:
    """``(breakdown at the peak, units, peak phase)`` at full depth from plans cut to 2 and 3 layers (as
    `qtulu.plan.search.estimate`): every category at the peak and every unit sum is affine in the
    depth while the peak stays in the same window of the step (checked: otherwise this refuses and
    the full plan is needed)."""
    from qtulu.plan.errors import PlanError
    from qtulu.plan.planner import plan_step
    from qtulu.plan.search import with_layers

    depth = int(getattr(config, "num_hidden_layers", 0))
    if depth <= 3:
        r = plan_step(settings, config=config)
        return r.breakdown, r.units, r.peak_phase
    r2 = plan_step(settings, config=with_layers(config, 2))
    r3 = plan_step(settings, config=with_layers(config, 3))
    if r2.peak_phase != r3.peak_phase:
        raise PlanError(f"the peak moves from {r2.peak_phase} (2 layers) to {r3.peak_phase} (3 layers): "
                        "plan the full depth")
    breakdown = {k: r2.breakdown[k] + (depth - 2) * (r3.breakdown[k] - r2.breakdown[k]) for k in r2.breakdown}
    units = dict(r3.units, layers=depth, all_layers=tuple(depth * b for b in r3.units["layer"]))
    return breakdown, units, r3.peak_phase
