"""One optimizer step of training, as ``qtulu train`` runs it: shared by the planner (fake tensors)
and the measurement of a real step (`qtulu.plan.measure`, ``benchmarks/bench_memory.py``).

What HF Trainer + TRL's ``SFTTrainer`` do per optimizer step, for the memory's sake:

* each micro-batch: the forward under autocast (accelerate wraps ``model.forward`` in
  ``torch.autocast`` for ``bf16=True`` on CUDA), ``SFTTrainer.compute_loss``'s loss (the fused LM
  head's log-probs summed and divided by the supervised tokens of the whole step), ``backward``;
* then gradient clipping (``clip_grad_norm_``), ``optimizer.step()``, ``zero_grad(set_to_none=True)``.

The batch is one packed row per micro-batch (TRL's padding-free collation: ``(1, rows x seq_len)``
tokens, positions restarting per example), every token supervised: the most memory a row can take.
The boundaries are passed as ``cu_seq_lens_q`` / ``max_length_q`` (the values the attention would
derive from ``position_ids``, without a device sync).
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable

import torch


def make_batches(vocab_size: int, settings, n: int, *, packed: bool = True, seed: int = 0) -> list[dict[str, Any]]:
    """``n`` micro-batches of ``settings.tokens`` tokens (real CPU tensors)."""
    g = torch.Generator().manual_seed(seed)
    total = settings.tokens
    k = max(1, settings.micro_batch_size * settings.examples_per_row) if packed else 1
    lens = [total // k + (1 if i < total % k else 0) for i in range(k)]
    out = []
    for _ in range(n):
        ids = torch.randint(3, vocab_size, (1, total), generator=g)
        batch: dict[str, Any] = {"input_ids": ids, "labels": ids.clone()}
        if packed:
            batch["position_ids"] = torch.cat([torch.arange(n_) for n_ in lens]).unsqueeze(0)
            cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0).tolist()), dtype=torch.int32)
            batch.update(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=max(lens), max_length_k=max(lens))
        out.append(batch)
    return out


def supervised_tokens(batches: list[dict[str, Any]]) -> int:
    """The step's ``num_items_in_batch``: labels other than -100 after the causal shift."""
    return int(sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches))


def qtulu_loss(model, batch: dict[str, Any], num_items: int) -> torch.Tensor:
    """``SFTTrainer.compute_loss``: TRL's fused LM head, summed log-probs / supervised tokens of the step
    (both stacks: ``qtulu train`` and HF as TRL sets it up)."""
    outputs = model(**batch, fused_lm_head=True, use_cache=False)
    loss = -outputs.log_probs.sum() / torch.as_tensor(num_items).clamp(min=1)
    # the trainer's metrics (entropy, token accuracy) read these before the outputs go
    outputs.entropy.detach().sum()
    outputs.is_top1.sum()
    return loss


def make_optimizer(model, settings, *, cuda: bool, params=None):
    """The optimizer HF Trainer builds for ``settings.optimizer`` (its own name -> class mapping),
    over ``params`` (default: the model's trainable parameters)."""
    import tempfile

    from transformers import Trainer, TrainingArguments

    if params is None:
        params = [p for p in model.parameters() if p.requires_grad]
    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(output_dir=tmp, optim=settings.optimizer, learning_rate=settings.learning_rate,
                                 weight_decay=settings.weight_decay, use_cpu=True, report_to="none")
        cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args, model)
    kwargs = dict(kwargs)
    if cls is torch.optim.AdamW and cuda and "fused" not in kwargs and "foreach" not in kwargs:
        kwargs["foreach"] = True  # torch's default for CUDA parameters
    return cls(params, **kwargs)


def create_optimizer_states(optimizer) -> None:
    """Create the optimizer's states (an update on zero gradients), as after the first real step."""
    params = [p for g in optimizer.param_groups for p in g["params"]]
    for p in params:
        p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)



class Observer:
    """Hooks the planner uses to mark the phases of the step (no-ops by default)."""

    def on_phase(self, name: str, micro_batch: int | None = None) -> None:
        pass

    def on_forward_end(self, micro_batch: int) -> None:
        pass

    def on_step_end(self, model, optimizer) -> None:
        pass


def run_step(
    model,
    optimizer,
    batches: list[dict[str, Any]],
    *,
    loss_fn: Callable = qtulu_loss,
    autocast_dtype: torch.dtype | None = None,
    autocast_device: str = "cpu",
    max_grad_norm: float = 1.0,
    foreach: bool | None = None,
    observer: Observer | None = None,
    context: Callable[[], Any] | None = None,
) -> list[float | torch.Tensor]:
    """Forward + backward of every micro-batch, clipping, ``optimizer.step()``, ``zero_grad``.

    Returns the detached micro-batch losses. ``context``: a context manager factory active for the
    whole step (the recipe's loss-chunk setting).
    """
    obs = observer or Observer()
    num_items = supervised_tokens(batches)
    losses = []
    with context() if context is not None else contextlib.nullcontext():
        for i, batch in enumerate(batches):
            obs.on_phase("forward", i)
            amp = (torch.autocast(autocast_device, dtype=autocast_dtype) if autocast_dtype is not None
                   else contextlib.nullcontext())
            with amp:
                loss = loss_fn(model, batch, num_items)
            obs.on_forward_end(i)
            obs.on_phase("loss_backward", i)
            loss.backward()
            losses.append(loss.detach())
            del loss
        obs.on_phase("optimizer")
        params = [p for p in model.parameters() if p.requires_grad]
        if max_grad_norm and max_grad_norm > 0 and getattr(optimizer, "qtulu_host_master", None) is None:
            # (with host master weights the gradients are on the host: the optimizer clips them there)
            torch.nn.utils.clip_grad_norm_(params, max_grad_norm, foreach=foreach)
        optimizer.step()
        obs.on_step_end(model, optimizer)
        optimizer.zero_grad(set_to_none=True)
        obs.on_phase("done")
    return losses
