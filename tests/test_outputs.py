"""Issue 25, from the host's side: no command deletes or replaces what it did not write, every hostile
adapter config / metadata value and every enumerated recipe key is one line and exit 2 before
anything loads, FIFOs are refused instead of hanging, values that overflow in the compute dtype
are refused, and a full disk at a save is one line. Each attack runs the CLI (`qtulu.cli.main`, or
a subprocess where a regression would hang) and checks the exit code, the one-line stderr and that
the victim files are byte for byte what they were."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from qtulu.cli import main

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def snapshot(*roots: Path) -> dict[str, str]:
    """Every file under ``roots`` (or the file itself) -> sha256: 'byte-identical afterwards'."""
    out = {}
    for root in roots:
        for p in ([root] if root.is_file() else sorted(q for q in root.rglob("*") if q.is_file())):
            out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def refused(capsys, rc: int, *needles: str, alone: bool = True) -> str:
    """Exit 2 and the error as one line on stderr (no traceback) containing every needle; ``alone``:
    nothing else on stderr either (refused before any work that shows progress)."""
    err = capsys.readouterr().err
    assert rc == 2, err[-2000:]
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines and "Traceback" not in err and (len(lines) == 1 or not alone), err[-2000:]
    assert lines[-1].startswith("qtulu "), err[-2000:]
    for n in needles:
        assert n in lines[-1], (n, lines[-1])
    return lines[-1]


@pytest.fixture(scope="module")
def world(tmp_path_factory, base_with_two_adapters):
    """A tiny fp32 base dir and two adapters saved for it (its own copy: the attacks must not touch others')."""
    return base_with_two_adapters(tmp_path_factory.mktemp("outputs"))


def merge_args(world, out, *extra):
    base_dir, dirs = world
    return ["merge", "--model", str(base_dir), "--adapter", str(dirs["first"]), "--adapter", str(dirs["second"]),
            "--out", str(out), *extra]


# --------------------------------------------------------------------------------------------
# output paths


def test_merge_out_onto_an_input_adapter_or_the_base_is_refused(world, tmp_path, capsys):
    base_dir, dirs = world
    before = snapshot(base_dir, dirs["first"], dirs["second"])
    refused(capsys, main(merge_args(world, dirs["first"])), "--out", "is the adapter")
    refused(capsys, main(merge_args(world, base_dir, "--full")), "is the base model")
    refused(capsys, main(merge_args(world, base_dir / "sub", "--full")), "is inside the base model")
    refused(capsys, main(merge_args(world, dirs["first"].parent)), "holds the")  # the folder holding them
    link = tmp_path / "link"
    link.symlink_to(dirs["second"], target_is_directory=True)
    refused(capsys, main(merge_args(world, link)), "is the adapter", str(dirs["second"]))
    one = ["merge", "--model", str(base_dir), "--adapter", str(dirs["first"]), "--full", "--out", str(dirs["first"])]
    refused(capsys, main(one), "is the adapter")
    assert snapshot(base_dir, dirs["first"], dirs["second"]) == before


def test_merge_into_a_foreign_folder_needs_overwrite_and_an_earlier_merge_is_replaced(world, tmp_path, capsys):
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "holiday.jpg").write_bytes(b"\xff\xd8 not a model")
    before = snapshot(foreign)
    refused(capsys, main(merge_args(world, foreign, "--full", "--dtype", "float32")), "not a qtulu merged model",
            "--overwrite")
    refused(capsys, main(merge_args(world, foreign)), "not a qtulu adapter")
    assert snapshot(foreign) == before
    (tmp_path / "afile").write_text("x")
    refused(capsys, main(merge_args(world, tmp_path / "afile", "--full")), "is a file")
    assert (tmp_path / "afile").read_text() == "x"
    # an earlier output of the same kind is replaced (no --overwrite needed); with --overwrite a foreign one too
    out = tmp_path / "lin"
    assert main(merge_args(world, out, "--weights", "0.5", "0.5")) == 0
    assert main(merge_args(world, out, "--weights", "0.6", "0.4")) == 0
    capsys.readouterr()
    assert json.loads((out / "qtulu.json").read_text())["extra"]["merge"]["weights"] == [0.6, 0.4]
    assert main(merge_args(world, foreign, "--overwrite")) == 0
    assert (foreign / "qtulu.json").is_file() and not (foreign / "holiday.jpg").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "lin", "photos"]  # no stage or old copy left


def test_train_output_dir_onto_its_inputs_is_refused_before_loading(tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    (data / "rows.jsonl").write_text('{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}\n')
    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text("{}")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"name: t\nsources:\n  - {{name: rows, format: messages, path: {data / 'rows.jsonl'}}}\n"
                      f"model: {{base: {base}}}\n")
    before = snapshot(data, base, recipe)
    refused(capsys, main(["train", str(recipe), "--output-dir", str(data)]), "--output-dir", "holds the data source rows")
    refused(capsys, main(["train", str(recipe), "--output-dir", str(base)]), "is the base model")
    refused(capsys, main(["train", str(recipe), "--output-dir", str(tmp_path)]), "holds the")
    foreign = tmp_path / "notes"
    foreign.mkdir()
    (foreign / "todo.txt").write_text("keep me")
    refused(capsys, main(["train", str(recipe), "--output-dir", str(foreign)]), "not a qtulu training run", "--overwrite")
    assert snapshot(data, base, recipe) == before and (foreign / "todo.txt").read_text() == "keep me"


def test_eval_outputs_never_land_on_their_inputs(world, tmp_path, capsys):
    base_dir, dirs = world
    preds = tmp_path / "predictions.jsonl"
    preds.write_text('{"id": "x", "output": "1"}\n')
    before = snapshot(base_dir, dirs["first"], preds)
    data = tmp_path / "evaldata"
    data.mkdir()
    rc = main(["eval", "--model", str(base_dir), "--adapter", str(dirs["first"]), "--tasks", "gsm8k",
               "--data-dir", str(data), "--out", str(dirs["first"])])
    refused(capsys, rc, "--out", "is the adapter")
    rc = main(["eval", "--model", str(base_dir), "--tasks", "gsm8k", "--data-dir", str(data), "--out", str(tmp_path)])
    refused(capsys, rc, "holds the")
    rc = main(["eval", "score", "--task", "gsm8k", "--predictions", str(preds), "--out", str(preds)])
    refused(capsys, rc, "--out", "is the predictions file")
    assert snapshot(base_dir, dirs["first"], preds) == before


def test_study_refuses_a_foreign_out_folder(tmp_path, capsys):
    foreign = tmp_path / "thesis"
    foreign.mkdir()
    (foreign / "chapter1.tex").write_text("keep")
    refused(capsys, main(["study", "demo", "--out", str(foreign), "--plan"]), "not a qtulu study")
    assert (foreign / "chapter1.tex").read_text() == "keep" and sorted(os.listdir(foreign)) == ["chapter1.tex"]


def test_replace_dir_keeps_the_earlier_output_recoverable(tmp_path, monkeypatch):
    from qtulu import files

    def make(path: Path, text: str) -> Path:
        path.mkdir()
        (path / "f").write_text(text)
        return path

    out = make(tmp_path / "out", "old")
    files.replace_dir(make(tmp_path / ".stage1", "new"), out)
    assert (out / "f").read_text() == "new" and sorted(os.listdir(tmp_path)) == ["out"]
    # without the one-step swap, a failing second rename puts the earlier output back
    monkeypatch.setattr(files, "_exchange", lambda a, b: False)
    real, calls = os.replace, []

    def flaky(a, b):
        calls.append((a, b))
        if len(calls) == 2:
            raise OSError(errno.EIO, "simulated failure between the renames")
        return real(a, b)

    monkeypatch.setattr(files.os, "replace", flaky)
    stage = make(tmp_path / ".stage2", "newer")
    with pytest.raises(OSError, match="simulated"):
        files.replace_dir(stage, out)
    assert (out / "f").read_text() == "new"  # the earlier output is back in place, whole
    monkeypatch.setattr(files.os, "replace", real)
    files.replace_dir(stage, out)
    assert (out / "f").read_text() == "newer" and sorted(os.listdir(tmp_path)) == ["out"]


def test_run_lock_never_follows_a_symlink(tmp_path):
    from qtulu.train.runlock import LOCK_NAME, RunDirLocked, run_lock

    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    run = tmp_path / "run"
    run.mkdir()
    (run / LOCK_NAME).symlink_to(victim)
    with pytest.raises(RunDirLocked, match="is a symlink"):
        with run_lock(run):
            pass
    dangling = tmp_path / "run2"
    dangling.mkdir()
    (dangling / LOCK_NAME).symlink_to(tmp_path / "would-be-created")
    with pytest.raises(RunDirLocked, match="is a symlink"):
        with run_lock(dangling):
            pass
    assert victim.read_text() == "precious" and not (tmp_path / "would-be-created").exists()


# --------------------------------------------------------------------------------------------
# hostile adapter configs and metadata


def _rewrite(src: Path, dst: Path, *, config=None, meta=None, tensors=None) -> Path:
    """A copy of adapter ``src`` with config/meta edits, the checksums rewritten to match (so that
    only the hostile value itself can be what is refused)."""
    from qtulu.adapters.store import _safetensors_layout, sha256_file

    shutil.copytree(src, dst)
    if tensors is not None:
        save_file(tensors, str(dst / "adapter_model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((dst / "adapter_config.json").read_text())
    if config:
        cfg.update(config)
    (dst / "adapter_config.json").write_text(json.dumps(cfg))
    m = json.loads((dst / "qtulu.json").read_text())
    for name in m["files"]:
        m["files"][name] = sha256_file(dst / name)
        m["sizes"][name] = (dst / name).stat().st_size
    m["tensors"] = _safetensors_layout(dst / "adapter_model.safetensors")
    if meta:
        m.update(meta)
    (dst / "qtulu.json").write_text(json.dumps(m))
    return dst


HOSTILE_CONFIGS = [
    ({"peft_type": "BOGUS"}, "peft_type"),
    ({"use_dora": True}, "use_dora"),
    ({"modules_to_save": ["lm_head", "embed_tokens"]}, "modules_to_save"),
    ({"target_modules": ["../../etc/passwd"]}, "target_modules"),
    ({"target_modules": "/etc/passwd"}, "target_modules"),
    ({"target_modules": 7}, "target_modules"),
    ({"r": "4"}, "r:"),
    ({"r": 0}, "r:"),
    ({"lora_alpha": "big"}, "lora_alpha"),
    ({"lora_alpha": -1}, "lora_alpha"),
    ({"lora_dropout": 2}, "lora_dropout"),
    ({"bias": "all"}, "bias"),
    ({"init_lora_weights": "pissa"}, "init_lora_weights"),
    ({"layer_replication": [[0, 1], [0, 1]]}, "layer_replication"),
    ({"fan_in_fan_out": "yes"}, "fan_in_fan_out"),
    ({"use_rslora": 1}, "use_rslora"),
    ({"rank_pattern": {"q_proj": "x"}}, "rank_pattern"),
    ({"rank_pattern": ["q_proj"]}, "rank_pattern"),
    ({"alpha_pattern": {"q_proj": -2}}, "alpha_pattern"),
    ({"layers_to_transform": "all"}, "layers_to_transform"),
    ({"layers_to_transform": [999]}, "layers_to_transform"),
    ({"layers_pattern": "../x"}, "layers_pattern"),
    ({"lora_bias": True}, "lora_bias"),
    ({"trainable_token_indices": [1, 2]}, "trainable_token_indices"),
]
HOSTILE_METAS = [
    ({"files": {"/etc/shadow": "0" * 64, "adapter_config.json": None}}, "/etc/shadow"),
    ({"files": {"../first/adapter_model.safetensors": "0" * 64}}, "not a file name inside"),
    ({"files": ["adapter_config.json"]}, "files:"),
    ({"sizes": {"adapter_config.json": "big"}}, "sizes:"),
    ({"compute_dtype": "int8"}, "compute_dtype"),
    ({"base": ["x"]}, "base:"),
]


@pytest.mark.parametrize("edit,needle", HOSTILE_CONFIGS, ids=[next(iter(e)) + str(i) for i, (e, _) in enumerate(HOSTILE_CONFIGS)])
def test_hostile_adapter_config_is_one_line(world, tmp_path, capsys, edit, needle):
    base_dir, dirs = world
    bad = _rewrite(dirs["first"], tmp_path / "bad", config=edit)
    before = snapshot(base_dir, bad)
    line = refused(capsys, main(["merge", "--model", str(base_dir), "--adapter", str(bad), "--full",
                                 "--dtype", "float32", "--out", str(tmp_path / "m")]), needle)
    assert "adapter_config.json" in line
    rc = main(["merge", "--model", str(base_dir), "--adapter", str(bad), "--adapter", str(dirs["second"]),
               "--out", str(tmp_path / "c")])
    refused(capsys, rc, needle)
    assert snapshot(base_dir, bad) == before and not (tmp_path / "m").exists() and not (tmp_path / "c").exists()


@pytest.mark.parametrize("edit,needle", HOSTILE_METAS, ids=[str(i) for i in range(len(HOSTILE_METAS))])
def test_hostile_adapter_metadata_is_one_line_and_reads_nothing_outside(world, tmp_path, capsys, monkeypatch, edit, needle):
    from qtulu.adapters import files as afiles

    base_dir, dirs = world
    bad = _rewrite(dirs["first"], tmp_path / "bad", meta=edit)
    hashed = []
    real = afiles.sha256_file
    monkeypatch.setattr(afiles, "sha256_file", lambda p, *a: hashed.append(str(p)) or real(p, *a))
    rc = main(["merge", "--model", str(base_dir), "--adapter", str(bad), "--full", "--out", str(tmp_path / "m")])
    line = refused(capsys, rc, needle, "qtulu.json")
    assert "shadow" not in line or "sha256" not in line
    assert all(str(bad) in h for h in hashed)  # nothing outside the adapter folder was read


def test_layers_to_transform_out_of_range_is_refused_at_load(world, tmp_path):
    from qtulu.adapters.integrity import AdapterShapeError
    from qtulu.adapters.store import load_model

    base_dir, dirs = world
    bad = _rewrite(dirs["first"], tmp_path / "bad", config={"layers_to_transform": [0, 999]})
    with pytest.raises(AdapterShapeError, match=r"layers_to_transform: \[999\] out of range: the base has 2 layers"):
        load_model(str(base_dir), [str(bad)], compute_dtype=torch.float32, device="cpu", attn_implementation="sdpa")


# --------------------------------------------------------------------------------------------
# values that overflow in the compute dtype


def test_adapter_values_that_overflow_are_refused_in_eval_and_merge(world, tmp_path, capsys):
    from qtulu.adapters.integrity import AdapterOverflow
    from qtulu.adapters.store import load_model

    base_dir, dirs = world
    sd = load_file(str(dirs["first"] / "adapter_model.safetensors"))
    key = sorted(k for k in sd if "lora_A" in k)[0]
    huge = {k: (v.fill_(1e30) if k in (key, key.replace("lora_A", "lora_B")) else v) for k, v in sd.items()}
    bad = _rewrite(dirs["first"], tmp_path / "huge", tensors=huge)
    module = key.split(".lora_A")[0].removeprefix("base_model.model.")
    with pytest.raises(AdapterOverflow, match=module):  # what eval and chat load through
        load_model(str(base_dir), [str(bad)], compute_dtype=torch.float32, device="cpu", attn_implementation="sdpa")
    rc = main(["merge", "--model", str(base_dir), "--adapter", str(bad), "--adapter", str(dirs["second"]),
               "--method", "linear", "--out", str(tmp_path / "lin")])
    refused(capsys, rc, "overflows in the compute dtype", module)
    rc = main(["merge", "--model", str(base_dir), "--adapter", str(bad), "--full", "--out", str(tmp_path / "full")])
    refused(capsys, rc, "overflows")
    # fp16: a factor of 1e5 is already inf in the compute dtype itself
    sd16 = {k: (v.fill_(1e5) if k == key else v) for k, v in load_file(str(dirs["first"] / "adapter_model.safetensors")).items()}
    bad16 = _rewrite(dirs["first"], tmp_path / "f16", tensors=sd16)
    with pytest.raises(AdapterOverflow.__mro__[1], match=f"{key}.*non-finite|overflow"):
        load_model(str(base_dir), [str(bad16)], compute_dtype=torch.float16, device="cpu", attn_implementation="sdpa")
    assert not (tmp_path / "lin").exists() and not (tmp_path / "full").exists()


def test_overflow_bound_is_the_largest_product_element():
    """The bound `check_adapter_weights` uses: max|(B A)_ij| <= max_i |B_i.| * max_j |A_.j| (float64)."""
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        a, b = torch.randn(4, 9, generator=g, dtype=torch.float64), torch.randn(7, 4, generator=g, dtype=torch.float64)
        bound = float(a.norm(dim=0).max() * b.norm(dim=1).max())
        assert (b @ a).abs().max().item() <= bound * (1 + 1e-12)


# --------------------------------------------------------------------------------------------
# enumerated recipe keys, before anything loads


@pytest.mark.parametrize("override,key", [
    ("train.optimizer=adamw_bogus", "train.optimizer"),
    ("train.lr_scheduler=wobbly", "train.lr_scheduler"),
    ("train.report_to=tensorboard,carrier_pigeon", "train.report_to"),
    ("model.attn_implementation=telepathy", "model.attn_implementation"),
    ("lora.target_modules=[../../etc/passwd]", "lora.target_modules"),
])
def test_unknown_enumerated_recipe_value_is_one_line_before_loading(capsys, override, key):
    refused(capsys, main(["train", "dolly", "--set", override, "--output-dir", "/nonexistent/never"]), key)


def test_enumerated_names_are_hf_names():
    from transformers.trainer_utils import SchedulerType
    from transformers.training_args import OptimizerNames

    from qtulu.recipes import LR_SCHEDULERS, OPTIMIZERS

    assert set(OPTIMIZERS) <= {o.value for o in OptimizerNames}
    assert set(LR_SCHEDULERS) <= {s.value for s in SchedulerType}


# --------------------------------------------------------------------------------------------
# FIFOs as inputs: refused, never a hang (a subprocess with a timeout, so that a regression fails)


def _qtulu(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "qtulu.cli", *map(str, args)], capture_output=True, text=True,
                          env=ENV, timeout=timeout)


def test_fifo_inputs_are_refused_not_read(world, tmp_path):
    base_dir, dirs = world
    fifo = tmp_path / "rows.jsonl"
    os.mkfifo(fifo)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"name: t\nsources:\n  - {{name: rows, format: messages, path: {fifo}}}\n"
                      f"model: {{base: {base_dir}, compute_dtype: float32}}\n")
    proc = _qtulu("data", "build", str(recipe), "--out", tmp_path / "built")
    assert proc.returncode == 2 and "is a FIFO" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    bad = tmp_path / "fifo_adapter"
    shutil.copytree(dirs["first"], bad)
    (bad / "adapter_config.json").unlink()
    os.mkfifo(bad / "adapter_config.json")
    proc = _qtulu("merge", "--model", base_dir, "--adapter", bad, "--full", "--out", tmp_path / "m")
    assert proc.returncode == 2 and "is a FIFO" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    yfifo = tmp_path / "r2.yaml"
    os.mkfifo(yfifo)
    proc = _qtulu("train", yfifo)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]


def test_fifo_among_base_files_is_refused(world, tmp_path, capsys):
    base_dir, dirs = world
    base = tmp_path / "base"
    shutil.copytree(base_dir, base)
    os.mkfifo(base / "tokenizer.model")
    rc = main(["merge", "--model", str(base), "--adapter", str(dirs["first"]), "--adapter", str(dirs["second"]),
               "--out", str(tmp_path / "m")])
    refused(capsys, rc, "is a FIFO", "tokenizer.model")


# --------------------------------------------------------------------------------------------
# a full disk at a save


def test_full_disk_at_adapter_save_and_merged_export_is_one_line(world, tmp_path, capsys, monkeypatch):
    import peft.peft_model

    from qtulu.adapters import shards

    def no_space(*a, **k):
        raise RuntimeError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, "
                           "message: \"No space left on device\" })")

    monkeypatch.setattr(peft.peft_model, "safe_save_file", no_space)
    rc = main(merge_args(world, tmp_path / "lin"))
    refused(capsys, rc, "disk is full", str(tmp_path / "lin"), alone=False)  # after the base loaded
    monkeypatch.undo()

    def enospc(self, name, t):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(shards.ShardWriter, "add", enospc)
    base_dir, dirs = world
    rc = main(["merge", "--model", str(base_dir), "--adapter", str(dirs["first"]), "--full", "--out", str(tmp_path / "full")])
    refused(capsys, rc, "disk is full", str(tmp_path / "full"), alone=False)
    assert os.listdir(tmp_path) == []  # no stage, no half-written output


def test_what_counts_as_an_earlier_output_of_the_same_kind(tmp_path):
    from qtulu.files import is_output_of

    plain = tmp_path / "peft_only"
    plain.mkdir()
    (plain / "adapter_config.json").write_text("{}")  # a plain PEFT adapter: not a qtulu output
    assert not is_output_of(plain, "adapter")
    other = tmp_path / "other_trainer"
    (other / "checkpoints" / "checkpoint-5").mkdir(parents=True)  # another trainer's run: not ours to clean
    assert not is_output_of(other, "run")
    (other / "checkpoints" / "checkpoint-5" / "qtulu_checkpoint.json").write_text("{}")
    assert is_output_of(other, "run")


def test_full_disk_in_atomic_writes_is_one_line_and_leaves_the_old_file(tmp_path):
    """Eval results, study records and reports go through `atomic_write`: a full disk there is a
    `DiskFullError` (a QtuluError: one line, exit 2) and the earlier file is untouched."""
    from qtulu.errors import QtuluError
    from qtulu.files import DiskFullError, atomic_write, write_json

    target = tmp_path / "results.json"
    write_json(target, {"score": 1})
    before = target.read_bytes()

    def full(tmp):
        tmp.write_bytes(b"{")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with pytest.raises(DiskFullError, match="the disk is full") as err:
        atomic_write(target, full)
    assert isinstance(err.value, QtuluError) and "\n" not in str(err.value)
    assert target.read_bytes() == before and sorted(os.listdir(tmp_path)) == ["results.json"]
    with pytest.raises(ValueError, match="unrelated"):  # other errors pass through unchanged
        atomic_write(target, lambda tmp: (_ for _ in ()).throw(ValueError("unrelated")))


def test_demo_data_build_and_bench_outputs_never_write_over_foreign_folders(tmp_path, capsys):
    """`qtulu demo --out`, `qtulu data build --out` and `qtulu bench e2e --out-dir` refuse a non-empty
    folder that is not their own earlier output (and data build one that holds its own source), before
    any work; the victims stay byte-identical."""
    from qtulu.cli import main

    foreign = tmp_path / "home"
    (foreign / "base").mkdir(parents=True)
    (foreign / "base" / "notes.txt").write_text("mine")
    (foreign / "report.txt").write_text("mine too")
    before = snapshot(foreign)
    refused(capsys, main(["demo", "--out", str(foreign), "--no-progress"]), "not a qtulu demo output", "--overwrite")
    refused(capsys, main(["bench", "e2e", "--shape", "tiny", "--out-dir", str(foreign)]), "not a qtulu benchmark output")
    data = tmp_path / "data"
    data.mkdir()
    (data / "rows.jsonl").write_text('{"messages": [{"role": "user", "content": "hi"}, '
                                     '{"role": "assistant", "content": "yo"}]}\n')
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"name: t\nsources:\n  - {{name: rows, format: messages, path: {data / 'rows.jsonl'}}}\n")
    rows = snapshot(data)
    refused(capsys, main(["data", "build", str(recipe), "--out", str(data)]), "holds the data source rows")
    refused(capsys, main(["data", "build", str(recipe), "--out", str(foreign)]), "not a qtulu data build")
    assert snapshot(foreign) == before and snapshot(data) == rows
