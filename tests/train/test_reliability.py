"""Reliability of `qtulu train`: atomic checkpoints under SIGKILL, exact resume, resume refusal, NaN guard.

Tiny model, CPU, fp32. The kill tests run the training in a subprocess that SIGKILLs itself at a
chosen moment (mid-checkpoint-write, or right after a checkpoint), then resume in this process.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

from qtulu.train import checkpoint as ck
from qtulu.demo.synthetic import packed_toy_dataset, toy_recipe
from qtulu.model.tiny import build_char_tokenizer, build_tiny_llama

N_STEPS = 6
TRAIN = {"max_steps": N_STEPS, "save_steps": 2, "micro_batch_size": 2, "learning_rate": 5e-3, "warmup_ratio": 0.2}
LORA = {"dropout": 0.1}  # dropout on: its RNG stream must be restored too


def _data():
    return packed_toy_dataset(10, 3, seed=7)  # 5 micro-batches per epoch: the 6 steps cross an epoch


def _train(out, **kw):
    from qtulu.train.run import train

    kw.setdefault("resume", "auto")
    recipe = kw.pop("recipe", None) or toy_recipe(train=TRAIN, lora=LORA)
    return train(recipe, output_dir=out, model=build_tiny_llama(0), tokenizer=build_char_tokenizer(), data=_data(),
                 progress=False, **kw)


_CHILD = textwrap.dedent(
    """
    import os, signal, sys
    sys.path.insert(0, {tests!r})
    from test_reliability import _train
    from transformers import Trainer, TrainerCallback

    mode, out, at = sys.argv[1], sys.argv[2], int(sys.argv[3])
    callbacks = []
    if mode == "mid_write":
        # die inside Trainer's checkpoint write: adapter + optimizer written, RNG state and trainer state not
        original = Trainer._save_rng_state
        def _save_rng_state(self, output_dir):
            if self.state.global_step == at:
                os.kill(os.getpid(), signal.SIGKILL)
            return original(self, output_dir)
        Trainer._save_rng_state = _save_rng_state
    else:
        class KillAfterSave(TrainerCallback):
            def on_save(self, args, state, control, **kwargs):
                if state.global_step == at:
                    os.kill(os.getpid(), signal.SIGKILL)
        callbacks.append(KillAfterSave())
    _train(out, resume="never", callbacks=callbacks)
    raise SystemExit("not killed")
    """
)


def _run_child(tmp_path: Path, mode: str, out: Path, at: int) -> None:
    script = tmp_path / "child.py"
    script.write_text(_CHILD.format(tests=str(Path(__file__).parent)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, str(script), mode, str(out), str(at)], capture_output=True, text=True,
                          env=env, timeout=600)
    assert proc.returncode == -signal.SIGKILL, proc.stdout[-2000:] + proc.stderr[-4000:]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run: per-step losses and final adapter weights."""
    out = tmp_path_factory.mktemp("reference")
    res = _train(out, resume="never")
    assert res.global_step == N_STEPS and res.skipped_steps == 0
    return res.losses, load_file(str(res.adapter_dir / "adapter_model.safetensors"))


def _assert_same_run(res, reference):
    losses, weights = reference
    assert res.global_step == N_STEPS
    assert len(res.losses) == N_STEPS
    for i, (a, b) in enumerate(zip(res.losses, losses)):
        assert abs(a - b) <= 1e-5, f"step {i + 1}: {a} != {b}"
    got = load_file(str(res.adapter_dir / "adapter_model.safetensors"))
    assert got.keys() == weights.keys()
    for k in weights:
        torch.testing.assert_close(got[k], weights[k], rtol=0, atol=1e-5, msg=k)


def test_sigkill_during_checkpoint_write_resumes_from_last_complete(tmp_path, reference):
    out = tmp_path / "run"
    _run_child(tmp_path, "mid_write", out, at=4)
    run_dir = out / "checkpoints"
    names = sorted(p.name for p in run_dir.iterdir())
    # the partial write sits in the staging dir; checkpoint-4 never appeared
    assert names == [".stage-checkpoint-4", "checkpoint-2"], names
    assert not (run_dir / ".stage-checkpoint-4" / "checkpoint-4" / "trainer_state.json").exists()
    assert ck.last_complete_checkpoint(run_dir) == run_dir / "checkpoint-2"

    res = _train(out)
    assert res.resumed_from == str(run_dir / "checkpoint-2")
    assert not (run_dir / ".stage-checkpoint-4").exists()
    _assert_same_run(res, reference)


def test_exact_resume_after_kill(tmp_path, reference):
    """Train K=4 of N=6 steps, SIGKILL, resume to N: same per-step losses (1e-5) and final adapter."""
    out = tmp_path / "run"
    _run_child(tmp_path, "after_save", out, at=4)
    assert ck.last_complete_checkpoint(out / "checkpoints") == out / "checkpoints" / "checkpoint-4"
    res = _train(out)
    assert res.resumed_from.endswith("checkpoint-4")
    _assert_same_run(res, reference)


def test_incomplete_or_corrupt_checkpoints_are_never_used(tmp_path):
    run_dir = tmp_path / "checkpoints"
    for step in (2, 4, 6):
        d = run_dir / f"checkpoint-{step}"
        d.mkdir(parents=True)
        (d / "adapter_model.safetensors").write_bytes(os.urandom(64))
        ck.write_manifest(d, {"global_step": step})
    (run_dir / "checkpoint-8").mkdir()  # a dir without manifest: a write that never finished
    (run_dir / "checkpoint-8" / "adapter_model.safetensors").write_bytes(b"x")
    with open(run_dir / "checkpoint-6" / "adapter_model.safetensors", "r+b") as f:
        f.write(b"\0")  # a flipped byte
    with open(run_dir / "checkpoint-4" / "adapter_model.safetensors", "ab") as f:
        f.truncate(10)
    assert ck.last_complete_checkpoint(run_dir) == run_dir / "checkpoint-2"
    with pytest.raises(ck.CheckpointError, match="SHA-256"):
        ck.check_complete(run_dir / "checkpoint-6")
    with pytest.raises(ck.CheckpointError, match="bytes, expected"):
        ck.check_complete(run_dir / "checkpoint-4")
    with pytest.raises(ck.CheckpointError, match="incomplete"):
        ck.check_complete(run_dir / "checkpoint-8")
    ck.rotate(run_dir, 2)
    assert [p.name for p in ck.list_checkpoints(run_dir)] == ["checkpoint-6", "checkpoint-8"]


def test_resume_with_changed_recipe_is_refused_unless_forced(tmp_path):
    from qtulu.train.checkpoint import ResumeMismatch

    train = {**TRAIN, "max_steps": 2}
    out = tmp_path / "run"
    _train(out, resume="never", recipe=toy_recipe(train=train, lora=LORA))
    changed = toy_recipe(train={**train, "seed": 1, "micro_batch_size": 1}, lora={**LORA, "r": 8})
    with pytest.raises(ResumeMismatch) as err:
        _train(out, recipe=changed)
    assert set(err.value.keys) >= {"train.seed", "train.micro_batch_size", "lora.r"}
    for key in ("train.seed", "lora.r", "--force"):
        assert key in str(err.value)
    # bookkeeping keys may change; a changed learning rate is accepted only with force
    _train(out, recipe=toy_recipe(train={**train, "logging_steps": 5}, lora=LORA))
    lr_changed = toy_recipe(train={**train, "learning_rate": 1e-3, "max_steps": 3}, lora=LORA)
    with pytest.raises(ResumeMismatch, match="train.learning_rate"):
        _train(out, recipe=lr_changed)
    res = _train(out, recipe=lr_changed, force=True)
    assert res.resumed_from.endswith("checkpoint-2") and res.global_step == 3


class PoisonSteps(TrainerCallback):
    """Make the loss NaN on the given (0-based) optimizer steps via a hook on the embeddings;
    snapshot the trainable weights after every step."""

    def __init__(self, bad_steps):
        self.bad_steps = set(bad_steps)
        self.poison = False
        self.handle = None
        self.weights = []

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        emb = model.get_input_embeddings()
        self.handle = emb.register_forward_hook(lambda m, i, o: o * float("nan") if self.poison else o)

    def on_step_begin(self, args, state, control, **kwargs):
        self.poison = state.global_step in self.bad_steps

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.weights.append({n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad})

    def on_train_end(self, args, state, control, **kwargs):
        self.handle.remove()


def test_nonfinite_steps_are_skipped_counted_and_do_not_advance_the_schedule(tmp_path):
    poison = PoisonSteps({1, 2})
    res = _train(tmp_path / "run", resume="never", callbacks=[poison],
                 recipe=toy_recipe(train={**TRAIN, "max_nonfinite_in_a_row": 3}, lora=LORA))
    assert res.global_step == N_STEPS and res.skipped_steps == 2
    assert [s["skipped"] for s in res.steps] == [False, True, True, False, False, False]
    assert res.steps[1]["loss"] is None and res.steps[2]["loss"] is None
    lrs = [s["lr"] for s in res.steps]
    assert lrs[1] == lrs[2] == lrs[3] and lrs[4] != lrs[3], lrs  # the scheduler waited
    for k in poison.weights[0]:  # weights did not move on the skipped steps, and did afterwards
        assert torch.equal(poison.weights[0][k], poison.weights[1][k])
        assert torch.equal(poison.weights[1][k], poison.weights[2][k])
    assert any(not torch.equal(poison.weights[2][k], poison.weights[3][k]) for k in poison.weights[0])
    meta = json.loads((res.adapter_dir / "qtulu.json").read_text())
    assert meta["extra"]["train"]["skipped_steps"] == 2


def test_run_stops_after_too_many_nonfinite_steps_and_saves_nothing_nonfinite(tmp_path):
    from qtulu.train.callbacks import NonFiniteError

    out = tmp_path / "run"
    poison = PoisonSteps(range(1, 100))
    recipe = toy_recipe(train={**TRAIN, "save_steps": 1, "max_nonfinite_in_a_row": 3}, lora=LORA)
    with pytest.raises(NonFiniteError, match="3 optimizer steps in a row"):
        _train(out, resume="never", callbacks=[poison], recipe=recipe)
    assert not (out / "adapter").exists()
    ckpts = ck.list_checkpoints(out / "checkpoints")
    assert ckpts, "checkpoints of the finite state are kept"
    for c in ckpts:
        for t in load_file(str(c / "adapter_model.safetensors")).values():
            assert torch.isfinite(t).all()
    assert max(ck.checkpoint_step(c) for c in ckpts) == 4  # stopped at step 4: step 1 fine, 2-4 skipped


def test_checkpoint_with_nonfinite_weights_is_refused(tmp_path):
    from qtulu.train.checkpoint import CheckpointError

    class PoisonWeights(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            next(p for p in model.parameters() if p.requires_grad).data.fill_(float("inf"))

    with pytest.raises(CheckpointError, match="non-finite"):
        _train(tmp_path / "run", resume="never", callbacks=[PoisonWeights()],
               recipe=toy_recipe(train={**TRAIN, "save_steps": 1}, lora=LORA))
    assert ck.list_checkpoints(tmp_path / "run" / "checkpoints") == []
