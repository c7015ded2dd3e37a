"""The SFTTrainer subclass `qtulu train` runs: staged checkpoints (a kill mid-write never leaves a
checkpoint resume would pick), one clear error on a full disk, the non-finite step guard's per
micro-batch hook, FSDP2 on the CPU (gloo) through accelerate's own preparation, and FSDP2
checkpoints (`FSDPCheckpoints`: sharded with torch.distributed.checkpoint, staged like the others).

Built lazily (`make_trainer_class`) so that importing `qtulu.train.run` needs neither trl nor
transformers.
"""

from __future__ import annotations

from pathlib import Path

from qtulu.train import distributed as dist_
from qtulu.train.distributed import fsdp_from_env


class FSDPCheckpoints:
    """The FSDP2 checkpoint methods of `QTuluTrainer` (mixed in before SFTTrainer; outside FSDP they defer to HF).

    FSDP2 checkpoints (qtulu.train.distributed): HF's FSDP save/load walks every state-dict key as an
    attribute path, which NF4's quant-state keys (``weight.absmax`` on a DTensor) break; and its "full"
    state dict for peft still holds shards on CPU/gloo. qtulu saves the LoRA tensors and their
    optimizer states by parameter name with torch.distributed.checkpoint instead (the rest of the
    checkpoint, trainer state, scheduler and RNG, is HF's), plus the gathered adapter for
    train.keep_best_checkpoint and a resume at train.max_steps.
    """

    def save_model(self, output_dir=None, _internal_call=False):
        if not (self.is_fsdp_enabled and _internal_call):
            return super().save_model(output_dir, _internal_call)
        dist_.save_fsdp_model(self.model, output_dir)
        gathered = dist_.full_trainable_state(self.model)  # collective
        if self.args.should_save:
            self.model.save_pretrained(output_dir, state_dict=gathered, safe_serialization=True)

    def _save_optimizer_and_scheduler(self, output_dir):
        import torch

        from transformers.trainer import SCHEDULER_NAME

        if not self.is_fsdp_enabled:
            return super()._save_optimizer_and_scheduler(output_dir)
        dist_.save_fsdp_optimizer(self.model, self.optimizer, output_dir)
        if self.args.should_save:
            torch.save(self.lr_scheduler.state_dict(), str(Path(output_dir) / SCHEDULER_NAME))

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        from qtulu.train import checkpoint as ck

        if self.is_fsdp_enabled != dist_.is_fsdp_checkpoint(resume_from_checkpoint):
            how = ("was written by an FSDP run (sharded, torch.distributed.checkpoint): resume it with FSDP"
                   if not self.is_fsdp_enabled else
                   "was not written by an FSDP run: resume it without FSDP (plain torchrun or one process)")
            raise ck.CheckpointError(f"cannot resume from {resume_from_checkpoint}: it {how}")
        if not self.is_fsdp_enabled:
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        dist_.load_fsdp_model(self.model, resume_from_checkpoint)

    def _load_optimizer_and_scheduler(self, checkpoint):
        if not self.is_fsdp_enabled or checkpoint is None:
            return super()._load_optimizer_and_scheduler(checkpoint)
        import torch
        from transformers.trainer import SCHEDULER_NAME

        dist_.load_fsdp_optimizer(self.model, self.optimizer, checkpoint)
        self.lr_scheduler.load_state_dict(torch.load(str(Path(checkpoint) / SCHEDULER_NAME), weights_only=True))


def _adapt_fsdp_plugin(trainer) -> None:
    """FSDP2 on the CPU (gloo) and with qtulu's NF4 layers, after accelerate built its state."""
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    state = trainer.accelerator.state
    plugin_args = trainer.args.fsdp_plugin_args
    if state.distributed_type == DistributedType.MULTI_CPU and (plugin_args or fsdp_from_env()):
        # accelerate enables FSDP on accelerator devices only (its multi-CPU branch drops the plugin),
        # but torch's fully_shard runs on CPU over gloo: switch the state to FSDP so that
        # accelerate's own FSDP2 preparation (fsdp2_prepare_model) wraps the model, as on GPUs.
        state.distributed_type = DistributedType.FSDP
        state.fsdp_plugin = FullyShardedDataParallelPlugin(**(plugin_args or {}))
        trainer.is_fsdp_enabled = True
    if getattr(state, "fsdp_plugin", None) is not None:
        # `accelerate launch --use_fsdp` turns on cpu_ram_efficient_loading (rank 0 loads, the others
        # go through the meta device and receive a broadcast state dict): qtulu's NF4 layers keep
        # their quant state beside the packed codes, which neither the meta device nor that
        # broadcast carries (accelerate skips it for bitsandbytes' Params4bit only). Every rank has
        # the whole base loaded already; fully_shard keeps only its shard.
        state.fsdp_plugin.cpu_ram_efficient_loading = False


def make_trainer_class():
    """Build the SFTTrainer subclass lazily (keeps `import qtulu.train.run` free of trl/transformers)."""
    import torch
    from trl import SFTTrainer

    from qtulu.train import checkpoint as ck
    class QTuluTrainer(FSDPCheckpoints, SFTTrainer):
        """SFTTrainer with staged checkpoints, a non-finite step guard and per-step loss records."""

        def __init__(self, *args, qtulu_guard, qtulu_identity: dict, qtulu_keep: int | None,
                     qtulu_keep_best: bool = False, **kwargs):
            super().__init__(*args, **kwargs)
            self.qtulu_guard = qtulu_guard
            self.qtulu_identity = qtulu_identity
            self.qtulu_keep = qtulu_keep
            self.qtulu_keep_best = qtulu_keep_best  # train.keep_best_checkpoint: rotation spares the best one

        def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None,
                            metric_key_prefix="eval"):
            return validation_loss(self, dataloader, metric_key_prefix)  # see there why not HF's loop

        def create_accelerator_and_postprocess(self):
            super().create_accelerator_and_postprocess()
            _adapt_fsdp_plugin(self)

        def training_step(self, model, inputs, num_items_in_batch=None):
            loss = super().training_step(model, inputs, num_items_in_batch)
            self.qtulu_guard.add_micro_batch(loss)
            return loss

        def _save_checkpoint(self, model, trial):
            try:
                return self._save_checkpoint_staged(model, trial)
            except Exception as e:
                # a full disk (torch and safetensors do not raise OSError for it): one clear error, the
                # stage removed so the space comes back, the last complete checkpoint untouched
                from qtulu.files import is_disk_full
                from qtulu.errors import one_line

                run_dir = Path(self._get_output_dir(trial=trial))
                if not self.args.should_save or not is_disk_full(e, run_dir):
                    raise
                import shutil

                shutil.rmtree(ck.stage_dir(run_dir, self.state.global_step), ignore_errors=True)
                last = ck.last_complete_checkpoint(run_dir)
                raise ck.CheckpointError(
                    f"{run_dir}: no space left on device while writing checkpoint-{self.state.global_step} "
                    f"({type(e).__name__}: {one_line(e)[:200]}); "
                    + (f"the last complete checkpoint, {last.name}, is intact: free space and run again to resume "
                       "from it" if last else "no checkpoint had been completed yet")
                ) from e

        def _save_checkpoint_staged(self, model, trial):
            run_dir = Path(self._get_output_dir(trial=trial))
            step = self.state.global_step
            params = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
            # under FSDP each rank holds a shard: judge the whole tensor on every rank (collective), so
            # that all ranks refuse together
            bad = [n for n, p in params if not bool(torch.isfinite(_whole(p.detach())).all())]
            if bad:
                raise ck.CheckpointError(f"refusing to save checkpoint-{step}: non-finite values in {bad[:3]}")
            stage_root = ck.stage_dir(run_dir, step)
            if self.args.should_save:
                if stage_root.exists():
                    import shutil

                    shutil.rmtree(stage_root)
                stage_root.mkdir(parents=True)
            self.accelerator.wait_for_everyone()
            # Trainer writes into <output_dir>/checkpoint-N: point output_dir at the staging root while it
            # does, so that every file lands in the stage and nothing is visible under checkpoint-N yet.
            original = self.args.output_dir
            self.args.output_dir = str(stage_root)
            try:
                super()._save_checkpoint(model, trial)
            finally:
                self.args.output_dir = original
            self.accelerator.wait_for_everyone()
            if self.args.should_save:
                written = stage_root / f"{ck.CHECKPOINT_PREFIX}-{step}"
                payload = dict(self.qtulu_identity)
                payload["global_step"] = step
                payload["fsdp"] = bool(self.is_fsdp_enabled)  # sharded (DCP) layout; world_size is in the identity
                payload["guard"] = self.qtulu_guard.state()
                best = best_checkpoint(self, run_dir, step)
                if best is not None:
                    # HF recorded the best checkpoint under the staging root it wrote into: point it
                    # at the final name (HF's resume drops a best_model_checkpoint that is not a folder)
                    self.state.best_model_checkpoint = str(best)
                    from transformers.trainer import TRAINER_STATE_NAME

                    self.state.save_to_json(str(written / TRAINER_STATE_NAME))
                if getattr(self, "qtulu_master", None) is not None:  # fp32 master weights (exact resume)
                    from qtulu.train.master_weights import MASTER_FILE

                    self.qtulu_master.save(written / MASTER_FILE)
                ck.write_manifest(written, payload)
                ck.commit(written, run_dir / written.name)
                import shutil

                shutil.rmtree(stage_root, ignore_errors=True)
                best = best_checkpoint(self, run_dir, step)
                ck.rotate(run_dir, self.qtulu_keep, protect=best if self.qtulu_keep_best else None)
            self.accelerator.wait_for_everyone()

    return QTuluTrainer


def _whole(t):
    """A DTensor's full value (collective); any other tensor as it is."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def validation_loss(trainer, dataloader, metric_key_prefix: str = "eval"):
    """The validation loss as the mean over supervised tokens of the whole validation set.

    By hand rather than HF's loop: HF averages one loss per batch, and a padding-free batch
    (all its rows in one sequence) counts as one sample, so a batch of 10 supervised tokens
    would weigh as much as one of 10,000. Here each batch's summed token loss (TRL's
    ``compute_loss``, the training loss's own code path, given the batch's supervised-token
    count as ``num_items_in_batch``) is added up and divided by the tokens of all batches.
    HF's `evaluate` around it still logs, calls the callbacks and tracks the best
    ``eval_loss`` (``metric_for_best_model``).
    """
    import torch
    from transformers.trainer_utils import EvalLoopOutput

    # Every rank reads the whole validation set, in order, unsharded: accelerate's sharded loader
    # pads the last batches with repeated rows to even the ranks out, which would count their
    # tokens twice; here every rank computes the same exact sum (and under FSDP every rank runs
    # the same number of forwards, as the gathers need). Validation sets are small.
    loader = torch.utils.data.DataLoader(dataloader.dataset, batch_size=trainer.args.eval_batch_size,
                                         shuffle=False, collate_fn=dataloader.collate_fn, num_workers=0)
    model = trainer.model  # no DDP wrapper: no gradients, so nothing to synchronise
    was_training = model.training
    model.eval()
    total = torch.zeros((), dtype=torch.float64, device=trainer.args.device)
    count = torch.zeros((), dtype=torch.float64, device=trainer.args.device)
    try:
        with torch.no_grad():
            for inputs in loader:
                inputs = trainer._prepare_inputs(inputs)
                # the supervised tokens, counted as HF counts the training step's (num_items_in_batch)
                labels = inputs["shift_labels"] if "shift_labels" in inputs else inputs["labels"][..., 1:]
                n = labels.ne(-100).sum()
                loss = trainer.compute_loss(model, inputs, num_items_in_batch=n)  # token-loss sum / max(n, 1)
                if trainer.args.average_tokens_across_devices and trainer.accelerator.num_processes > 1:
                    loss = loss / trainer.accelerator.num_processes  # TRL scales it up for DDP's gradient mean
                total += loss.detach().to(torch.float64) * n.to(torch.float64)
                count += n.to(torch.float64)
    finally:
        model.train(was_training)
    tokens = int(count.item())
    metrics = {f"{metric_key_prefix}_loss": float(total.item()) / tokens if tokens else float("nan"),
               f"{metric_key_prefix}_tokens": tokens}
    return EvalLoopOutput(predictions=None, label_ids=None, metrics=metrics,
                          num_samples=len(loader.dataset))


def best_checkpoint(trainer, run_dir: Path, step: int) -> Path | None:
    """Where the checkpoint with the best eval_loss (HF's ``state.best_global_step``) is, or will be when it
    is the one of ``step`` being written; None without one."""
    from qtulu.train.checkpoint import CHECKPOINT_PREFIX

    best_step = trainer.state.best_global_step
    if not best_step:
        return None
    path = Path(run_dir) / f"{CHECKPOINT_PREFIX}-{best_step}"
    return path if best_step == step or path.is_dir() else None
