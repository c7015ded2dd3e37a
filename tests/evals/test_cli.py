"""`qtulu eval` end to end: a base and two adapters on disk, loaded by qtulu.adapters.store.load_model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def disk_model(tmp_path_factory, make_lora):
    """A tiny base saved as safetensors + two qtulu adapters trained against it (random B)."""
    from qtulu.adapters.store import save_adapter
    from qtulu.model.load import base_info, load_base
    from qtulu.model.tiny import build_char_tokenizer, build_tiny_llama

    root = tmp_path_factory.mktemp("cli")
    base_dir = root / "base"
    build_tiny_llama(seed=0, dtype=torch.float32).save_pretrained(base_dir)
    build_char_tokenizer().save_pretrained(base_dir)
    model, _ = load_base(str(base_dir), quantize=None, compute_dtype=torch.float32, device="cpu")
    peft_model = make_lora(model)
    info = base_info(peft_model)
    dirs = [save_adapter(peft_model, root / n, adapter_name=n, base_info=info) for n in ("alpha", "beta")]
    return base_dir, dirs


def test_eval_cli_end_to_end(disk_model, eval_data, tydiqa_dir, tmp_path, tmp_path_factory, fake_judge, capsys):
    from qtulu.cli import main

    base_dir, (a, b) = disk_model
    for name in ("mmlu", "truthfulqa"):
        (tydiqa_dir / name).symlink_to(eval_data / name)
    fake_judge["reply"] = lambda m: "yes"
    preds = {}
    for bs in (1, 8):
        out = tmp_path_factory.mktemp(f"bs{bs}")  # not inside the data root (tmp_path): issue 25 refuses that
        judged = ["--tasks", "mmlu,tydiqa_nocontext,truthfulqa_gen", "--judge-url", fake_judge["url"],
                  "--judge-model", "j"] if bs == 8 else ["--tasks", "mmlu,tydiqa_nocontext"]
        rc = main(["eval", "--model", str(base_dir), "--adapter", str(a), "--adapter", f"other={b}",
                   "--include-base", "--quantize", "none", "--dtype", "float32", *judged,
                   "--data-dir", str(tydiqa_dir), "--out", str(out), "--batch-size", str(bs), "--limit", "2",
                   "--task-option", "mmlu.subjects=[world_religions, global_facts]",
                   "--task-option", "tydiqa_nocontext.max_new_tokens=6",
                   "--task-option", "truthfulqa_gen.max_new_tokens=4"])
        assert rc == 0
        res = json.loads((out / "results.json").read_text())
        assert list(res["results"]) == ["base", "alpha", "other"]
        preds[bs] = {(lab, t): [json.loads(line)["prediction"] for line in (out / lab / t / "predictions.jsonl").open()]
                     for lab in res["results"] for t in ("mmlu", "tydiqa_nocontext")}
    assert res["results"]["other"]["truthfulqa_gen"]["pct_true"] == 1.0
    # the loaded model's default attention (qtulu_varlen) on left-padded batches: batch size does not matter
    assert preds[1] == preds[8]
    assert "| task | base | alpha | other |" in capsys.readouterr().out


def test_eval_cli_errors_are_one_line(eval_data, tmp_path, capsys):
    from qtulu.cli import main

    assert main(["eval", "--model", "x", "--tasks", "codex_humaneval", "--data-dir", str(eval_data),
                 "--out", str(tmp_path)]) == 2
    assert "--allow-code-execution" in capsys.readouterr().err
    assert main(["eval", "--model", "x", "--tasks", "nope", "--data-dir", str(eval_data), "--out", str(tmp_path)]) == 2
    assert "unknown task 'nope'" in capsys.readouterr().err
    assert main(["eval", "--list-tasks"]) == 0
    assert "codex_humaneval_t01\tv2.0" in capsys.readouterr().out


def test_merge_search_cli(disk_model, eval_data, tmp_path, capsys):
    from qtulu.adapters.store import verify_adapter
    from qtulu.cli import main

    base_dir, (a, b) = disk_model
    rc = main(["eval", "merge-search", "--model", str(base_dir), "--adapter", str(a), "--adapter", str(b),
               "--quantize", "none", "--dtype", "float32", "--tasks", "mmlu", "--data-dir", str(eval_data),
               "--out", str(tmp_path), "--methods", "linear,cat", "--weights", "0.5,0.5",
               "--weights", "0.9,0.1", "--limit", "2", "--task-option", "mmlu.subjects=[world_religions]",
               "--task-option", "mmlu.split=dev"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    rows = json.loads((tmp_path / "merge_search.json").read_text())["candidates"]
    assert len(rows) == 2 + 4
    verify_adapter(out["best_dir"])


def test_lm_eval_model_type(disk_model):
    """lm-eval's registry builds base + qtulu adapter; its log-likelihoods are the adapted model's."""
    pytest.importorskip("lm_eval", reason="lm-eval is not installed (optional extra: pip install 'qtulu[lmeval]')")
    from lm_eval.api.instance import Instance
    from lm_eval.api.registry import get_model

    import qtulu.evals.lm_eval_adapter  # noqa: F401  (registers the model type)

    base_dir, (a, _b) = disk_model
    cls = get_model("qtulu")
    lms = {name: cls(pretrained=str(base_dir), adapter=adapter, quantize="none", compute_dtype="float32",
                     batch_size=2) for name, adapter in (("adapted", str(a)), ("plain", None))}
    reqs = [("The cat", " sat"), ("Q: 2+2?\nA:", " 4")]
    got = {name: [ll for ll, _ in lm.loglikelihood(
        [Instance("loglikelihood", {}, r, i) for i, r in enumerate(reqs)], disable_tqdm=True)] for name, lm in lms.items()}
    model, tok = lms["adapted"].model, lms["adapted"].tokenizer
    for (ctx, cont), value in zip(reqs, got["adapted"]):
        ids = torch.tensor([tok(ctx + cont, add_special_tokens=False)["input_ids"]])
        n = len(tok(cont, add_special_tokens=False)["input_ids"])
        with torch.no_grad():
            logp = model(input_ids=ids).logits.double().log_softmax(-1)[0]
        want = sum(float(logp[t - 1, ids[0, t]]) for t in range(ids.shape[1] - n, ids.shape[1]))
        assert value == pytest.approx(want, abs=1e-3)
    assert got["adapted"] != pytest.approx(got["plain"], abs=1e-3)  # the adapter is really applied


def test_every_task_declares_its_options_and_a_typo_is_refused():
    import inspect

    import pytest

    from qtulu.evals.tasks import TASKS, TaskOptionError, get_task

    for name, (module_name, defaults) in TASKS.items():
        task = get_task(name)
        assert set(defaults) <= set(task.module.OPTIONS), name  # each variant's presets are declared options
        for fn in (task.module.load, task.module.predict, task.module.score):
            for p in inspect.signature(fn).parameters.values():
                if p.kind is p.KEYWORD_ONLY and p.name not in ("limit", "judge", "classifier", "allow_code_execution",
                                                                "workers", "progress"):
                    assert p.name in task.module.OPTIONS, (name, fn.__name__, p.name)
    with pytest.raises(TaskOptionError, match=r"unknown option 'max_new_token'; valid options: .*max_new_tokens"):
        get_task("gsm8k", max_new_token=32)


def test_score_cli_profile_option(tmp_path, capsys):
    """`--profile corrected` changes the scorer (GSM8K: "$18.00" is 18); the default reproduces
    open-instruct (it is not); a profile that does not exist is refused by argparse."""
    from qtulu.cli import main

    path = tmp_path / "predictions.jsonl"
    path.write_text(json.dumps({"id": "0", "output": "So the answer is $18.00.", "gold": "18"}) + "\n")
    got = {}
    for profile in ("open_instruct", "corrected"):
        assert main(["eval", "score", "--task", "gsm8k", "--predictions", str(path), "--profile", profile]) == 0
        got[profile] = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["exact_match"]
    assert got == {"open_instruct": 0.0, "corrected": 1.0}
    # refused by argparse: one line, exit 2 (issue 28: argparse's errors too)
    assert main(["eval", "score", "--task", "gsm8k", "--predictions", str(path), "--profile", "paper"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "argument --profile: unknown choice 'paper'" in err, err


# ---- issue 28: checks before torch, a finished request read back without a model


def _in_subprocess(argv: list[str]) -> tuple[subprocess.CompletedProcess, list]:
    """``main(argv)`` in a fresh interpreter; returns the process and [torch imported?, exit status]."""
    code = ("import json, sys; from qtulu.cli import main; rc = main(%r); "
            "print(json.dumps(['torch' in sys.modules, rc]))" % (argv,))
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    return proc, json.loads(proc.stdout.splitlines()[-1])


@pytest.mark.parametrize("flag,value,words", [("--batch-size", "0", "must be at least 1, got 0"),
                                               ("--limit", "-3", "must be at least 1, got -3"),
                                               ("--workers", "many", "expected a whole number, got 'many'")])
def test_counts_are_checked_before_torch_is_imported(tmp_path, flag, value, words):
    proc, (torch_imported, rc) = _in_subprocess(["eval", "--model", str(tmp_path / "m"), "--tasks", "mmlu",
                                                 "--data-dir", str(tmp_path), "--out", str(tmp_path / "o"),
                                                 flag, value])
    assert rc == 2 and not torch_imported, proc.stderr
    assert proc.stderr == f"qtulu eval: error: argument {flag}: {words} (see `qtulu eval --help`)\n"


def test_a_finished_eval_reads_back_without_torch_or_a_model(disk_model, tmp_path, capsys):
    from qtulu.cli import main
    from qtulu.demo.synthetic import make_examples, write_jsonl

    base_dir, (a, _b) = disk_model
    data = tmp_path / "data"
    data.mkdir()
    write_jsonl(make_examples("upper", 4, split="test", seed=0), data / "upper_test.jsonl")
    argv = ["eval", "--model", str(base_dir), "--adapter", str(a), "--include-base", "--quantize", "none",
            "--dtype", "float32", "--tasks", "synthetic_upper", "--data-dir", str(data), "--out", str(tmp_path / "out"),
            "--batch-size", "4", "--no-progress"]
    assert main(argv) == 0
    first = capsys.readouterr().out
    assert "cells were complete" not in first
    proc, (torch_imported, rc) = _in_subprocess(argv)
    assert rc == 0 and not torch_imported, proc.stderr[-3000:]
    assert "2 of 2 cells were complete" in proc.stdout and "no model loaded" in proc.stdout
    table = [line for line in first.splitlines() if line.startswith("|")]
    assert table and table == [line for line in proc.stdout.splitlines() if line.startswith("|")]
    assert first.splitlines()[-1] == proc.stdout.splitlines()[-2]  # the same JSON summary

    # an adapter file touched (same bytes): the shortcut is off, the model loads, every cell is still
    # read back by its full key (weights' SHA-256)
    w = a / "adapter_model.safetensors"
    os.utime(w, ns=(w.stat().st_atime_ns, w.stat().st_mtime_ns + 10**9))
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "2 of 2 cells were complete" in out and "no model loaded" not in out
    # changed data: recomputed (the model loads, no cell read back)
    write_jsonl(make_examples("upper", 5, split="test", seed=0), data / "upper_test.jsonl")
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "cells were complete" not in out
    assert json.loads((tmp_path / "out" / "base" / "synthetic_upper" / "metrics.json").read_text())["n"] == 5
