"""`qtulu train RECIPE`: QLoRA/LoRA supervised finetuning on packed rows, with TRL's SFTTrainer.

Flow: recipe -> base (`qtulu.model.load.load_base`, NF4 unless ``model.quantize: null``) -> LoRA
(`qtulu.model.load.attach_lora`) -> packed dataset (`qtulu.data.build.build_dataset`, or one given) ->
SFTTrainer -> ``OUT/adapter`` (PEFT dir + ``qtulu.json``, `qtulu.adapters.store.save_adapter`),
``OUT/loss.png``, ``OUT/steps.jsonl``; checkpoints in ``OUT/checkpoints/checkpoint-N``.

Batches. Rows are already packed (several examples per row, ``seq_lens`` giving the example
lengths); TRL's padding-free collator concatenates the rows of a micro-batch into one ``(1, total)``
sequence with ``position_ids`` restarting at 0 per example, so there is no padding and no (T, T)
mask (the ``qtulu_varlen`` attention reads the boundaries from ``position_ids``).

Loss. HF Trainer counts the supervised tokens of the whole optimizer step (all micro-batches, all
ranks: ``num_items_in_batch``) and TRL's fused LM head divides each micro-batch's summed token loss
by that count, so the step loss is the mean over supervised tokens of the step, whatever the
packing, micro-batch size, accumulation or world size (``tests/train/test_run.py`` checks it).

Reliability: checkpoints are staged then renamed (`qtulu.train.checkpoint`, through the trainer subclass
in `qtulu.train.trainer`); one run per output directory (`qtulu.train.runlock`); resume picks the newest
complete one and refuses a changed recipe unless forced; non-finite steps are skipped and counted
(`qtulu.train.callbacks`); nothing non-finite is saved.

Scale-out: DDP under torchrun/accelerate; FSDP2 with ``train.fsdp`` (or ``accelerate launch
--use_fsdp --fsdp_version 2``) for LoRA and QLoRA, without checkpoints (`check_fsdp` says why).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qtulu.errors import QtuluError
from qtulu.preflight import check_base_source, check_run_name
from qtulu.train.runlock import locks_run_dir, set_aside_checkpoints
from qtulu.train.distributed import (
    fsdp_refusal,
    fsdp_settings,
    full_trainable_state,
    say,
    world_size,
)

log = logging.getLogger("qtulu.train.run")

ADAPTER_DIRNAME = "adapter"
CHECKPOINTS_DIRNAME = "checkpoints"


class TrainError(QtuluError, RuntimeError):
    """A training run that cannot start or did not finish (message says why and what to do)."""


@dataclass
class TrainResult:
    """What `train` produced. ``steps``: one record per optimizer step (loss, lr, skipped)."""

    output_dir: Path
    adapter_dir: Path | None
    global_step: int
    steps: list[dict[str, Any]]
    skipped_steps: int
    resumed_from: str | None
    seconds: float
    loss_png: Path | None
    gradient_accumulation_steps: int
    model: Any = field(default=None, repr=False)
    tokenizer: Any = field(default=None, repr=False)

    @property
    def losses(self) -> list[float | None]:
        return [s["loss"] for s in self.steps]


# --------------------------------------------------------------------------------------------
# helpers (no trainer needed; tested directly)


def check_fsdp(train_cfg, world_size: int) -> None:
    """Raise `TrainError` for an FSDP set-up qtulu does not support (`qtulu.train.distributed.fsdp_refusal`)."""
    reason = fsdp_refusal(train_cfg, world_size)
    if reason:
        raise TrainError(reason)


def resolve_optimizer(name: str, *, cuda: bool | None = None) -> str:
    """The HF ``optim`` name to use: bitsandbytes' paged 8-bit AdamW needs CUDA; off CUDA -> adamw_torch."""
    import torch

    cuda = torch.cuda.is_available() if cuda is None else cuda
    if name in ("paged_adamw_8bit", "paged_adamw_32bit", "adamw_bnb_8bit", "adamw_8bit") and not cuda:
        say(f"optimizer {name} needs CUDA (bitsandbytes paged optimizer); using adamw_torch on this machine")
        return "adamw_torch"
    return name


def resolve_report_to(report_to: str) -> str:
    """``none`` | ``tensorboard`` | ``wandb`` (comma-separated); one that is not installed is dropped with a note."""
    import importlib.util

    wanted = [r.strip() for r in str(report_to or "none").split(",") if r.strip() and r.strip() != "none"]
    have = []
    for r in wanted:
        module = {"tensorboard": "tensorboard", "wandb": "wandb"}.get(r, r)
        if importlib.util.find_spec(module) is None:
            say(f"report_to={r}: package {module!r} is not installed; not reporting there (pip install {module})")
        else:
            have.append(r)
    return ",".join(have) if have else "none"


def to_train_columns(dataset):
    """The packed dataset as TRL's padding-free collator reads it: ``input_ids``, ``labels``, ``seq_lengths``.

    Accepts qtulu's packed rows (``seq_lens``) or TRL's (``seq_lengths``); ``position_ids`` are
    recomputed by the collator from the lengths (identical: they restart at 0 per example).
    """
    cols = set(dataset.column_names)
    missing = {"input_ids", "labels"} - cols
    if missing:
        raise TrainError(f"training data lacks column(s) {sorted(missing)} (have {sorted(cols)}): build it with `qtulu data build`")
    if "seq_lengths" not in cols:
        if "seq_lens" not in cols:
            raise TrainError(f"training data lacks 'seq_lens' (example lengths per packed row); have {sorted(cols)}")
        dataset = dataset.rename_column("seq_lens", "seq_lengths")
    keep = ["input_ids", "labels", "seq_lengths"]
    dataset = dataset.select_columns(keep)
    if getattr(dataset, "_indices", None) is not None:
        dataset = dataset.flatten_indices()  # fingerprints and counts read the Arrow table directly
    return dataset


def data_fingerprint(dataset) -> str:
    """SHA-256 of the token and label contents of the packed rows (same data -> same value)."""
    import numpy as np

    h = hashlib.sha256()
    table = dataset.data.table if hasattr(dataset.data, "table") else dataset.data
    for col in ("input_ids", "labels", "seq_lengths"):
        if col not in dataset.column_names:
            continue
        arr = table.column(col).combine_chunks()
        h.update(col.encode())
        h.update(np.asarray(arr.offsets).astype(np.int64).tobytes())
        h.update(np.asarray(arr.flatten()).astype(np.int64).tobytes())
    return h.hexdigest()


def examples_per_row(dataset) -> float:
    """Mean number of examples packed in a row (from ``seq_lengths``)."""
    import numpy as np

    arr = dataset.data.table.column("seq_lengths").combine_chunks() if hasattr(dataset.data, "table") else None
    if arr is None:
        lens = [len(x) for x in dataset["seq_lengths"]]
        return sum(lens) / max(1, len(lens))
    offsets = np.asarray(arr.offsets)
    return float(offsets[-1] - offsets[0]) / max(1, len(dataset))


def gradient_accumulation(train_cfg, dataset, world_size: int = 1) -> int:
    """Accumulation steps so that an optimizer step sees ~``effective_batch_size`` examples.

    ``effective_batch_size`` counts examples (as open-instruct), a micro-batch holds
    ``micro_batch_size`` packed rows of ~``examples_per_row`` examples each, on each of
    ``world_size`` ranks. An explicit ``gradient_accumulation_steps`` wins.
    """
    if train_cfg.gradient_accumulation_steps is not None:
        return int(train_cfg.gradient_accumulation_steps)
    per_micro = train_cfg.micro_batch_size * world_size * max(examples_per_row(dataset), 1e-9)
    return max(1, round(train_cfg.effective_batch_size / per_micro))


def _checkpointing_args(config_cls, enabled: bool) -> dict:
    """Activation-checkpointing arguments under the names this transformers knows.

    transformers 5.2x renamed ``gradient_checkpointing*`` to ``activation_checkpointing*`` (the old
    names warn); the GPU image's older release only has the old ones.
    """
    import dataclasses

    names = {f.name for f in dataclasses.fields(config_cls)}
    prefix = "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"
    return {prefix: enabled, f"{prefix}_kwargs": {"use_reentrant": False} if enabled else None}


# --------------------------------------------------------------------------------------------
# public API


def load_for_recipe(recipe, model=None, tokenizer=None, device=None):
    """`qtulu.model.load.load_base` with the recipe's model settings; ``model`` may be an in-memory model."""
    from qtulu.model.load import load_base

    m = recipe.model
    source = model if model is not None else m.base
    if source is None:
        raise TrainError(f"{recipe.path or recipe.name}: model.base: no base model given (set model.base or pass a model)")
    return load_base(
        source,
        quantize=m.quantize,
        compute_dtype=m.compute_dtype,
        double_quant=m.double_quant,
        blocksize=m.blocksize,
        revision=m.revision,
        trust_remote_code=m.trust_remote_code,
        attn_implementation=m.attn_implementation,
        tokenizer=tokenizer if tokenizer is not None else recipe.data.tokenizer,
        device=device,
    )


@locks_run_dir  # one writer per run directory: a second run on OUT fails at once, naming the holder
def train(
    recipe,
    *,
    output_dir: str | os.PathLike,
    overrides=None,
    model=None,
    tokenizer=None,
    data=None,
    resume: str = "auto",
    force: bool = False,
    progress: bool = True,
    adapter_name: str = "default",
    callbacks=(),
    name: str | None = None,
) -> TrainResult:
    """Train one LoRA/QLoRA adapter for ``recipe``; returns a `TrainResult` (adapter in ``OUT/adapter``).

    ``recipe``: a `Recipe`, a path or a name (``overrides`` as in `load_recipe`).
    ``model`` / ``tokenizer``: an in-memory base (quantized in place per ``recipe.model``) and its
    tokenizer, instead of ``recipe.model.base``. ``data``: a `BuiltData` or a packed ``Dataset``
    instead of building from the recipe's sources.
    ``resume``: ``"auto"`` (newest complete checkpoint in ``OUT/checkpoints`` if any), ``"never"``,
    or a checkpoint path. A checkpoint from a different recipe/data is refused (`ResumeMismatch`)
    unless ``force``. Raises `NonFiniteError` when the run stopped on non-finite steps.
    ``name``: the run's name, recorded in the adapter (chat/eval/merge call it so); default the
    recipe's name.

    Order: everything that can fail without the model is checked first (recipe, run name, base
    path, tokenizer, data build), so that a typo costs seconds, not a base load. Ctrl-C stops with
    a `KeyboardInterrupt` naming the last complete checkpoint (the same command resumes from it).
    """
    from qtulu import files
    from qtulu.train import checkpoint as ck
    from qtulu.recipes import Recipe, load_recipe

    t0 = time.time()
    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe, overrides)
    elif overrides:
        raise TrainError("pass overrides with a recipe path/name, not with a Recipe object")
    t = recipe.train
    check_fsdp(t, world_size())
    # checks that need neither the model nor torch/transformers/trl (a typo costs a fraction of a second)
    run_name = check_run_name(name or recipe.name)
    if model is None:
        check_base_source(recipe)
    if t.master_weights == "host" and (world_size() > 1 or t.fsdp):
        raise TrainError(f"{recipe.path or recipe.name}: train.master_weights=host runs in a single process (no DDP/FSDP)")
    if t.activation_offload and not t.gradient_checkpointing:
        raise TrainError(f"{recipe.path or recipe.name}: train.activation_offload offloads the checkpointed layer "
                         "inputs: it needs train.gradient_checkpointing: true")
    out = Path(output_dir)
    run_dir = out / CHECKPOINTS_DIRNAME
    is_main = int(os.environ.get("RANK", "0")) == 0
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        for p in ck.clean_stale(run_dir):
            say(f"removed {p.name} (left by an interrupted checkpoint write)")

    # ---- resume point (decided before anything heavy so that a refusal is quick)
    resume_from: Path | None = None
    if resume not in ("auto", "never", None):
        resume_from = Path(resume)
        ck.check_complete(resume_from)
    elif resume == "auto":
        resume_from = ck.last_complete_checkpoint(run_dir, log=say)
    elif is_main:  # a fresh run: an earlier run's checkpoints must not be resumed later, nor lost
        set_aside_checkpoints(run_dir, say=say)

    # ---- data, built before the base is loaded (a bad row must not cost a base load)
    import torch
    from transformers import set_seed
    from trl import SFTConfig

    from qtulu.train.callbacks import GuardCallback, NonFiniteError, StepGuard, plot_losses
    from qtulu.model.load import attach_lora, base_info

    if data is None:
        from qtulu.data.build import build_dataset, resolve_tokenizer

        tokenizer = resolve_tokenizer(recipe, tokenizer)  # data.tokenizer, else the base's own files
        data = build_dataset(recipe, tokenizer, progress=progress, say=say)  # drops, repeats: on the console

    # ---- model, LoRA
    set_seed(t.seed)
    base, tok = load_for_recipe(recipe, model=model, tokenizer=tokenizer)
    if tok is None:
        raise TrainError("no tokenizer: pass tokenizer= or set data.tokenizer in the recipe")
    info = base_info(base)
    manifest = None
    if hasattr(data, "dataset"):
        manifest = getattr(data, "manifest", None)
        data = data.dataset
    dataset = to_train_columns(data)
    if len(dataset) == 0:
        raise TrainError("the packed training dataset is empty")
    world = world_size()
    ga = gradient_accumulation(t, dataset, world)
    identity = {
        "recipe": recipe.to_dict(),
        "data_fingerprint": data_fingerprint(dataset),
        "world_size": world,
        "gradient_accumulation_steps": ga,
        "base": {"weights_sha256": info.get("weights_sha256"), "quantization": info.get("quantization")},
    }
    resumed_guard = None
    if resume_from is not None:
        saved = ck.read_manifest(resume_from)
        ck.check_resume(saved, identity, where=resume_from, force=force, warn=say)
        resumed_guard = saved.get("guard")
        say(f"resuming from {resume_from}")

    set_seed(t.seed)  # LoRA init depends only on the seed
    peft_model = attach_lora(base, recipe.lora, adapter_name=adapter_name)
    if recipe.lora.dropout_impl == "recompute":  # memory switch (qtulu.train.lora_dropout)
        from qtulu.train.lora_dropout import use_recompute_dropout

        use_recompute_dropout(peft_model)

    cuda = torch.cuda.is_available()
    dtype = recipe.model.compute_dtype
    fsdp_on, fsdp_config = fsdp_settings(t, world)
    args = SFTConfig(
        output_dir=str(run_dir),
        per_device_train_batch_size=t.micro_batch_size,
        gradient_accumulation_steps=ga,
        learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler,
        warmup_steps=float(t.warmup_ratio),
        num_train_epochs=float(t.epochs),
        max_steps=int(t.max_steps),
        seed=t.seed,
        data_seed=t.seed,
        optim=resolve_optimizer(t.optimizer, cuda=cuda),
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        **_checkpointing_args(SFTConfig, t.gradient_checkpointing),
        logging_steps=t.logging_steps,
        save_strategy="steps" if t.save_steps > 0 else "no",
        save_steps=max(1, t.save_steps),
        save_total_limit=None,  # rotated by qtulu.train.checkpoint.rotate, after the staged rename
        report_to=resolve_report_to(t.report_to),
        disable_tqdm=not progress,
        # the rows are tokenized, masked and packed already: TRL only collates them, padding-free
        packing=True,
        padding_free=True,
        max_length=None,
        dataset_kwargs={"skip_prepare_dataset": True},
        bf16=bool(cuda and dtype == "bfloat16"),
        fp16=bool(cuda and dtype == "float16"),
        use_cpu=not cuda,
        dataloader_num_workers=0,
        ddp_find_unused_parameters=False,
        fsdp=True if fsdp_on else None,
        fsdp_config=fsdp_config,
        ddp_backend="gloo" if (world > 1 and not cuda) else None,
        save_only_model=False,
    )
    host = None
    if t.master_weights == "host":  # memory switch (qtulu.train.master_weights): fp32 masters + optimizer on the host
        from qtulu.train.master_weights import trainer_setup
        from qtulu.model.load import as_dtype

        host = trainer_setup(peft_model, args, t, compute_dtype=as_dtype(dtype), cuda=cuda, world_size=world,
                             resume_from=resume_from)
    guard = StepGuard(t.max_nonfinite_in_a_row)
    guard.load_state(resumed_guard)
    from qtulu.train.trainer import make_trainer_class

    Trainer = make_trainer_class()
    trainer = Trainer(
        model=peft_model,
        args=args,
        train_dataset=dataset,
        processing_class=tok,
        qtulu_guard=guard,
        qtulu_identity=identity,
        qtulu_keep=t.save_total_limit,
        optimizers=(host.optimizer if host else None, None),
    )
    if host is not None:
        trainer.qtulu_master = host.master
        trainer.add_callback(host.callback)  # before the guard: it sums the gradients the guard reads
    trainer.add_callback(GuardCallback(trainer, guard))
    if t.activation_offload:  # memory switch (qtulu.train.offload): wraps checkpointing once the trainer turned it on
        from qtulu.train.offload import offload_callback

        trainer.add_callback(offload_callback())
    for cb in callbacks:
        trainer.add_callback(cb)
    say(
        f"{len(dataset)} packed rows ({examples_per_row(dataset):.2f} examples/row), micro-batch {t.micro_batch_size} row(s), "
        f"accumulation {ga}, world size {world}, optimizer {getattr(args.optim, 'value', args.optim)}, "
        f"base {'NF4' if info.get('quantization') else dtype}"
    )
    done = int(ck.read_manifest(resume_from).get("global_step", 0)) if resume_from else 0
    if resume_from is not None and 0 < t.max_steps <= done:
        # HF Trainer would run one more step when resumed at max_steps: load the weights instead
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        set_peft_model_state_dict(peft_model, load_file(str(resume_from / "adapter_model.safetensors")),
                                  adapter_name=adapter_name)
        if host is not None:
            host.restore(resume_from)
        trainer.state.global_step = done
        say(f"{resume_from.name} already reached train.max_steps={t.max_steps}: nothing left to train")
    else:
        from qtulu.train.loss import loss_chunking
        from qtulu.model.threads import fitted_threads

        try:
            # one intra-op thread for a small model (more only oversubscribe); loss tiles (qtulu.train.loss)
            with fitted_threads(base), loss_chunking(t.loss_chunk_size):
                trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
        except KeyboardInterrupt:
            raise KeyboardInterrupt(ck.interrupted_message(out, guard.steps, is_main)) from None
        if resume_from is None and trainer.state.global_step == 0:  # never save an untrained adapter as a result
            raise TrainError(f"the run took 0 optimizer steps ({len(dataset)} packed rows, train.epochs={t.epochs}, "
                             f"train.max_steps={t.max_steps}); no adapter was saved")

    steps = guard.steps
    if is_main:
        files.atomic_write_text(out / "steps.jsonl", "".join(json.dumps(s) + "\n" for s in steps))
    if guard.stopped:
        raise NonFiniteError(
            f"training stopped at step {trainer.state.global_step}: {guard.in_a_row} optimizer steps in a row had a "
            f"NaN/inf loss or gradient (train.max_nonfinite_in_a_row={t.max_nonfinite_in_a_row}); "
            f"{guard.skipped_total} skipped in all. No adapter was saved; the last checkpoint holds finite weights. "
            "Lower train.learning_rate or check the data."
        )
    adapter_dir = None
    png = None
    gathered = full_trainable_state(peft_model) if trainer.is_fsdp_enabled else None  # collective
    if is_main:
        from qtulu.adapters.store import save_adapter

        adapter_dir = save_adapter(
            peft_model,
            out / ADAPTER_DIRNAME,
            adapter_name=adapter_name,
            base_info=info,
            recipe=recipe.to_dict(),
            manifest=manifest,
            extra={
                "train": {
                    "global_step": trainer.state.global_step,
                    "skipped_steps": guard.skipped_total,
                    "gradient_accumulation_steps": ga,
                    "world_size": world,
                    "optimizer": getattr(args.optim, "value", str(args.optim)),
                    "final_loss": next((s["loss"] for s in reversed(steps) if s["loss"] is not None), None),
                    "resumed_from": str(resume_from) if resume_from else None,
                },
            },
            # FSDP2 serves peft_model.state_dict() as local shards: save from the gathered tensors
            state_dict=host.master.adapter_state(peft_model, adapter_name) if host else gathered,
            name=run_name,
        )
        png = plot_losses(steps, out / "loss.png", title=f"{recipe.name}: training loss")
        say(f"adapter saved to {adapter_dir}" + (f"; loss curve {png}" if png else ""))
    trainer.accelerator.wait_for_everyone()
    return TrainResult(
        output_dir=out,
        adapter_dir=adapter_dir,
        global_step=trainer.state.global_step,
        steps=steps,
        skipped_steps=guard.skipped_total,
        resumed_from=str(resume_from) if resume_from else None,
        seconds=time.time() - t0,
        loss_png=png,
        gradient_accumulation_steps=ga,
        model=peft_model,
        tokenizer=tok,
    )


# --------------------------------------------------------------------------------------------
# CLI


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "train",
        help="train a QLoRA/LoRA adapter for a recipe",
        description="Train one adapter for RECIPE (a recipes/ name or a YAML path) on its packed data.",
    )
    p.add_argument("recipe", help="recipe name (recipes/<name>.yaml) or path")
    p.add_argument("--set", "-o", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe key, e.g. --set train.learning_rate=2e-4 (repeatable)")
    p.add_argument("--preset", default=None, metavar="NAME",
                   help="apply a settings preset before the overrides, e.g. smoke (a CPU try-out of any recipe "
                        "in about a minute); `qtulu recipe presets` lists them")
    p.add_argument("--name", default=None,
                   help="the run's name: the adapter's name in chat/eval/merge and the default run directory "
                        "(default: the recipe's name)")
    p.add_argument("--output-dir", "--out", dest="output_dir", default=None,
                   help="run directory (default: runs/<name>); the adapter goes to OUT/adapter")
    p.add_argument("--resume", default="auto",
                   help="auto (newest complete checkpoint in OUT/checkpoints), never, or a checkpoint path")
    p.add_argument("--force", action="store_true", help="resume even if the recipe/data changed since the checkpoint")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_cli)


def _cli(args: argparse.Namespace) -> int:
    from qtulu.presets import preset_overrides
    from qtulu.recipes import load_recipe

    # errors (RecipeError, CheckpointError, TrainError, NonFiniteError, ModelLoadError, ...) are
    # qtulu errors: qtulu.cli prints them as one line, exit 2
    recipe = load_recipe(args.recipe, preset_overrides(args.preset, args.recipe) + list(args.overrides))
    name = check_run_name(args.name or recipe.name)
    out = args.output_dir or os.path.join("runs", name)
    result = train(recipe, output_dir=out, resume=args.resume, force=args.force, progress=not args.no_progress,
                   name=name)
    if result.adapter_dir is not None:
        last = next((s["loss"] for s in reversed(result.steps) if s["loss"] is not None), float("nan"))
        print(
            f"done: {result.global_step} steps ({result.skipped_steps} skipped), final loss {last:.4f}, "
            f"{result.seconds:.0f}s; adapter: {result.adapter_dir}"
        )
    return 0
