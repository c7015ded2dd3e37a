"""The SFTTrainer subclass `qtulu train` runs: staged checkpoints (a kill mid-write never leaves a
checkpoint resume would pick), one clear error on a full disk, the non-finite step guard's per
micro-batch hook, and FSDP2 on the CPU (gloo) through accelerate's own preparation.

Built lazily (`make_trainer_class`) so that importing `qtulu.train.run` needs neither trl nor
transformers.
"""

from __future__ import annotations

from pathlib import Path

from qtulu.train.distributed import fsdp_from_env


def make_trainer_class():
    """Build the SFTTrainer subclass lazily (keeps `import qtulu.train.run` free of trl/transformers)."""
    import torch
    from trl import SFTTrainer

    from qtulu.train import checkpoint as ck
    class QTuluTrainer(SFTTrainer):
        """SFTTrainer with staged checkpoints, a non-finite step guard and per-step loss records."""

        def __init__(self, *args, qtulu_guard, qtulu_identity: dict, qtulu_keep: int | None, **kwargs):
            super().__init__(*args, **kwargs)
            self.qtulu_guard = qtulu_guard
            self.qtulu_identity = qtulu_identity
            self.qtulu_keep = qtulu_keep

        def create_accelerator_and_postprocess(self):
            super().create_accelerator_and_postprocess()
            from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

            state = self.accelerator.state
            plugin_args = self.args.fsdp_plugin_args
            if state.distributed_type == DistributedType.MULTI_CPU and (plugin_args or fsdp_from_env()):
                # accelerate enables FSDP on accelerator devices only (its multi-CPU branch drops the plugin),
                # but torch's fully_shard runs on CPU over gloo: switch the state to FSDP so that
                # accelerate's own FSDP2 preparation (fsdp2_prepare_model) wraps the model, as on GPUs.
                state.distributed_type = DistributedType.FSDP
                state.fsdp_plugin = FullyShardedDataParallelPlugin(**(plugin_args or {}))
                self.is_fsdp_enabled = True

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
            bad = [n for n, p in params if not bool(torch.isfinite(p.detach()).all())]
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
                payload["guard"] = self.qtulu_guard.state()
                if getattr(self, "qtulu_master", None) is not None:  # fp32 master weights (exact resume)
                    from qtulu.train.master_weights import MASTER_FILE

                    self.qtulu_master.save(written / MASTER_FILE)
                ck.write_manifest(written, payload)
                ck.commit(written, run_dir / written.name)
                import shutil

                shutil.rmtree(stage_root, ignore_errors=True)
                ck.rotate(run_dir, self.qtulu_keep)
            self.accelerator.wait_for_everyone()

    return QTuluTrainer
