"""Multi-process training on one node: DDP (torchrun / accelerate) and FSDP2.

Rank bookkeeping from the launcher's environment, the FSDP2 settings handed to HF Trainer for
``train.fsdp``, the set-ups qtulu refuses (`fsdp_refusal`), and gathering the sharded LoRA
tensors for the final adapter save.
"""

from __future__ import annotations

import os
from pathlib import Path


def say(msg: str) -> None:
    """Print a `qtulu train` line on rank 0 only."""
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"[qtulu train] {msg}", flush=True)


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def fsdp_from_env() -> bool:
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"  # `accelerate launch --use_fsdp`


def fsdp_settings(train_cfg, world_size: int) -> tuple[bool, dict | None]:
    """``(fsdp, fsdp_config)`` for HF ``TrainingArguments``: FSDP2 (``fully_shard``) or off.

    On when ``train.fsdp`` is set and the run has several ranks; a single process has nothing to
    shard and trains as usual. ``accelerate launch --use_fsdp --fsdp_version 2`` needs nothing here:
    accelerate builds its plugin from the environment (on CPU, see the trainer's
    ``create_accelerator_and_postprocess``).
    """
    if not train_cfg.fsdp:
        return False, None
    if world_size <= 1:
        say(f"train.fsdp={train_cfg.fsdp} with one process: nothing to shard, training without FSDP")
        return False, None
    # version 2: per-parameter sharding (DTensor), frozen and trainable parameters may share a unit
    return True, {"version": 2, "reshard_after_forward": train_cfg.fsdp == "full_shard"}


def fsdp_refusal(train_cfg, world_size: int) -> str | None:
    """Why qtulu refuses this FSDP set-up (None when it is fine or FSDP is off); checked before anything loads.

    Supported: FSDP2 (``train.fsdp``, or ``accelerate launch --use_fsdp --fsdp_version 2``), checkpoints
    included (`save_fsdp_model`). FSDP1 flattens every parameter of a unit into one buffer of one
    dtype, which NF4's uint8 codes cannot join (and it needs an accelerator device).
    """
    if world_size <= 1 or not (train_cfg.fsdp or fsdp_from_env()):
        return None
    how = f"train.fsdp={train_cfg.fsdp}" if train_cfg.fsdp else "accelerate launch --use_fsdp"
    if not train_cfg.fsdp and os.environ.get("FSDP_VERSION", "1") != "2":
        return (
            f"{how} asks for FSDP version {os.environ.get('FSDP_VERSION', '1')}: qtulu supports FSDP2 only (FSDP1 "
            "flattens each unit into one buffer of one dtype, which the NF4 uint8 codes cannot join). Launch with "
            "`accelerate launch --use_fsdp --fsdp_version 2 ...`, or set train.fsdp=full_shard under torchrun."
        )
    if getattr(train_cfg, "keep_best_checkpoint", False):
        # the best checkpoint's weights would be loaded into the sharded model after training, which
        # `qtulu.train.run._load_checkpoint_weights` does for whole tensors only
        return (f"{how} with train.keep_best_checkpoint: not supported under FSDP yet; the best step and its "
                "checkpoint are still recorded (OUT/adapter/qtulu.json best_eval): set keep_best_checkpoint=false")
    return None


def full_trainable_state(model) -> dict:
    """``model.state_dict()`` with the trainable (LoRA) tensors of an FSDP2 model gathered in full.

    Collective: every rank must call it. Frozen base tensors stay local shards (peft's adapter
    state dict leaves them out), so no rank ever holds the whole base.
    """
    from torch.distributed.tensor import DTensor

    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    out = {}
    for name, t in model.state_dict().items():
        if isinstance(t, DTensor) and name in trainable:
            t = t.full_tensor().cpu()
        out[name] = t
    return out


# FSDP2 checkpoints: torch.distributed.checkpoint (DCP) folders inside the staged checkpoint-N.
# Only the trainable (LoRA) tensors and their optimizer states are saved: the frozen base is the
# recipe's (its SHA-256 is in the run identity). Keys are parameter names, not rank-local layouts,
# so DCP can reshard a checkpoint written by N ranks onto M.
FSDP_MODEL_DIR = "fsdp_model.dcp"
FSDP_OPTIM_DIR = "fsdp_optimizer.dcp"
FSDP_GROUPS_FILE = "fsdp_optimizer_groups.json"
RANK_KEY = "@rank"  # optimizer states local to one rank (see _optimizer_tensors)


def _trainable(model) -> dict:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def _optimizer_tensors(model, optimizer, *, init: bool) -> dict:
    """``{"<param name>/<state key>": tensor}`` of the optimizer's per-parameter state (the live tensors,
    so that a DCP load fills them in place). ``init``: create the state first (a step with zero
    gradients at lr 0: the states exist, the weights do not move) so that a fresh optimizer can be loaded."""
    import torch

    opt = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps torch's
    params = _trainable(model)
    if init and any(p not in opt.state for p in params.values()):
        lrs = [g["lr"] for g in opt.param_groups]
        for g in opt.param_groups:
            g["lr"] = 0.0
        for p in params.values():
            p.grad = torch.zeros_like(p)
        opt.step()
        for g, lr in zip(opt.param_groups, lrs):
            g["lr"] = lr
        for p in params.values():
            p.grad = None
    from torch.distributed.tensor import DTensor

    rank = int(os.environ.get("RANK", "0"))
    out = {}
    for name, p in params.items():
        for key, value in opt.state.get(p, {}).items():
            if not torch.is_tensor(value):
                continue
            if isinstance(value, DTensor) or value.dim() == 0:
                out[f"{name}/{key}"] = value  # sharded like the parameter, or a step count equal on every rank
            else:
                # a plain tensor beside a sharded parameter describes this rank's shard only (an 8-bit
                # optimizer's block scales, say): DCP would keep rank 0's copy for all, so each rank
                # keeps its own, and only the same world size can load it (`load_fsdp_optimizer`)
                out[f"{name}/{key}{RANK_KEY}{rank}"] = value
    return out


def _group_hyper(optimizer) -> list[dict]:
    """The optimizer's per-group numbers (lr, betas, ...) as JSON (everything but the parameter list)."""
    opt = getattr(optimizer, "optimizer", optimizer)
    return [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items() if k != "params"}
            for g in opt.param_groups]


def save_fsdp_model(model, ckpt_dir) -> None:
    """Write the sharded LoRA tensors of an FSDP2 model into ``ckpt_dir`` (collective: every rank writes
    its shards; DCP's coordinator, rank 0, writes the metadata)."""
    import torch.distributed.checkpoint as dcp

    dcp.save(dict(_trainable(model)), checkpoint_id=str(Path(ckpt_dir) / FSDP_MODEL_DIR))


def save_fsdp_optimizer(model, optimizer, ckpt_dir) -> None:
    """Write the sharded optimizer states (and, rank 0, the groups' numbers) into ``ckpt_dir`` (collective)."""
    import json

    import torch.distributed.checkpoint as dcp

    dcp.save(_optimizer_tensors(model, optimizer, init=False), checkpoint_id=str(Path(ckpt_dir) / FSDP_OPTIM_DIR))
    if int(os.environ.get("RANK", "0")) == 0:
        (Path(ckpt_dir) / FSDP_GROUPS_FILE).write_text(json.dumps(_group_hyper(optimizer)))


def _safe_reader(path):
    """A DCP reader whose ``.metadata`` is unpickled with an allow-list, not `pickle.load`: DCP stores
    its metadata as a pickle, and qtulu never loads an arbitrary pickle from disk (a checkpoint folder
    is a file like any other). Allowed: DCP's own metadata classes, torch's Size/dtype/layout/
    memory_format values and a few builtins; anything else is refused, naming it."""
    import io
    import pickle

    import torch
    from torch.distributed.checkpoint import FileSystemReader

    from qtulu.train.checkpoint import CheckpointError

    torch_values = (torch.dtype, torch.layout, torch.memory_format)

    class _Unpickler(pickle.Unpickler):
        def find_class(self, module, name):
            if module.startswith("torch.distributed.checkpoint.") or (module, name) in (
                    ("torch", "Size"), ("collections", "OrderedDict"), ("builtins", "set"),
                    ("builtins", "frozenset"), ("builtins", "slice"), ("torch.serialization", "_get_layout"),
                    ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"), ("pathlib", "WindowsPath"),
                    ("pathlib", "PureWindowsPath")):
                return super().find_class(module, name)
            if module == "torch" and isinstance(getattr(torch, name, None), torch_values):
                return getattr(torch, name)
            raise CheckpointError(f"{path}/.metadata: refers to {module}.{name}, which is not on "
                                  "qtulu's allow-list for DCP metadata; refusing to unpickle it")

    class _Reader(FileSystemReader):
        def read_metadata(self, *args, **kwargs):  # FileSystemReader.read_metadata, safe (torch 2.11-2.13)
            where = (self._get_metadata_path(kwargs.get("rank")) if hasattr(self, "_get_metadata_path")
                     else self.fs.concat_path(self.path, ".metadata"))
            with self.fs.create_stream(where, "rb") as f:
                metadata = _Unpickler(io.BytesIO(f.read())).load()
            if hasattr(self, "load_id"):
                from torch.distributed.checkpoint.metadata import StorageMeta

                if getattr(metadata, "storage_meta", None) is None:
                    metadata.storage_meta = StorageMeta()
                metadata.storage_meta.load_id = self.load_id
            return metadata

    return _Reader(str(path))


def load_fsdp_model(model, ckpt_dir) -> None:
    """Load the LoRA tensors of an FSDP checkpoint into an FSDP2-wrapped model, in place (collective)."""
    import torch.distributed.checkpoint as dcp

    dcp.load(_trainable(model), storage_reader=_safe_reader(Path(ckpt_dir) / FSDP_MODEL_DIR))


def load_fsdp_optimizer(model, optimizer, ckpt_dir) -> None:
    """Load the optimizer states (and group numbers) of an FSDP checkpoint, in place (collective)."""
    import json

    import torch.distributed.checkpoint as dcp

    ckpt_dir = Path(ckpt_dir)
    saved_ranks = {k.rsplit(RANK_KEY, 1)[1] for k in _safe_reader(ckpt_dir / FSDP_OPTIM_DIR)
                   .read_metadata().state_dict_metadata if RANK_KEY in k}
    if saved_ranks and len(saved_ranks) != world_size():
        from qtulu.train.checkpoint import CheckpointError

        raise CheckpointError(f"{ckpt_dir}: written by {len(saved_ranks)} ranks with an optimizer whose states are "
                         f"local to each rank's shard: it resumes on {len(saved_ranks)} ranks only, not {world_size()}")
    dcp.load(_optimizer_tensors(model, optimizer, init=True), storage_reader=_safe_reader(ckpt_dir / FSDP_OPTIM_DIR))
    opt = getattr(optimizer, "optimizer", optimizer)
    saved = json.loads((ckpt_dir / FSDP_GROUPS_FILE).read_text())
    if len(saved) != len(opt.param_groups):
        from qtulu.train.checkpoint import CheckpointError

        raise CheckpointError(f"{ckpt_dir}: {len(saved)} optimizer parameter groups saved, the run has {len(opt.param_groups)}")
    for g, s in zip(opt.param_groups, saved):
        g.update({k: (tuple(v) if isinstance(g.get(k), tuple) else v) for k, v in s.items()})


def is_fsdp_checkpoint(ckpt_dir) -> bool:
    return (Path(ckpt_dir) / FSDP_MODEL_DIR).is_dir()
