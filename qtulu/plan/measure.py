"""Measure the peak memory of a real training step on this machine's CPU, independently of the planner.

The step is the planner's (`qtulu.plan.step.run_step`, the same model builders) but on real
tensors, and the memory comes from the CPU allocator itself: ``torch.profiler`` with
``profile_memory=True`` records every allocation and free the allocator makes ("[memory]" events,
positive and negative byte counts in time order). The peak of their running sum during the step,
plus what was allocated before it (the model's parameters, buffers, quantization state, optimizer
states and the batches: the unique storages reachable from them), is the measured peak.

The optimizer states are created first by an update on zero gradients (as the planner's warm-up does).
"""

from __future__ import annotations

import gc
import warnings
from dataclasses import dataclass
from typing import Any

import torch

from qtulu.plan.models import build_hf, build_qtulu, quant_state_tensors, resolve_config
from qtulu.plan.settings import PlanSettings
from qtulu.plan.step import create_optimizer_states, make_batches, make_optimizer, qtulu_loss, run_step


@dataclass
class Measurement:
    peak_bytes: int          # resident before the step + peak of the allocator's running sum during it
    resident_bytes: int      # model + optimizer states + batches before the step
    step_peak_bytes: int     # peak growth during the step
    losses: list[float]
    events: int


def _unique_bytes(tensors) -> int:
    seen: dict[int, int] = {}
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.device.type == "cpu":
            st = t.untyped_storage()
            seen[st.data_ptr()] = max(seen.get(st.data_ptr(), 0), st.nbytes())
    return sum(seen.values())


def resident_tensors(model, optimizer, batches) -> list[torch.Tensor]:
    out = list(model.parameters()) + list(model.buffers()) + quant_state_tensors(model)
    for state in optimizer.state.values():
        out += [v for v in state.values() if isinstance(v, torch.Tensor)]
    for b in batches:
        out += [v for v in b.values() if isinstance(v, torch.Tensor)]
    return out


def allocator_peak(prof) -> tuple[int, int]:
    """(peak of the running sum, number of events) of the profiler's CPU "[memory]" events.

    Read from the raw (kineto) event list: the aggregated ``prof.events()`` drops allocations made
    outside an operator (the autograd engine's, for one).
    """
    raw = prof.profiler.kineto_results.events()
    from torch._C._autograd import DeviceType

    mem = sorted((e.start_ns(), e.nbytes()) for e in raw if e.name() == "[memory]" and e.device_type() == DeviceType.CPU)
    live = peak = 0
    for _, nbytes in mem:
        live += nbytes
        peak = max(peak, live)
    return peak, len(mem)



def build_real_step(settings: PlanSettings, *, stack: str, config, device: str):
    """The model, optimizer (with host master weights attached when asked), batches and `run_step`
    keyword arguments of one real training step of ``stack`` ("qtulu" or "hf") on ``device``: what
    `measure_step` runs here and benchmarks/bench_memory.py runs on CUDA."""
    model = (build_qtulu if stack == "qtulu" else build_hf)(config, settings, device=device)
    master, opt_settings = None, settings
    if settings.master_weights == "host":
        from qtulu.train.master_weights import HostMaster, host_optimizer_name

        master = HostMaster(model.named_parameters(), compute_dtype=settings.torch_dtype)
        master.match_input_casts(model)
        opt_settings = settings.replace(optimizer=host_optimizer_name(settings.optimizer))
    cuda = device == "cuda"
    optimizer = make_optimizer(model, opt_settings, cuda=cuda, params=master.masters if master else None)
    if master is not None:
        master.attach(optimizer, settings.max_grad_norm)  # the optimizer keeps it (qtulu_host_master)
    batches = [{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in b.items()}
               for b in make_batches(config.vocab_size, settings, max(1, settings.accumulation),
                                     packed=stack == "qtulu")]
    from qtulu.train.loss import loss_chunking

    kw: dict[str, Any] = dict(loss_fn=qtulu_loss,
                              max_grad_norm=settings.max_grad_norm,
                              context=(lambda: loss_chunking(settings.loss_chunk_size)) if stack == "qtulu" else None)
    if cuda:
        kw.update(autocast_dtype=settings.torch_dtype, autocast_device="cuda")
    return model, optimizer, batches, kw


def measure_step(settings: PlanSettings, *, stack: str = "qtulu", seed: int = 0, config=None) -> Measurement:
    """Build the model for real on the CPU, run one step, return the allocator's peak."""
    from torch.profiler import ProfilerActivity, profile

    if settings.device != "cpu":
        raise ValueError("measure_step runs on this machine's CPU: settings.device must be 'cpu'")
    if config is None:
        config = resolve_config(settings.shape, settings.config, seq_len=settings.seq_len)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(seed)
        model, optimizer, batches, kw = build_real_step(settings, stack=stack, config=config, device="cpu")
        create_optimizer_states(optimizer)  # as after a first step
        gc.collect()
        resident = _unique_bytes(resident_tensors(model, optimizer, batches))
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=False) as prof:
            losses = run_step(model, optimizer, batches, **kw)
    peak, n = allocator_peak(prof)
    return Measurement(peak_bytes=resident + peak, resident_bytes=resident, step_peak_bytes=peak,
                       losses=[float(x) for x in losses], events=n)
