"""`qtulu demo`: synthetic data splits, and one full run with its normal settings (the README's first command)."""

from __future__ import annotations

import json

import pytest

from qtulu.synthetic import DEMO_SKILLS, TASKS, make_examples


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


@pytest.mark.slow
def test_demo_learns_each_skill(tmp_path, capsys):
    from qtulu.cli import main

    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--no-progress"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["seconds"] > 0
    assert set(report["tasks"]) == set(DEMO_SKILLS)
    for skill in DEMO_SKILLS:
        row = report["tasks"][skill]
        assert set(row) == {"base", *DEMO_SKILLS}
        assert row[skill] >= 0.6, report["tasks"]
        assert row[skill] - row["base"] >= 0.4, report["tasks"]
    assert (out / "loss.png").stat().st_size > 1000
    for skill in DEMO_SKILLS:
        assert (out / "runs" / skill / "adapter" / "adapter_model.safetensors").is_file()
    printed = capsys.readouterr().out
    assert "warm-up pretraining" in printed and "exact match" in printed
