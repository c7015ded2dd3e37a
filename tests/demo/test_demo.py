"""`qtulu demo`: synthetic data splits; one full run with its normal settings (the README's first
command), and the README's tour run as written on the demo's own artefacts.

The demo run is ~30 s of CPU (it was 839 s before issue 19): it is the product's first command, so
it runs with the settings a user gets, and its output feeds the tour test (one run, module scope).
"""

from __future__ import annotations

import io
import json
import os
import re
import shlex
from pathlib import Path

import pytest

from qtulu.demo.synthetic import DEMO_SKILLS, TASKS, make_examples

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("task", list(TASKS))
def test_synthetic_splits_are_disjoint_and_exact(task):
    train = make_examples(task, 400, split="train", seed=0)
    test = make_examples(task, 100, split="test", seed=0)
    assert not {e["prompt"] for e in train} & {e["prompt"] for e in test}
    for e in train[:50] + test[:50]:
        arg = e["prompt"].split(" ", 1)[1]
        assert e["answer"] == TASKS[task]["answer"](arg)
        assert e["messages"][1] == {"role": "assistant", "content": e["answer"]}
        if task in DEMO_SKILLS:
            assert e["answer"] != arg  # a model that only echoes its argument scores 0
    assert make_examples(task, 20, split="test", seed=0) == test[:20]  # deterministic


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """`qtulu demo --out WORK/demo_out` with the default settings; returns (WORK, report, stdout)."""
    import contextlib

    import torch

    from qtulu.cli import main

    work = tmp_path_factory.mktemp("demo")
    threads = torch.get_num_threads()
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(["demo", "--out", str(work / "demo_out"), "--no-progress"]) == 0
    assert torch.get_num_threads() == threads  # the demo's 1-thread setting does not leak to the caller
    report = json.loads((work / "demo_out" / "report.json").read_text())
    return work, report, buf.getvalue()


@pytest.mark.slow  # the demo itself, ~30 s of CPU: the README's first command, with its settings
def test_demo_learns_each_skill(demo_run):
    work, report, printed = demo_run
    out = work / "demo_out"
    assert set(report["tasks"]) == set(DEMO_SKILLS)
    for skill in DEMO_SKILLS:
        row = report["tasks"][skill]
        assert set(row) == {"base", *DEMO_SKILLS}
        assert row[skill] >= 0.6, report["tasks"]  # the adapter learned its skill
        assert row[skill] - row["base"] >= 0.4, report["tasks"]  # which the base does not have
        other = next(s for s in DEMO_SKILLS if s != skill)
        assert row[other] <= 0.2, report["tasks"]  # and the other skill's adapter does not give it
    assert report["warmup"]["base_copy_accuracy"] >= 0.9  # the warm-up taught the base to echo
    assert report["threads"] == 1
    phases = report["phases"]
    assert {"imports", "setup", "warmup", "save_base", "eval", "total"} <= set(phases)
    assert all(t["wall"] >= 0 and t["cpu"] >= 0 for t in phases.values())
    assert (out / "loss.png").stat().st_size > 1000
    # the saved base is a loadable model directory; each adapter is named after its run
    assert (out / "base" / "model.safetensors").is_file() and (out / "base" / "tokenizer.json").is_file()
    for skill in DEMO_SKILLS:
        meta = json.loads((out / "runs" / skill / "adapter" / "qtulu.json").read_text())
        assert meta["name"] == skill
        assert meta["recipe"]["model"]["base"] == str(out / "base")
    assert "warm-up pretraining" in printed and "exact match" in printed


def tour_commands() -> list[str]:
    """The `qtulu ...` commands between the README's tour markers (continuation lines joined)."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    block = re.search(r"<!-- tour:start -->\s*```bash\n(.*?)```\s*<!-- tour:end -->", text, re.S)
    assert block, "README.md: the tour block (<!-- tour:start --> ... <!-- tour:end -->) is missing"
    joined = block.group(1).replace("\\\n", " ")
    return [line.strip() for line in joined.splitlines() if line.strip().startswith("qtulu ")]


@pytest.mark.slow  # every tour command on the demo's base (~20 s)
def test_readme_tour_runs_as_written_on_the_demo_artefacts(demo_run, monkeypatch, capsys):
    """Each tour command of the README, as written, from the folder `qtulu demo` ran in."""
    from qtulu.cli import main

    work, report, _ = demo_run
    monkeypatch.chdir(work)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the tour is offline: nothing may reach for the hub
    commands = tour_commands()
    verbs = [shlex.split(c)[1] for c in commands]
    assert {"chat", "eval", "merge", "train", "recipe"} <= set(verbs), verbs
    assert any("--full" in c for c in commands)
    for command in commands:
        argv = shlex.split(command)[1:]
        if argv[0] == "chat":
            monkeypatch.setattr("sys.stdin", io.StringIO("upper qtul\n/adapter successor\n/reset\nnext 2019\n/quit\n"))
        assert main(argv) == 0, command
        out = capsys.readouterr().out
        if argv[0] == "chat":
            assert "[upper] QTUL" in out and "[active: successor]" in out and "[successor] 2020" in out, out
        elif argv[0] == "eval":
            results = json.loads(Path("demo_out/eval/results.json").read_text())["results"]
            # the eval task scores what the demo's own table scored, on the same held-out rows
            for skill in DEMO_SKILLS:
                assert results[skill][f"synthetic_{skill}"]["score"] == pytest.approx(report["tasks"][skill][skill])
                assert results["base"][f"synthetic_{skill}"]["score"] <= 0.1  # plain prompt: the base only echoes
    assert json.loads(Path("demo_out/merged/qtulu.json").read_text())["name"] == "merged"
    assert (Path("demo_out/release") / "config.json").is_file()
    assert json.loads(Path("runs/copy/adapter/qtulu.json").read_text())["name"] == "copy"
    # the same eval again reads every (adapter, task) cell back instead of recomputing it
    eval_cmd = next(c for c in commands if shlex.split(c)[1] == "eval")
    assert main(shlex.split(eval_cmd)[1:]) == 0
    assert "6 of 6 cells were complete" in capsys.readouterr().out
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    # what is meant to be shared follows the umask (issue 28: safetensors leaves its files 0600)
    mask = os.umask(0o022)
    os.umask(mask)
    shared = [p for d in ("demo_out/base", "demo_out/merged", "demo_out/release", "demo_out/runs/upper/adapter",
                          "demo_out/runs/successor/adapter", "runs/copy/adapter") for p in Path(d).iterdir()]
    shared += list(Path("demo_out/eval").glob("results.*")) + [Path("demo_out/report.json"), Path("demo_out/loss.png")]
    assert any(p.name.endswith(".safetensors") for p in shared)
    wrong = {str(p): oct(p.stat().st_mode & 0o777) for p in shared if p.stat().st_mode & 0o777 != 0o666 & ~mask}
    assert not wrong, wrong
