"""Hostile inputs and Murphy outside the sandbox, each tested from the outside where it reaches a user:
two runs on one directory, bad recipe numbers, non-finite or misshapen adapters, a non-finite
merge, a full disk during a checkpoint save. Every failure: `qtulu ...` exits 2 with one line on
stderr naming the file, key or tensor, and no traceback."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file

from qtulu.recipes import RecipeError, load_recipe
from qtulu.train.runlock import RunDirLocked, run_lock
from qtulu.demo.synthetic import make_examples, packed_toy_dataset, toy_recipe, write_jsonl
from qtulu.model.tiny import build_char_tokenizer, build_tiny_llama

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
RECIPE = """\
name: hard-toy
sources:
  - {{name: upper, format: messages, path: upper.jsonl}}
data: {{max_seq_len: 128}}
model: {{base: {base}, compute_dtype: float32}}
lora: {{r: 4, alpha: 8, dropout: 0.0}}
train: {{max_steps: {steps}, micro_batch_size: 1, gradient_accumulation_steps: 1, save_steps: 1, save_total_limit: 1,
         logging_steps: 1, learning_rate: 0.005, gradient_checkpointing: false}}
"""


def qtulu(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "qtulu.cli", *map(str, args)], capture_output=True, text=True,
                          env=ENV, timeout=timeout)


def assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str, alone: bool = True) -> str:
    """Exit 2, no traceback, the error one line (the last); ``alone``: nothing else on stderr either
    (the failure came before any work that shows progress)."""
    err = proc.stderr
    assert proc.returncode == 2, (proc.returncode, err[-3000:])
    assert "Traceback" not in err and err.endswith("\n") and (err.count("\n") == 1 or not alone), err[-3000:]
    last = err.splitlines()[-1]
    assert last.startswith("qtulu "), err[-3000:]
    for n in needles:
        assert n in last, (n, err)
    return last


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """A tiny NF4 base dir, a recipe file and an adapter trained from it (in this process)."""
    from qtulu.train.run import train

    d = tmp_path_factory.mktemp("hard")
    model, tok = build_tiny_llama(0), build_char_tokenizer()
    assert len(tok) < model.config.vocab_size
    with torch.no_grad():  # an embedding row no token id reaches: training never sees it, a merged export does
        model.model.embed_tokens.weight[-1, 0] = float("inf")
    model.save_pretrained(d / "base", safe_serialization=True)
    tok.save_pretrained(d / "base")
    write_jsonl(make_examples("upper", 24, split="train", seed=0), d / "upper.jsonl")
    (d / "r.yaml").write_text(RECIPE.format(base=d / "base", steps=2))
    res = train(str(d / "r.yaml"), output_dir=d / "run", progress=False)
    ckpt = d / "run" / "checkpoints" / "checkpoint-2"
    pages = sum(-(-p.stat().st_size // 4096) * 4096 for p in ckpt.rglob("*") if p.is_file())
    return SimpleNamespace(dir=d, base=d / "base", recipe=d / "r.yaml", adapter=res.adapter_dir, ckpt_bytes=pages)


# --------------------------------------------------------------------------------------------
# recipes


@pytest.mark.parametrize("key,value,match", [
    ("train.epochs", "0", "train.epochs: must be > 0"),
    ("train.epochs", "-3", "train.epochs: must be > 0"),
    ("train.learning_rate", ".nan", "train.learning_rate: must be a finite number"),
    ("train.learning_rate", ".inf", "train.learning_rate: must be a finite number"),
    ("train.learning_rate", "-.inf", "train.learning_rate: must be a finite number"),
    ("train.learning_rate", "0", "train.learning_rate: must be > 0"),
    ("train.max_steps", "0", "train.max_steps: must be -1"),
    ("train.max_steps", "-5", "train.max_steps: must be -1"),
    ("train.warmup_ratio", ".nan", "train.warmup_ratio: must be a finite number"),
    ("train.max_grad_norm", ".inf", "train.max_grad_norm: must be a finite number"),
    ("train.weight_decay", "-0.1", "train.weight_decay: must be >= 0"),
    ("train.logging_steps", "0", "train.logging_steps: must be >= 1"),
    ("train.seed", "-1", "train.seed: must be >= 0"),
    ("lora.dropout", ".nan", "lora.dropout: must be a finite number"),
    ("lora.alpha", "0", "lora.alpha: must be > 0"),
    ("model.blocksize", "48", "model.blocksize: must be one of"),
    ("sources.0.count", ".nan", "sources.0.count: must be a finite number"),
])
def test_recipe_numbers_must_be_finite_and_in_range(tmp_path, key, value, match):
    path = tmp_path / "r.yaml"
    path.write_text("name: t\nsources:\n  - {name: a, format: alpaca, path: a.jsonl}\n")
    with pytest.raises(RecipeError, match=match) as e:
        load_recipe(path, [f"{key}={value}"])
    # issue 28: a bad value given by --set is blamed on the command line, not on the recipe file
    assert str(e.value).startswith(f"command line: --set {key}=") and str(path) not in str(e.value)


def test_epochs_may_be_zero_only_with_max_steps(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("name: t\nsources:\n  - {name: a, format: alpaca, path: a.jsonl}\ntrain: {epochs: 0, max_steps: 5}\n")
    assert load_recipe(path).train.max_steps == 5


def test_nf4_blocksizes_are_the_kernels():
    from qtulu.kernels.nf4_format import VALID_BLOCKSIZES
    from qtulu.recipes import NF4_BLOCKSIZES

    assert tuple(NF4_BLOCKSIZES) == tuple(VALID_BLOCKSIZES)


def test_bad_recipes_fail_from_the_cli_in_one_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: t\nsources:\n  - {name: a, format: alpaca, path: a.jsonl}\ntrain:\n  epochs: 0\n")
    assert_one_line_error(qtulu("train", bad, "--output-dir", tmp_path / "o"), str(bad), "train.epochs")
    assert_one_line_error(qtulu("train", bad, "--set", "train.epochs=1", "--set", "train.learning_rate=.nan",
                                "--output-dir", tmp_path / "o"), "train.learning_rate", "finite")
    folder = tmp_path / "recipes_dir"
    folder.mkdir()
    assert_one_line_error(qtulu("train", folder, "--output-dir", tmp_path / "o"), str(folder), "not a file")
    assert not (tmp_path / "o").exists()  # refused before anything was written


# --------------------------------------------------------------------------------------------
# one writer per run directory


def test_second_run_on_a_directory_fails_at_once_naming_the_holder(toy, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "mine.txt").write_text("the first run's data")
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom qtulu.train.runlock import run_lock\n"
         "with run_lock(sys.argv[1]):\n    print('held', flush=True)\n    time.sleep(600)\n", str(out)],
        stdout=subprocess.PIPE, text=True, env=ENV)
    try:
        assert holder.stdout.readline() == "held\n"
        t0 = time.monotonic()
        proc = qtulu("train", toy.recipe, "--output-dir", out, "--no-progress")
        assert_one_line_error(proc, str(out), "in use by another qtulu train run", f"pid {holder.pid}")
        assert time.monotonic() - t0 < 60  # at once: before the model or the data is loaded
        assert sorted(p.name for p in out.iterdir()) == [".qtulu-run.lock", "mine.txt"]
    finally:
        holder.send_signal(signal.SIGKILL)  # the holder dies without any cleanup...
        holder.wait()
    with run_lock(out):  # ...and its lock is gone with it: never stale
        pass


def test_train_holds_the_lock_while_it_runs_and_releases_it_on_error(tmp_path):
    from transformers import TrainerCallback

    from qtulu.train.run import TrainError, train

    out, seen = tmp_path / "run", []

    class SecondRun(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step == 1:
                try:
                    _toy_train(out)
                except RunDirLocked as e:
                    seen.append(str(e))

    _toy_train(out, callbacks=[SecondRun()])
    assert len(seen) == 1 and f"pid {os.getpid()}" in seen[0]
    with pytest.raises(TrainError, match="empty"):
        train(toy_recipe(), output_dir=out, model=build_tiny_llama(0), tokenizer=build_char_tokenizer(),
              data=packed_toy_dataset(4, 2).select([]), progress=False)
    with run_lock(out):  # released after the error
        pass


def _toy_train(out, **kw):
    from qtulu.train.run import train

    recipe = toy_recipe(train={"max_steps": 2, "save_steps": 1, "save_total_limit": 5})
    return train(recipe, output_dir=out, model=build_tiny_llama(0), tokenizer=build_char_tokenizer(),
                 data=packed_toy_dataset(8, 2, seed=1), progress=False, **kw)


def test_resume_never_keeps_an_earlier_runs_checkpoints(tmp_path):
    from qtulu.train import checkpoint as ck
    out = tmp_path / "run"
    _toy_train(out)
    first = {p.name: ck.read_manifest(p)["files"] for p in ck.list_checkpoints(out / "checkpoints")}
    assert sorted(first) == ["checkpoint-1", "checkpoint-2"]
    adapter = {p.name: p.read_bytes() for p in (out / "adapter").iterdir()}
    _toy_train(out, resume="never")
    # issue 25: the earlier run's adapter is moved aside too, byte for byte, not replaced
    (old_adapter,) = [p for p in out.iterdir() if p.name.startswith("adapter.previous-")]
    assert {p.name: p.read_bytes() for p in old_adapter.iterdir()} == adapter
    assert (out / "adapter" / "qtulu.json").is_file()
    (aside,) = [p for p in out.iterdir() if p.name.startswith("checkpoints.previous-")]
    for p in ck.list_checkpoints(aside):  # moved, complete, byte for byte
        assert ck.check_complete(p)["files"] == first[p.name]
    assert sorted(first) == [p.name for p in ck.list_checkpoints(aside)]
    assert [p.name for p in ck.list_checkpoints(out / "checkpoints")] == ["checkpoint-1", "checkpoint-2"]


# --------------------------------------------------------------------------------------------
# adapters and merges


def _tampered(src: Path, dst: Path, *, tensors=None, config=None) -> Path:
    """A copy of adapter ``src`` with new tensors/config and a qtulu.json rewritten to match them."""
    from qtulu.adapters.store import _safetensors_layout, sha256_file

    shutil.copytree(src, dst)
    if tensors is not None:
        save_file(tensors, str(dst / "adapter_model.safetensors"), metadata={"format": "pt"})
    if config is not None:
        (dst / "adapter_config.json").write_text(json.dumps(config))
    meta = json.loads((dst / "qtulu.json").read_text())
    for name in meta["files"]:
        meta["files"][name] = sha256_file(dst / name)
        meta["sizes"][name] = (dst / name).stat().st_size
    meta["tensors"] = _safetensors_layout(dst / "adapter_model.safetensors")
    (dst / "qtulu.json").write_text(json.dumps(meta))
    return dst


def test_nonfinite_adapter_is_refused_naming_the_tensor(toy, tmp_path):
    from qtulu.adapters.store import load_model, verify_adapter
    from qtulu.adapters.integrity import NonFiniteWeights

    sd = load_file(str(toy.adapter / "adapter_model.safetensors"))
    key = sorted(k for k in sd if "lora_B" in k)[1]
    sd[key][0, 0] = float("nan")
    bad = _tampered(toy.adapter, tmp_path / "nan", tensors=sd)
    verify_adapter(bad)  # the metadata is consistent: only the values are garbage
    with pytest.raises(NonFiniteWeights, match=key):
        load_model(str(toy.base), [str(bad)], compute_dtype="float32")
    proc = qtulu("merge", "--full", "--model", toy.base, "--adapter", bad, "--out", tmp_path / "merged", "--dtype", "float32")
    assert_one_line_error(proc, key, "non-finite")
    with pytest.raises(NonFiniteWeights, match=key):  # what `qtulu merge` (combining) and `chat` load through
        load_model(str(toy.base), [f"good={toy.adapter}", f"bad={bad}"], compute_dtype="float32")
    assert not (tmp_path / "merged").exists()


def test_adapter_with_changed_r_or_shape_is_refused_naming_the_tensor(toy, tmp_path):
    from qtulu.adapters.store import load_model
    from qtulu.adapters.integrity import AdapterShapeError

    config = json.loads((toy.adapter / "adapter_config.json").read_text())
    r8 = _tampered(toy.adapter, tmp_path / "r8", config={**config, "r": 8})
    with pytest.raises(AdapterShapeError, match=r"lora_A.weight has shape \[4, \d+\], but adapter_config.json \(r=8\)"):
        load_model(str(toy.base), [str(r8)], compute_dtype="float32")
    assert_one_line_error(qtulu("merge", "--full", "--model", toy.base, "--adapter", r8, "--out", tmp_path / "m"),
                          "lora_A.weight has shape [4, ", "(r=8)")
    sd = load_file(str(toy.adapter / "adapter_model.safetensors"))
    key = sorted(k for k in sd if "lora_A" in k)[0]
    sd[key] = sd[key][:, :-1].contiguous()  # one input column fewer than the base layer has
    narrow = _tampered(toy.adapter, tmp_path / "narrow", tensors=sd)
    with pytest.raises(AdapterShapeError, match=rf"{key} has shape \[4, \d+\], but adapter_config.json \(r=4\) and the base layer"):
        load_model(str(toy.base), [str(narrow)], compute_dtype="float32")
    assert not (tmp_path / "m").exists()


def test_merged_output_is_checked_finite_before_it_is_written(toy, tmp_path):
    # the base holds an inf in an embedding row no token reaches: the adapter trained fine, the merge must refuse
    proc = qtulu("merge", "--full", "--model", toy.base, "--adapter", toy.adapter, "--out", tmp_path / "merged",
                 "--dtype", "float32")
    assert_one_line_error(proc, "model.embed_tokens.weight", "non-finite", str(tmp_path / "merged"), alone=False)
    assert list(tmp_path.iterdir()) == []  # no model, no staging dir left


# --------------------------------------------------------------------------------------------
# a full disk


def test_disk_full_during_a_checkpoint_save(toy, tmp_path, skip_or_fail):
    """The run dir on a tmpfs with room for one checkpoint and a half: the second save fails with one
    line saying so, its stage is removed, checkpoint-1 stays complete, and a run resumes from it."""
    from qtulu.train import checkpoint as ck
    from qtulu.train.run import train

    if os.geteuid() != 0:
        pytest.skip("needs root to mount a small tmpfs privately")
    if subprocess.run(["unshare", "-m", "true"], capture_output=True).returncode:
        skip_or_fail("root here, but unshare -m cannot make a mount namespace for a small private tmpfs")
    (tmp_path / "r.yaml").write_text(RECIPE.format(base=toy.base, steps=3))
    shutil.copy(toy.dir / "upper.jsonl", tmp_path / "upper.jsonl")
    mnt, res = tmp_path / "mnt", tmp_path / "res"
    mnt.mkdir()
    res.mkdir()
    size_k = (4096 + toy.ckpt_bytes + toy.ckpt_bytes // 2) // 1024
    script = (f"set -u\nmount -t tmpfs -o size={size_k}k tmpfs {mnt}\n"
              f"{sys.executable} -m qtulu.cli train {tmp_path / 'r.yaml'} --output-dir {mnt / 'out'} --no-progress "
              f"> {res}/out 2> {res}/err; echo $? > {res}/rc\n"
              f"cp -a {mnt / 'out'} {res / 'run'}\n")  # what the full disk held, for the host to inspect
    done = subprocess.run(["unshare", "-m", "sh", "-c", script], env=ENV, timeout=900, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    err = (res / "err").read_text()
    assert (res / "rc").read_text().strip() == "2", err[-3000:]
    last = err.splitlines()[-1]
    assert last.startswith("qtulu train: error: ") and "no space left on device while writing checkpoint-2" in last
    assert "checkpoint-1, is intact" in last and "Traceback" not in err
    run_dir = res / "run" / "checkpoints"
    assert [p.name for p in run_dir.iterdir()] == ["checkpoint-1"]  # no stage left filling the disk
    ck.check_complete(run_dir / "checkpoint-1")
    resumed = train(str(tmp_path / "r.yaml"), output_dir=res / "run", progress=False)  # usable: the run goes on
    assert resumed.resumed_from == str(run_dir / "checkpoint-1") and resumed.global_step == 3
