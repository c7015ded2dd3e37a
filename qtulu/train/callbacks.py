"""Training-loop pieces around HF Trainer: the non-finite step guard, per-step records, the loss PNG.

The guard runs in ``on_pre_optimizer_step`` (after gradients are accumulated, all-reduced and
clipped, before ``optimizer.step()``): when the step's loss or any gradient is NaN/inf it drops the
gradients (AdamW skips parameters whose ``.grad`` is None, so neither weights nor moments move) and
flags the accelerate optimizer as skipped, which is what makes Trainer (and accelerate's scheduler
wrapper) leave the LR scheduler where it is. The step is counted; after
``max_nonfinite_in_a_row`` skipped steps in a row the run stops.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from qtulu.files import atomic_write
from qtulu.errors import QtuluError


class NonFiniteError(QtuluError, RuntimeError):
    """Training stopped: too many consecutive steps had a NaN/inf loss or gradient."""


class StepGuard:
    """Per-optimizer-step bookkeeping shared by the trainer and `GuardCallback`."""

    def __init__(self, max_in_a_row: int):
        if max_in_a_row < 1:
            raise ValueError(f"train.max_nonfinite_in_a_row must be >= 1, got {max_in_a_row}")
        self.max_in_a_row = max_in_a_row
        self.loss_sum: torch.Tensor | None = None  # this rank's share of the step loss, summed over micro-batches
        self.loss_nonfinite = False
        self.skipped_total = 0
        self.in_a_row = 0
        self.stopped = False
        self.steps: list[dict[str, Any]] = []  # {"step", "loss", "lr", "skipped"} per optimizer step
        self.evals: list[dict[str, Any]] = []  # {"step", "eval_loss", "eval_tokens"} per evaluation

    def add_micro_batch(self, loss: torch.Tensor) -> None:
        loss = loss.detach().float()
        if not bool(torch.isfinite(loss).all()):
            self.loss_nonfinite = True
        self.loss_sum = loss if self.loss_sum is None else self.loss_sum + loss

    def state(self) -> dict[str, Any]:
        return {"skipped_total": self.skipped_total, "in_a_row": self.in_a_row, "steps": self.steps,
                "evals": self.evals}

    def load_state(self, state: dict[str, Any] | None) -> None:
        if state:
            self.skipped_total = int(state.get("skipped_total", 0))
            self.in_a_row = int(state.get("in_a_row", 0))
            self.steps = list(state.get("steps", []))
            self.evals = list(state.get("evals", []))

    def records(self) -> list[dict[str, Any]]:
        """Step and evaluation records in step order (an evaluation after its step's record)."""
        return sorted([*self.steps, *self.evals], key=lambda r: (r["step"], "eval_loss" in r))


def grads_finite(parameters) -> bool:
    """True when every existing gradient is finite (one device sync for all of them)."""
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return True
    flags = torch.stack([torch.isfinite(g).all() for g in grads])
    return bool(flags.all())


class GuardCallback(TrainerCallback):
    """Skip (and count) non-finite optimizer steps; stop after too many in a row. See module doc."""

    def __init__(self, trainer, guard: StepGuard):
        self.trainer = trainer
        self.guard = guard

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        trainer, guard = self.trainer, self.guard
        model = trainer.model
        params = [p for p in model.parameters() if p.requires_grad]
        host = getattr(getattr(trainer.optimizer, "optimizer", trainer.optimizer), "qtulu_host_master", None)
        if host is not None:  # train.master_weights=host: the step's gradients are the host masters'
            params = host.masters
        bad = guard.loss_nonfinite or not grads_finite(params)
        loss = guard.loss_sum if guard.loss_sum is not None else torch.zeros((), device=args.device)
        acc = trainer.accelerator
        if acc.num_processes > 1:
            # every rank must take the same decision; the step loss is the mean of the ranks' shares
            flag = torch.tensor([1.0 if bad else 0.0], device=acc.device)
            bad = bool(acc.reduce(flag, reduction="sum").item() > 0)
            loss = acc.reduce(loss.to(acc.device).reshape(1), reduction="mean")
        optimizer = trainer.optimizer
        lr = trainer._get_learning_rate() if hasattr(trainer, "_get_learning_rate") else None
        if bad:
            for p in params:
                p.grad = None
            guard.skipped_total += 1
            guard.in_a_row += 1
            if hasattr(optimizer, "_is_overflow"):
                optimizer._is_overflow = True  # accelerate: step_was_skipped -> Trainer keeps the LR schedule
            if guard.in_a_row >= guard.max_in_a_row:
                guard.stopped = True
                control.should_training_stop = True
        else:
            guard.in_a_row = 0
            if hasattr(optimizer, "_is_overflow"):
                optimizer._is_overflow = False
        value = float(loss.reshape(-1)[0].item())
        guard.steps.append(
            {
                "step": state.global_step + 1,
                "loss": value if math.isfinite(value) else None,
                "lr": float(lr) if lr is not None else None,
                "skipped": bool(bad),
            }
        )
        guard.loss_sum = None
        guard.loss_nonfinite = False
        return control


class StepsLog(TrainerCallback):
    """``OUT/steps.jsonl`` as the run goes: one JSON line per optimizer step (``step``, ``loss``, ``lr``,
    ``skipped``) and one per evaluation (``step``, ``eval_loss``, ``eval_tokens``), appended and flushed
    at every logging step (HF's ``on_log``) and every evaluation, so that ``tail -f`` follows a run.

    `start` rewrites the file from the guard's records: none for a fresh run, the resumed
    checkpoint's for a resumed one. Lines an interrupted run appended after that checkpoint's step
    are dropped: those steps are trained again from the checkpoint and logged again, so the file
    never holds a step twice nor lacks one. Only the main rank writes (``enabled``).
    """

    def __init__(self, path: str | Path, guard: StepGuard, *, enabled: bool = True):
        self.path = Path(path)
        self.guard = guard
        self.enabled = enabled
        self.written_steps = 0
        self.written_evals = 0

    def start(self) -> None:
        from qtulu.files import atomic_write_text

        self.written_steps, self.written_evals = len(self.guard.steps), len(self.guard.evals)
        if self.enabled:
            atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in self.guard.records()))

    def sync(self) -> None:
        """Append the records not written yet (steps first: an evaluation follows its step)."""
        new = self.guard.steps[self.written_steps:] + self.guard.evals[self.written_evals:]
        self.written_steps, self.written_evals = len(self.guard.steps), len(self.guard.evals)
        if self.enabled and new:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write("".join(json.dumps(r) + "\n" for r in new))
                f.flush()

    def on_log(self, args, state, control, **kwargs):
        self.sync()

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if metrics and "eval_loss" in metrics:
            value = float(metrics["eval_loss"])
            self.guard.evals.append({"step": state.global_step, "eval_loss": value if math.isfinite(value) else None,
                                     "eval_tokens": int(metrics.get("eval_tokens", 0))})
        self.sync()


class EvaluateAtEnd(TrainerCallback):
    """``train.eval_steps: 0``: one evaluation, after the last optimizer step, inside HF's loop (as its
    step schedule does for the last step), so that loggers and the best-metric tracking see it
    before the trainer closes them."""

    def on_step_end(self, args, state, control, **kwargs):
        if state.max_steps > 0 and state.global_step >= state.max_steps:
            control.should_evaluate = True
        return control


def plot_losses(steps: list[dict[str, Any]], path: str | Path, title: str = "training loss",
                evals: list[dict[str, Any]] = ()) -> Path | None:
    """Write a PNG loss curve (per optimizer step, skipped steps marked; the validation loss of
    ``evals`` as a second curve); None when nothing to plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [s["step"] for s in steps if s.get("loss") is not None and not s.get("skipped")]
    ys = [s["loss"] for s in steps if s.get("loss") is not None and not s.get("skipped")]
    if not xs:
        return None
    path = Path(path)
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    ax.plot(xs, ys, lw=1.0, alpha=0.5, label="loss per step")
    if len(ys) >= 10:
        k = max(2, len(ys) // 20)
        smooth = [sum(ys[max(0, i - k + 1) : i + 1]) / len(ys[max(0, i - k + 1) : i + 1]) for i in range(len(ys))]
        ax.plot(xs, smooth, lw=2.0, label=f"moving mean ({k})")
    skipped = [s["step"] for s in steps if s.get("skipped")]
    for i, x in enumerate(skipped):
        ax.axvline(x, color="red", alpha=0.3, lw=0.8, label="skipped (non-finite)" if i == 0 else None)
    ev = [(e["step"], e["eval_loss"]) for e in evals if e.get("eval_loss") is not None]
    if ev:
        ax.plot([x for x, _ in ev], [y for _, y in ev], "o-", color="tab:green", lw=1.5, ms=4,
                label="validation loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (mean over supervised tokens)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.subplots_adjust(left=0.11, right=0.98, bottom=0.13, top=0.92)  # fixed: tight_layout costs ~0.4 s of CPU
    atomic_write(path, fig.savefig)
    plt.close(fig)
    return path
