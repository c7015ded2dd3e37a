"""fp32 master LoRA weights kept only where they are needed: on the host, with the optimizer.

A bf16 QLoRA step on a GPU holds each LoRA weight three times over: the fp32 weight (peft upcasts
adapters to fp32), its fp32 gradient, and the optimizer's moments; for LLaMA-65B at r 64 on every
linear (800M LoRA parameters) that is 3.2 + 3.2 + 1.6 (8-bit moments) GB. Yet the GPU only ever
computes with bf16 copies: under autocast every use of an fp32 LoRA weight casts it to bf16 first,
and its gradient comes out of a bf16 matmul. The fp32 copy is needed only where the update is
applied (small steps must not round away) and the fp32 gradient only where micro-batches are summed.

`HostMaster` keeps exactly those on the host: the trainable parameters on the device become bf16
(round-to-nearest of the fp32 master: what autocast's cast gives), and when a parameter's gradient
of a micro-batch is ready (``register_post_accumulate_grad_hook``) it is copied to pinned host
memory on a side stream and added, in fp32, to the master's ``.grad``; the device gradient is freed
at once. The optimizer the recipe asks for (HF's mapping: bitsandbytes 8-bit AdamW included, which
runs on CPU tensors) is built on the masters; before its step the host gradients are clipped to the
recipe's ``max_grad_norm`` (global norm), after it the masters are copied back to the device, in bf16.

Same maths as fp32 master weights on the GPU: the forward sees the same bf16 weights (and peft's
dropout the same fp32 input: `HostMaster.match_input_casts`), each
micro-batch's gradient has the same (bf16) values and they are summed in fp32 in the same order;
the update is the same optimizer in fp32 (on the CPU). Costs: one device-to-host copy of the LoRA
gradients per micro-batch (overlapped with the backward), one host-to-device copy of the LoRA
weights per optimizer step, and the optimizer update on the CPU (a few seconds for 800M
parameters, once per optimizer step). Single process only (DDP would all-reduce the device
gradients that are no longer kept).

Switch: recipe ``train.master_weights: host`` (default ``device``). Checkpoints carry the fp32
masters (``qtulu_master.safetensors``) so that a resume is exact; the saved adapter is fp32.
"""

from __future__ import annotations

import collections
import functools
import types
from pathlib import Path
from typing import Any

import torch

from qtulu.errors import QtuluError
from qtulu.train.offload import copy_to_host_async

__all__ = ["HostMaster", "MasterWeightsError", "MASTER_FILE", "host_optimizer_name"]

MASTER_FILE = "qtulu_master.safetensors"


class MasterWeightsError(QtuluError, RuntimeError):
    """Host master weights asked for a set-up they cannot serve."""


# paging moves optimizer states between GPU and host memory: on the host it has nothing to do
_UNPAGED = {"paged_adamw_8bit": "adamw_8bit", "paged_adamw_32bit": "adamw_torch", "paged_lion_8bit": "lion_8bit",
            "paged_lion_32bit": "lion_32bit"}


def host_optimizer_name(name: str) -> str:
    """The HF optimizer name to run on the host masters: the same optimizer, unpaged."""
    return _UNPAGED.get(name, name)


class HostMaster:
    """fp32 masters + gradient sums on the host for ``params``; the device params become ``compute_dtype``.

    ``host_device``: where masters live ("cpu"; the planner passes "meta"). Call `match_input_casts`
    on the model (exact dropout) and `attach` on the optimizer built over `masters`.
    """

    def __init__(self, named_params, *, compute_dtype: torch.dtype, host_device: str = "cpu") -> None:
        self.names: list[str] = []
        self.params: list[torch.nn.Parameter] = []
        for name, p in named_params:
            if p.requires_grad:
                self.names.append(name)
                self.params.append(p)
        if not self.params:
            raise MasterWeightsError("train.master_weights=host: the model has no trainable parameters")
        self.host_device = host_device
        self.cuda = any(p.is_cuda for p in self.params)
        self.masters: list[torch.Tensor] = []
        for p in self.params:
            m = torch.empty(p.shape, dtype=torch.float32, device=host_device,
                            pin_memory=self.cuda and host_device == "cpu")
            m.copy_(p.detach())
            self.masters.append(m.requires_grad_(True))
            p.data = p.data.to(compute_dtype)
        self.compute_dtype = compute_dtype
        self.max_grad_norm = 0.0
        self._staging: dict[int, torch.Tensor] = {}
        self._pending: collections.deque = collections.deque()
        self._stream = None
        self._handles = [p.register_post_accumulate_grad_hook(functools.partial(self._grad_ready, i))
                         for i, p in enumerate(self.params)]

    # ---- gradients -------------------------------------------------------------------------
    def _side_stream(self, device):
        if self._stream is None:
            self._stream = torch.cuda.Stream(device)
        return self._stream

    def _grad_ready(self, i: int, p: torch.Tensor) -> None:
        g = p.grad
        p.grad = None  # freed on the device as soon as its copy is done
        if g is None:
            return
        if not g.is_cuda:
            self._add(i, g)
            return
        self._finish(lambda entry: entry[0] == i)  # this parameter's previous copy must be summed first
        buf = self._staging.get(i)
        if buf is None:
            buf = self._staging[i] = torch.empty(g.shape, dtype=g.dtype, device="cpu", pin_memory=True)
        event = copy_to_host_async(g, buf, self._side_stream(g.device))
        self._pending.append((i, buf, event))
        self._finish(lambda entry: entry[2].query())  # sum whatever copies have landed

    def _add(self, i: int, g: torch.Tensor) -> None:
        m = self.masters[i]
        if m.grad is None:
            m.grad = torch.empty_like(m)
            m.grad.copy_(g)
        else:
            m.grad.add_(g.to(device=m.device, dtype=m.dtype))

    def _finish(self, ready) -> None:
        keep = collections.deque()
        while self._pending:
            entry = self._pending.popleft()
            if ready(entry):
                i, buf, event = entry
                event.synchronize()
                self._add(i, buf)
            else:
                keep.append(entry)
        self._pending = keep

    def drain(self) -> None:
        """Sum every gradient copy still in flight into the masters' ``.grad``."""
        self._finish(lambda entry: True)

    # ---- optimizer -------------------------------------------------------------------------
    def attach(self, optimizer: torch.optim.Optimizer, max_grad_norm: float = 0.0) -> torch.optim.Optimizer:
        """Clip and step on the masters, then refresh the device weights. Returns ``optimizer``."""
        self.max_grad_norm = float(max_grad_norm or 0.0)
        optimizer.register_step_pre_hook(lambda opt, args, kwargs: self.before_step())
        optimizer.register_step_post_hook(lambda opt, args, kwargs: self.after_step())
        optimizer.qtulu_host_master = self
        return optimizer

    def before_step(self) -> None:
        self.drain()
        if self.max_grad_norm > 0:
            grads = [m for m in self.masters if m.grad is not None]
            if grads:
                torch.nn.utils.clip_grad_norm_(grads, self.max_grad_norm)

    @torch.no_grad()
    def after_step(self) -> None:
        self.sync_to_device()
        for m in self.masters:  # consumed (HF Trainer only zeroes the model's gradients)
            m.grad = None

    @torch.no_grad()
    def sync_to_device(self) -> None:
        for p, m in zip(self.params, self.masters):
            p.data.copy_(m.detach().to(self.compute_dtype), non_blocking=self.cuda)

    # ---- saving ----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        """The fp32 masters by parameter name (the model's names)."""
        self.drain()
        return {n: m.detach() for n, m in zip(self.names, self.masters)}

    def save(self, path: str | Path) -> Path:
        from safetensors.torch import save_file

        path = Path(path)
        save_file({n: t.contiguous() for n, t in self.state_dict().items()}, str(path))
        return path

    @torch.no_grad()
    def load(self, path: str | Path) -> None:
        """Masters from a checkpoint's ``qtulu_master.safetensors``; the device weights follow."""
        from safetensors.torch import load_file

        tensors = load_file(str(path))
        missing = [n for n in self.names if n not in tensors]
        if missing:
            raise MasterWeightsError(f"{path}: no master weight for {missing[:3]} ({len(missing)} missing)")
        for n, m in zip(self.names, self.masters):
            m.copy_(tensors[n])
        self.sync_to_device()

    def adapter_state(self, peft_model, adapter_name: str = "default") -> dict[str, Any]:
        """peft's adapter state dict (its key names) holding the fp32 masters, for `save_adapter`."""
        from peft import get_peft_model_state_dict

        by_name = dict(zip(self.names, self.masters))
        full = {n: by_name.get(n, p) for n, p in peft_model.named_parameters()}
        return {k: v.detach().float() for k, v in
                get_peft_model_state_dict(peft_model, state_dict=full, adapter_name=adapter_name).items()}

    def match_input_casts(self, model: torch.nn.Module) -> int:
        """Make peft's LoRA layers of ``model`` cast their input as they would for the fp32 masters.

        peft casts a LoRA layer's input to ``lora_A.weight.dtype`` before the dropout (when it casts
        at all: bitsandbytes' 4-bit layers skip it under CUDA autocast). With fp32 weights the dropout
        runs on fp32 ``x``; with the bf16 device copies it would run on bf16 ``x``: another mask
        draw on CUDA's fused kernel, another rounding of ``x / (1 - p)`` everywhere (gradients 0.7-0.9%
        off). Patched layers cast to the masters' dtype where peft would cast to the copies' dtype,
        so the dropout sees the same tensor as with device masters; autocast then casts the dropped
        fp32 ``x`` to bf16 for the matmul, as it does there. Returns how many layers were patched.
        """
        if self.compute_dtype == torch.float32:
            return 0
        mine = {id(p) for p in self.params}
        n = 0
        for module in model.modules():
            lora_a = getattr(module, "lora_A", None)
            if not isinstance(lora_a, torch.nn.ModuleDict) or not hasattr(module, "_cast_input_dtype"):
                continue
            if not any(id(getattr(a, "weight", None)) in mine for a in lora_a.values()):
                continue
            module._qtulu_cast_dtypes = (self.compute_dtype, torch.float32)
            module._cast_input_dtype = types.MethodType(_cast_as_master, module)
            n += 1
        return n

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


def _cast_as_master(layer, x, dtype):
    """peft's ``_cast_input_dtype`` with the device copies' dtype read as the masters' (fp32)."""
    copy_dtype, master_dtype = layer._qtulu_cast_dtypes
    return type(layer)._cast_input_dtype(layer, x, master_dtype if dtype == copy_dtype else dtype)


class TrainerSetup:
    """What ``qtulu train`` needs for ``train.master_weights: host`` (see `trainer_setup`)."""

    def __init__(self, master: HostMaster, optimizer, callback) -> None:
        self.master, self.optimizer, self.callback = master, optimizer, callback

    def restore(self, checkpoint: Path | None) -> None:
        """After a checkpoint's adapter weights were loaded into the model: the masters it saved
        (exact), or, for a checkpoint of a run with the masters on the device, its weights."""
        if checkpoint is None:
            return
        saved = Path(checkpoint) / MASTER_FILE
        if saved.is_file():
            self.master.load(saved)
            return
        with torch.no_grad():
            for p, m in zip(self.master.params, self.master.masters):
                m.copy_(p.detach())


def trainer_setup(peft_model, args, train_cfg, *, compute_dtype: torch.dtype, cuda: bool, world_size: int,
                  resume_from: Path | None) -> TrainerSetup:
    """Host masters for HF Trainer: the optimizer over them (pass ``optimizers=(setup.optimizer, None)``),
    a callback (add it before qtulu's non-finite guard) and ``args.max_grad_norm`` set to 0: the
    gradients are clipped on the host, by the optimizer's step pre-hook, to ``train.max_grad_norm``.

    The device copies are in ``compute_dtype`` when CUDA autocast computes in it (bf16/fp16 on a
    GPU); elsewhere they stay fp32, as peft's LoRA weights (no autocast, no cast to undo).
    """
    import copy

    from transformers import Trainer, TrainerCallback
    from transformers.training_args import OptimizerNames

    if world_size > 1 or getattr(train_cfg, "fsdp", None):
        raise MasterWeightsError("train.master_weights=host runs in a single process (DDP/FSDP would reduce the "
                                 "device gradients it frees); use train.master_weights=device")
    copy_dtype = compute_dtype if cuda and compute_dtype != torch.float32 else torch.float32
    master = HostMaster(peft_model.named_parameters(), compute_dtype=copy_dtype)
    master.match_input_casts(peft_model)
    host_args = copy.copy(args)
    host_args.optim = OptimizerNames(host_optimizer_name(train_cfg.optimizer))
    cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(host_args, peft_model)
    optimizer = cls([{"params": master.masters, "weight_decay": train_cfg.weight_decay}], **kwargs)
    master.attach(optimizer, train_cfg.max_grad_norm)
    args.max_grad_norm = 0.0

    class _HostMasterCallback(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            setup.restore(resume_from)  # Trainer has loaded the checkpoint's adapter by now

        def on_pre_optimizer_step(self, args, state, control, **kw):
            master.drain()  # the guard that runs next reads the masters' gradients

    setup = TrainerSetup(master, optimizer, _HostMasterCallback())
    return setup
