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
CPU-only machine), `tracker`, `planner`, `optimize`, `report`, `measure`, `cli`.
"""

from qtulu.plan.models import PlanError, resolve_config
from qtulu.plan.optimize import estimate_peak, optimize
from qtulu.plan.planner import PlanResult, plan_step
from qtulu.plan.settings import REDUCTIONS, PlanSettings

__all__ = ["PlanError", "PlanResult", "PlanSettings", "REDUCTIONS", "estimate_peak", "optimize", "plan_step",
           "resolve_config"]
