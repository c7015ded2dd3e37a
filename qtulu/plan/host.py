"""The host side of a plan that offloads (ZeRO-Offload): pinned and pageable host bytes, and the
measured time of the optimizer step on the CPU.

With ``train.master_weights: host`` (`qtulu.train.master_weights.HostMaster`) the fp32 masters
(pinned, for asynchronous copies to the GPU), one pinned staging buffer per LoRA weight in the
compute dtype (the device gradient lands there), the fp32 gradient sums and the optimizer states
live on the host, and the optimizer step runs on the CPU once per optimizer step: ZeRO-Offload
(Ren et al., 2021) for the LoRA weights. ``train.activation_offload`` adds the checkpointed layer
inputs in pinned memory (the planner's host peak). A GPU figure that offloads is only honest next
to these bytes and that time, so `host_side` reports them and `cpu_optimizer_time` measures the
step on this machine: bitsandbytes' 8-bit AdamW (or whatever optimizer the recipe names, unpaged)
over a sample of parameters, scaled linearly to the LoRA parameter count.
"""

from __future__ import annotations

import time
from typing import Any

import torch

SAMPLE_PARAMS = 1 << 21  # 2M parameters: a few tenths of a second per step on one core


def host_side(master, optimizer, *, activation_host_bytes: int = 0) -> dict[str, int]:
    """Host bytes of host master weights (``master``: a `HostMaster`, or None) and offloaded
    activations. Optimizer states are read from ``optimizer`` (meta tensors in a plan: sizes only)."""
    out = {"pinned_activations": int(activation_host_bytes), "pinned_masters": 0, "pinned_staging": 0,
           "grad_sums": 0, "optimizer_states": 0, "lora_params": 0}
    if master is not None:
        n = sum(m.numel() for m in master.masters)
        el = torch.empty((), dtype=master.compute_dtype).element_size()
        out.update(pinned_masters=4 * n, pinned_staging=el * n, grad_sums=4 * n, lora_params=n)
        seen = set()
        for state in optimizer.state.values():
            for v in state.values():
                if isinstance(v, torch.Tensor) and id(v) not in seen:
                    seen.add(id(v))
                    out["optimizer_states"] += v.numel() * v.element_size()
    out["pinned_bytes"] = out["pinned_activations"] + out["pinned_masters"] + out["pinned_staging"]
    out["pageable_bytes"] = out["grad_sums"] + out["optimizer_states"]
    return out


def cpu_optimizer_time(optimizer_name: str, n_params: int, *, sample: int = SAMPLE_PARAMS, steps: int = 3,
                       learning_rate: float = 1e-4) -> dict[str, Any]:
    """Seconds per optimizer step of ``optimizer_name`` (an HF name, run unpaged on CPU tensors) over
    ``n_params`` parameters: the best of ``steps`` timed steps on ``sample`` parameters (after one
    untimed step that creates the states), scaled linearly (the update is elementwise)."""
    import tempfile

    from transformers import Trainer, TrainingArguments

    from qtulu.train.master_weights import host_optimizer_name

    name = host_optimizer_name(optimizer_name)
    p = torch.nn.Parameter(torch.randn(sample, generator=torch.Generator().manual_seed(0)) * 0.02)
    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(output_dir=tmp, optim=name, learning_rate=learning_rate, use_cpu=True,
                                 report_to="none")
        cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args, None)
    opt = cls([p], **kwargs)
    p.grad = torch.randn(sample, generator=torch.Generator().manual_seed(1)) * 1e-3
    opt.step()
    best = float("inf")
    for _ in range(max(1, steps)):
        t = time.perf_counter()
        opt.step()
        best = min(best, time.perf_counter() - t)
    ns = best / sample * 1e9
    return {"optimizer": name, "class": f"{cls.__module__}.{cls.__name__}", "threads": torch.get_num_threads(),
            "ns_per_param": round(ns, 2), "params": int(n_params), "seconds_per_step": round(ns * n_params / 1e9, 2),
            "what": "ZeRO-Offload: the optimizer step on the CPU, measured on this machine"}
