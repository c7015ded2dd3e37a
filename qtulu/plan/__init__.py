"""Plan the memory of a training step before running it: ``qtulu plan``.

The planner builds the model of a recipe (or of a built-in LLaMA shape, or of any HF config) on the
meta device with the real code: transformers' model, qtulu's NF4 ``Linear4bit`` (through its
custom ops' fake implementations), the ``qtulu_varlen`` attention, peft LoRA, TRL's fused loss
head, the recipe's memory switches, the optimizer HF Trainer would build. It then runs one
optimizer step (micro-batches with forward, loss and backward with checkpoint recomputation,
clipping, the optimizer update) on fake tensors, and a dispatch mode records every storage's birth
and death (`qtulu.plan.tracker`). The peak of live device bytes and what was alive at that moment,
by category, is the plan; `qtulu.plan.measure` checks it against the CPU allocator on small shapes.

Modules: `settings` (what is planned), `models` (the qtulu and transformers+peft+bitsandbytes
stacks), `step` (the step, shared with the real measurement), `emulate` (CUDA behaviour on a
CPU-only machine), `tracker`, `planner`, `search` (`--optimize`), `report`, `measure`, `units` and
`fsdp` (the per-rank peak under FSDP2, ``--gpus N``), `cli`.
"""

from __future__ import annotations

import importlib

from qtulu.plan.errors import PlanError

# the rest imports torch: loaded on first use (``qtulu --help`` imports this package)
_LAZY = {
    "resolve_config": "qtulu.plan.models",
    "estimate_peak": "qtulu.plan.search",
    "optimize": "qtulu.plan.search",
    "PlanResult": "qtulu.plan.planner",
    "plan_step": "qtulu.plan.planner",
    "REDUCTIONS": "qtulu.plan.settings",
    "PlanSettings": "qtulu.plan.settings",
}

__all__ = ["PlanError", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'qtulu.plan' has no attribute {name!r}")
