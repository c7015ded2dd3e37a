"""qtulu.train.runlock: a run that fails releases its run directory and leaves no lock file behind."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from qtulu.train.runlock import LOCK_NAME, RunDirLocked, run_lock

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}

FAILING_RUN = """
import sys
from transformers import TrainerCallback
from qtulu.demo.synthetic import packed_toy_dataset, toy_recipe
from qtulu.model.tiny import build_char_tokenizer, build_tiny_llama
from qtulu.train.run import train

class Fail(TrainerCallback):  # an error in the middle of training (not Ctrl-C)
    def on_step_end(self, args, state, control, **kw):
        raise RuntimeError("failing on purpose at step %d" % state.global_step)

train(toy_recipe(), output_dir=sys.argv[1], model=build_tiny_llama(0), tokenizer=build_char_tokenizer(),
      data=packed_toy_dataset(8, 2), resume="never", progress=False, callbacks=[Fail()])
"""


def test_a_run_that_fails_with_an_error_releases_its_lock(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-c", FAILING_RUN, str(out)], env=ENV, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode != 0 and "failing on purpose at step 1" in proc.stderr
    assert (out / "steps.jsonl").exists()  # it did take the directory and train a step
    assert not (out / LOCK_NAME).exists()  # no lock file left that would look held
    with run_lock(out):  # and the directory is free
        pass
    assert not (out / LOCK_NAME).exists()


def test_the_lock_file_is_there_while_held_and_a_second_taker_is_refused(tmp_path):
    with run_lock(tmp_path) as path:
        assert path.exists() and f'"pid": {os.getpid()}' in path.read_text()
        with pytest.raises(RunDirLocked, match=f"pid {os.getpid()}"):
            with run_lock(tmp_path):
                pass
        assert path.exists()  # a refused taker leaves the holder's file alone
    assert not path.exists()


def test_a_taker_that_locked_a_file_removed_meanwhile_takes_the_new_one(tmp_path, monkeypatch):
    """The holder unlinks the file between the taker's open and its flock: the taker must not end up
    holding the removed file (another run could then lock a new file at the same path)."""
    import fcntl

    import qtulu.train.runlock as rl

    real_flock, calls = fcntl.flock, []

    def flock_after_removal(fd, op):
        if not calls:
            os.unlink(tmp_path / LOCK_NAME)  # what a releasing holder does, at the worst moment
        calls.append(fd)
        return real_flock(fd, op)

    monkeypatch.setattr(rl.fcntl, "flock", flock_after_removal)
    with run_lock(tmp_path) as path:
        assert len(calls) == 2  # locked the orphan, noticed, took the file at the path
        assert os.stat(path).st_ino == os.fstat(calls[-1]).st_ino
