"""`qtulu train RECIPE`: QLoRA/LoRA supervised finetuning on packed rows, with TRL's SFTTrainer.

Flow: recipe -> base (`qtulu.model.load.load_base`, NF4 unless ``model.quantize: null``) -> LoRA
(`qtulu.model.load.attach_lora`) -> packed dataset (`qtulu.data.build.build_dataset`, or one given) ->
SFTTrainer -> ``OUT/adapter`` (PEFT dir + ``qtulu.json``, `qtulu.adapters.store.save_adapter`),
``OUT/loss.png``, ``OUT/steps.jsonl``; checkpoints in ``OUT/checkpoints/checkpoint-N``.

Watching a run. ``steps.jsonl`` gets one line per optimizer step and per evaluation, appended and
flushed at every logging step (`qtulu.train.callbacks.StepsLog`; a resumed run rewrites it to its
checkpoint's lines first). ``data.validation`` holds examples out (`qtulu.train.validation`); their
loss, the mean over their supervised tokens (`QTuluTrainer.evaluation_loop`), is evaluated every
``train.eval_steps`` steps and at the end, plotted in ``loss.png`` and printed in the summary;
``train.keep_best_checkpoint`` saves the best one as the adapter. ``train.report_to``
(tensorboard -> ``OUT/tensorboard``, wandb) must be installed: checked before the model loads.

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
--use_fsdp --fsdp_version 2``) for LoRA and QLoRA, checkpointed with torch.distributed.checkpoint
(`qtulu.train.distributed`); FSDP1 is refused (`check_fsdp` says why).
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qtulu.errors import QtuluError
from qtulu.preflight import check_base_source, check_run_name, check_run_output
from qtulu.train.runlock import locks_run_dir, set_aside_adapter, set_aside_checkpoints
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
    evals: list[dict[str, Any]] = field(default_factory=list)  # {"step", "eval_loss", "eval_tokens"} per evaluation
    best_eval: dict[str, Any] | None = None  # {"step", "eval_loss"}: the lowest validation loss
    adapter_step: int | None = None  # the step whose weights OUT/adapter holds (the best one if kept)

    @property
    def losses(self) -> list[float | None]:
        return [s["loss"] for s in self.steps]

    @property
    def eval_loss(self) -> float | None:
        """The last validation loss (at the end of the run), or None without validation."""
        return self.evals[-1]["eval_loss"] if self.evals else None

    def summary(self) -> str:
        """The one line `qtulu train` prints at the end."""
        last = next((s["loss"] for s in reversed(self.steps) if s["loss"] is not None), float("nan"))
        text = f"done: {self.global_step} steps ({self.skipped_steps} skipped), final loss {last:.4f}"
        if self.evals:
            text += f", validation loss {self.eval_loss:.4f}" if self.eval_loss is not None else ", validation loss nan"
            if self.best_eval and self.best_eval["step"] != self.evals[-1]["step"]:
                text += f" (best {self.best_eval['eval_loss']:.4f} at step {self.best_eval['step']}"
                text += ", kept)" if self.adapter_step == self.best_eval["step"] != self.global_step else ")"
        return text + f", {self.seconds:.0f}s; adapter: {self.adapter_dir}"


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


# the package each logger needs (HF's TensorBoard callback also takes tensorboardX)
_LOGGER_PACKAGES = {"tensorboard": ("tensorboard", "tensorboardX"), "wandb": ("wandb",)}


def resolve_report_to(report_to: str, where: str = "") -> str:
    """``none`` | ``tensorboard`` | ``wandb`` (comma-separated), as HF's ``report_to``.

    A requested logger that is not installed is a `TrainError` (checked before the model loads):
    a run the user means to watch must not train for hours unwatched.
    """
    import importlib.util

    wanted = [r.strip() for r in str(report_to or "none").split(",") if r.strip() and r.strip() != "none"]
    for r in wanted:
        modules = _LOGGER_PACKAGES.get(r, (r,))
        if all(importlib.util.find_spec(m) is None for m in modules):
            raise TrainError(f"{where + ': ' if where else ''}train.report_to={r}: the package {modules[0]!r} is not "
                             f"installed (pip install {modules[0]}, or set train.report_to=none)")
    return ",".join(wanted) if wanted else "none"


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

    The stages, in order: `_setup` (recipe, checks, run directory, resume point), `_build_data`,
    `_load_model` (base, LoRA, resume identity), `_make_trainer` (`_training_args`, callbacks),
    `_run_trainer`, `_save_result`.
    """
    run = _setup(recipe, overrides, output_dir=output_dir, model=model, name=name, resume=resume)
    data, tokenizer = _build_data(run, data, tokenizer, progress=progress)
    _load_model(run, data, model=model, tokenizer=tokenizer, force=force, adapter_name=adapter_name)
    _make_trainer(run, callbacks, progress=progress)
    _run_trainer(run, adapter_name=adapter_name)
    return _save_result(run, adapter_name=adapter_name)


@dataclass
class _Run:
    """What the stages of one `train` call share; each stage fills in its part."""

    recipe: Any
    out: Path
    run_dir: Path  # OUT/checkpoints
    is_main: bool
    run_name: str
    resume_from: Path | None
    t0: float
    # _build_data / _load_model
    manifest: dict | None = None
    dataset: Any = None
    eval_rows: Any = None  # held-out packed rows (data.validation), None without validation
    eval_dataset: Any = None
    base: Any = None
    tok: Any = None
    info: dict = field(default_factory=dict)
    peft_model: Any = None
    world: int = 1
    ga: int = 1
    identity: dict = field(default_factory=dict)
    resumed_guard: dict | None = None
    # _make_trainer
    args: Any = None
    trainer: Any = None
    guard: Any = None
    host: Any = None
    steps_log: Any = None

    @property
    def t(self):
        return self.recipe.train


def _setup(recipe, overrides, *, output_dir, model, name, resume) -> _Run:
    """Stage 1: the recipe, every check that needs neither torch nor the model, the run directory and
    the resume point (decided before anything heavy so that a refusal is quick)."""
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
    resolve_report_to(t.report_to, where=str(recipe.path or recipe.name))
    from qtulu.train.validation import check_validation_source

    check_validation_source(recipe)
    out = Path(output_dir)
    run_dir = out / CHECKPOINTS_DIRNAME
    is_main = int(os.environ.get("RANK", "0")) == 0
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        for p in ck.clean_stale(run_dir):
            say(f"removed {p.name} (left by an interrupted checkpoint write)")

    resume_from: Path | None = None
    if resume not in ("auto", "never", None):
        resume_from = Path(resume)
        ck.check_complete(resume_from)
    elif resume == "auto":
        resume_from = ck.last_complete_checkpoint(run_dir, log=say)
    elif is_main:  # a fresh run: an earlier run's checkpoints must not be resumed later, nor lost
        set_aside_checkpoints(run_dir, say=say)
        set_aside_adapter(out / ADAPTER_DIRNAME, say=say)
    return _Run(recipe=recipe, out=out, run_dir=run_dir, is_main=is_main, run_name=run_name,
                resume_from=resume_from, t0=t0)


def _build_data(run: _Run, data, tokenizer, *, progress: bool):
    """Stage 2: the packed data, built before the base is loaded (a bad row must not cost a base load),
    and the held-out validation rows (``data.validation``, `qtulu.train.validation`)."""
    from qtulu.data.build import build_dataset, resolve_tokenizer

    if data is None:
        tokenizer = resolve_tokenizer(run.recipe, tokenizer)  # data.tokenizer, else the base's own files
        data = build_dataset(run.recipe, tokenizer, progress=progress, say=say)  # drops, repeats: on the console
    if run.recipe.data.validation is not None:
        from qtulu.train.validation import hold_out

        if isinstance(run.recipe.data.validation, str):
            tokenizer = resolve_tokenizer(run.recipe, tokenizer)
        data, run.eval_rows, run.manifest = hold_out(run.recipe, data, tokenizer, progress=progress)
        v = run.manifest["validation"]
        say(f"validation: {v['validation']['examples']} example(s), {v['validation']['supervised_tokens']} supervised "
            f"tokens held out ({'fraction ' + str(v['fraction']) if v['source'] == 'fraction' else v['path']})")
    return data, tokenizer


def _load_model(run: _Run, data, *, model, tokenizer, force: bool, adapter_name: str) -> None:
    """Stage 3: the base (quantized), the training columns, the run's identity (checked against the
    resumed checkpoint's) and the LoRA adapter."""
    from transformers import set_seed

    from qtulu.train import checkpoint as ck
    from qtulu.model.load import attach_lora, base_info

    recipe, t = run.recipe, run.t
    set_seed(t.seed)
    base, tok = load_for_recipe(recipe, model=model, tokenizer=tokenizer)
    if tok is None:
        raise TrainError("no tokenizer: pass tokenizer= or set data.tokenizer in the recipe")
    info = base_info(base)
    manifest = run.manifest
    if hasattr(data, "dataset"):
        manifest = getattr(data, "manifest", None)
        data = data.dataset
    dataset = to_train_columns(data)
    if len(dataset) == 0:
        raise TrainError("the packed training dataset is empty")
    if run.eval_rows is not None:
        run.eval_dataset = to_train_columns(run.eval_rows)
    world = world_size()
    ga = gradient_accumulation(t, dataset, world)
    identity = {
        "recipe": recipe.to_dict(),
        "data_fingerprint": data_fingerprint(dataset),
        "world_size": world,
        "gradient_accumulation_steps": ga,
        "base": {"weights_sha256": info.get("weights_sha256"), "quantization": info.get("quantization")},
    }
    if run.resume_from is not None:
        saved = ck.read_manifest(run.resume_from)
        ck.check_resume(saved, identity, where=run.resume_from, force=force, warn=say)
        run.resumed_guard = saved.get("guard")
        say(f"resuming from {run.resume_from}")

    set_seed(t.seed)  # LoRA init depends only on the seed
    peft_model = attach_lora(base, recipe.lora, adapter_name=adapter_name)
    if recipe.lora.dropout_impl == "recompute":  # memory switch (qtulu.train.lora_dropout)
        from qtulu.train.lora_dropout import use_recompute_dropout

        use_recompute_dropout(peft_model)
    run.base, run.tok, run.info, run.manifest, run.dataset = base, tok, info, manifest, dataset
    run.world, run.ga, run.identity, run.peft_model = world, ga, identity, peft_model


def _training_args(run: _Run, *, progress: bool, cuda: bool):
    """The `SFTConfig` of the run (HF Trainer's arguments)."""
    from trl import SFTConfig

    t, dtype, world = run.t, run.recipe.model.compute_dtype, run.world
    fsdp_on, fsdp_config = fsdp_settings(t, world)
    return SFTConfig(
        output_dir=str(run.run_dir),
        per_device_train_batch_size=t.micro_batch_size,
        gradient_accumulation_steps=run.ga,
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
        run_name=run.run_name,  # the run's name in TensorBoard / W&B
        **_eval_args(run),
    )


def _eval_args(run: _Run) -> dict:
    """HF's evaluation arguments for ``data.validation`` / ``train.eval_steps``.

    HF's own schedule runs the evaluations (every ``eval_steps`` and once at the last step, see
    DefaultFlowCallback) and tracks the best ``eval_loss`` (``metric_for_best_model``: its step is
    kept in ``trainer_state.json``, so a resumed run remembers it). ``load_best_model_at_end`` is
    not used: HF would look for the best checkpoint under the staging folder it wrote it in and
    would not restore the host master weights (``train.master_weights=host``); `_save_result` loads
    the best checkpoint itself. ``eval_steps: 0`` (only at the end): `EvaluateAtEnd`.
    """
    t = run.t
    if run.eval_dataset is None:
        return {"eval_strategy": "no"}
    return {
        "eval_strategy": "steps" if t.eval_steps > 0 else "no",
        "eval_steps": t.eval_steps if t.eval_steps > 0 else None,
        "per_device_eval_batch_size": t.micro_batch_size,  # the training micro-batch's memory
        "metric_for_best_model": "eval_loss",
        "greater_is_better": False,
    }


def _make_trainer(run: _Run, callbacks, *, progress: bool) -> None:
    """Stage 4: the trainer (qtulu's SFTTrainer subclass), the step guard and the memory switches' callbacks."""
    import torch

    from qtulu.train.callbacks import GuardCallback, StepGuard
    from qtulu.train.trainer import make_trainer_class

    t, recipe = run.t, run.recipe
    cuda = torch.cuda.is_available()
    dtype = recipe.model.compute_dtype
    args = _training_args(run, progress=progress, cuda=cuda)
    host = None
    if t.master_weights == "host":  # memory switch (qtulu.train.master_weights): fp32 masters + optimizer on the host
        from qtulu.train.master_weights import trainer_setup
        from qtulu.model.load import as_dtype

        host = trainer_setup(run.peft_model, args, t, compute_dtype=as_dtype(dtype), cuda=cuda, world_size=run.world,
                             resume_from=run.resume_from)
    guard = StepGuard(t.max_nonfinite_in_a_row)
    guard.load_state(run.resumed_guard)
    Trainer = make_trainer_class()
    trainer = Trainer(
        model=run.peft_model,
        args=args,
        train_dataset=run.dataset,
        processing_class=run.tok,
        qtulu_guard=guard,
        qtulu_identity=run.identity,
        qtulu_keep=t.save_total_limit,
        qtulu_keep_best=t.keep_best_checkpoint,
        eval_dataset=run.eval_dataset,
        optimizers=(host.optimizer if host else None, None),
    )
    _tensorboard_dir(trainer, run.out / "tensorboard")
    if host is not None:
        trainer.qtulu_master = host.master
        trainer.add_callback(host.callback)  # before the guard: it sums the gradients the guard reads
    trainer.add_callback(GuardCallback(trainer, guard))
    if t.activation_offload:  # memory switch (qtulu.train.offload): wraps checkpointing once the trainer turned it on
        from qtulu.train.offload import offload_callback

        trainer.add_callback(offload_callback())
    for cb in callbacks:
        trainer.add_callback(cb)
    from qtulu.train.callbacks import EvaluateAtEnd, StepsLog

    if run.eval_dataset is not None and t.eval_steps == 0:
        trainer.add_callback(EvaluateAtEnd())
    run.steps_log = StepsLog(run.out / "steps.jsonl", guard, enabled=run.is_main)
    trainer.add_callback(run.steps_log)
    say(
        f"{len(run.dataset)} packed rows ({examples_per_row(run.dataset):.2f} examples/row), micro-batch "
        f"{t.micro_batch_size} row(s), accumulation {run.ga}, world size {run.world}, optimizer "
        f"{getattr(args.optim, 'value', args.optim)}, base {'NF4' if run.info.get('quantization') else dtype}"
    )
    run.args, run.trainer, run.guard, run.host = args, trainer, guard, host


def _tensorboard_dir(trainer, where: Path) -> None:
    """TensorBoard events in ``OUT/tensorboard`` (HF's default is under ``OUT/checkpoints/runs``, which
    ``--resume never`` sets aside with the checkpoints); ``TENSORBOARD_LOGGING_DIR`` still wins."""
    for cb in trainer.callback_handler.callbacks:
        if type(cb).__name__ == "TensorBoardCallback" and getattr(cb, "logging_dir", "unset") is None:
            cb.logging_dir = str(where)


def _load_checkpoint_weights(run: _Run, ckpt: Path, adapter_name: str) -> None:
    """The LoRA weights (and host masters) of checkpoint ``ckpt`` into the run's model."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    set_peft_model_state_dict(run.peft_model, load_file(str(ckpt / "adapter_model.safetensors")),
                              adapter_name=adapter_name)
    if run.host is not None:
        run.host.restore(ckpt)


def _run_trainer(run: _Run, *, adapter_name: str) -> None:
    """Stage 5: train (or, resumed at ``max_steps``, load the checkpoint's weights); Ctrl-C names the resume point."""
    from qtulu.train import checkpoint as ck

    t, trainer, resume_from = run.t, run.trainer, run.resume_from
    run.steps_log.start()  # steps.jsonl: empty, or the resumed checkpoint's records (see StepsLog)
    done = int(ck.read_manifest(resume_from).get("global_step", 0)) if resume_from else 0
    if resume_from is not None and 0 < t.max_steps <= done:
        # HF Trainer would run one more step when resumed at max_steps: load the weights instead
        _load_checkpoint_weights(run, resume_from, adapter_name)
        trainer.state.global_step = done
        say(f"{resume_from.name} already reached train.max_steps={t.max_steps}: nothing left to train")
        return
    from qtulu.train.loss import loss_chunking
    from qtulu.model.dense_cache import dense_weights
    from qtulu.model.threads import fitted_threads, usable_cores

    try:
        # intra-op threads: one for a small model, else the idle cores (qtulu.model.threads); loss tiles (qtulu.train.loss)
        with fitted_threads(run.base) as n_threads, loss_chunking(t.loss_chunk_size), dense_weights(run.base, say=say):
            if run.base.device.type == "cpu":
                say(f"torch intra-op threads: {n_threads} (of {usable_cores()} core(s); set QTULU_THREADS=N to choose)")
            trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
            evals = run.guard.evals
            if (run.eval_dataset is not None and not run.guard.stopped and trainer.state.global_step > 0
                    and not (evals and evals[-1]["step"] == trainer.state.global_step)):
                trainer.evaluate()  # a run stopped early by a callback: the final weights still get their loss
    except KeyboardInterrupt:
        raise KeyboardInterrupt(ck.interrupted_message(run.out, run.guard.steps, run.is_main)) from None
    finally:
        run.steps_log.sync()  # the steps since the last logging step, whatever stopped the run
    if resume_from is None and trainer.state.global_step == 0:  # never save an untrained adapter as a result
        raise TrainError(f"the run took 0 optimizer steps ({len(run.dataset)} packed rows, train.epochs={t.epochs}, "
                         f"train.max_steps={t.max_steps}); no adapter was saved")


def _save_result(run: _Run, *, adapter_name: str) -> TrainResult:
    """Stage 6: the non-finite stop, the best checkpoint's weights (``train.keep_best_checkpoint``), the
    adapter (``OUT/adapter``) and ``loss.png`` (``steps.jsonl`` is already written, by `StepsLog`)."""
    from qtulu.train.callbacks import NonFiniteError, plot_losses

    t, trainer, guard, host, out = run.t, run.trainer, run.guard, run.host, run.out
    steps = guard.steps
    if guard.stopped:
        raise NonFiniteError(
            f"training stopped at step {trainer.state.global_step}: {guard.in_a_row} optimizer steps in a row had a "
            f"NaN/inf loss or gradient (train.max_nonfinite_in_a_row={t.max_nonfinite_in_a_row}); "
            f"{guard.skipped_total} skipped in all. No adapter was saved; the last checkpoint holds finite weights. "
            "Lower train.learning_rate or check the data."
        )
    best = best_eval(guard.evals)
    adapter_step = trainer.state.global_step
    if t.keep_best_checkpoint and best is not None and best["step"] != adapter_step:
        ckpt = run.run_dir / f"checkpoint-{best['step']}"
        if not ckpt.is_dir():  # cannot happen with the recipe's checks (a checkpoint at every evaluation)
            raise TrainError(f"train.keep_best_checkpoint: the best checkpoint {ckpt} is missing; no adapter was saved")
        _load_checkpoint_weights(run, ckpt, adapter_name)
        adapter_step = best["step"]
        say(f"keeping the best checkpoint: step {best['step']}, validation loss {best['eval_loss']:.4f}")
    adapter_dir = None
    png = None
    gathered = full_trainable_state(run.peft_model) if trainer.is_fsdp_enabled else None  # collective
    resumed_from = str(run.resume_from) if run.resume_from else None
    if run.is_main:
        from qtulu.adapters.store import save_adapter

        adapter_dir = save_adapter(
            run.peft_model,
            out / ADAPTER_DIRNAME,
            adapter_name=adapter_name,
            base_info=run.info,
            recipe=run.recipe.to_dict(),
            manifest=run.manifest,
            extra={
                "train": {
                    "global_step": trainer.state.global_step,
                    "skipped_steps": guard.skipped_total,
                    "gradient_accumulation_steps": run.ga,
                    "world_size": run.world,
                    "optimizer": getattr(run.args.optim, "value", str(run.args.optim)),
                    "final_loss": next((s["loss"] for s in reversed(steps) if s["loss"] is not None), None),
                    "resumed_from": resumed_from,
                    "final_eval_loss": guard.evals[-1]["eval_loss"] if guard.evals else None,
                    "best_eval": best,  # {"step", "eval_loss"} of the lowest validation loss, or None
                    "adapter_step": adapter_step,  # the step whose weights are saved (best one if kept)
                },
            },
            # FSDP2 serves peft_model.state_dict() as local shards: save from the gathered tensors
            state_dict=host.master.adapter_state(run.peft_model, adapter_name) if host else gathered,
            name=run.run_name,
        )
        png = plot_losses(steps, out / "loss.png", title=f"{run.recipe.name}: training loss", evals=guard.evals)
        say(f"adapter saved to {adapter_dir}" + (f"; loss curve {png}" if png else ""))
    trainer.accelerator.wait_for_everyone()
    return TrainResult(
        output_dir=out,
        adapter_dir=adapter_dir,
        global_step=trainer.state.global_step,
        steps=steps,
        skipped_steps=guard.skipped_total,
        resumed_from=resumed_from,
        seconds=time.time() - run.t0,
        loss_png=png,
        gradient_accumulation_steps=run.ga,
        model=run.peft_model,
        tokenizer=run.tok,
        evals=list(guard.evals),
        best_eval=best,
        adapter_step=adapter_step,
    )


def best_eval(evals: list[dict[str, Any]]) -> dict[str, Any] | None:
    """``{"step", "eval_loss"}`` of the lowest finite validation loss (the earliest on a tie), or None."""
    finite = [e for e in evals if e.get("eval_loss") is not None]
    if not finite:
        return None
    b = min(finite, key=lambda e: (e["eval_loss"], e["step"]))
    return {"step": b["step"], "eval_loss": b["eval_loss"]}


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
    p.add_argument("--overwrite", action="store_true",
                   help="write into a non-empty --output-dir that is not a qtulu run directory")
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
    check_run_output(recipe, out, overwrite=args.overwrite)  # never over an input, nor a foreign folder
    result = train(recipe, output_dir=out, resume=args.resume, force=args.force, progress=not args.no_progress,
                   name=name)
    if result.adapter_dir is not None:
        print(result.summary())
    return 0
