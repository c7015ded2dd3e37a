"""Multi-process training on one node: DDP (torchrun / accelerate) and FSDP2.

Rank bookkeeping from the launcher's environment, the FSDP2 settings handed to HF Trainer for
``train.fsdp``, the set-ups qtulu refuses (`fsdp_refusal`), and gathering the sharded LoRA
tensors for the final adapter save.
"""

from __future__ import annotations

import os


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

    Supported: FSDP2 (``train.fsdp``, or ``accelerate launch --use_fsdp --fsdp_version 2``), with
    ``train.save_steps: 0``. FSDP1 flattens every parameter of a unit into one buffer of one
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
    if train_cfg.save_steps > 0:
        # HF Trainer saves FSDP checkpoints through torch.distributed.checkpoint, which walks every
        # state-dict key as an attribute path: NF4's quant-state keys (``weight.absmax``) are not
        # attributes (AttributeError: 'DTensor' object has no attribute 'absmax'); and in CPU/gloo
        # runs the "full" model state dict it hands to peft still holds DTensor shards.
        return (
            f"{how} with train.save_steps={train_cfg.save_steps}: qtulu does not write checkpoints (so cannot "
            "resume) under FSDP yet. Set train.save_steps=0 (the final adapter is still saved), or drop FSDP "
            "and use DDP (plain torchrun), which checkpoints and resumes exactly."
        )
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
