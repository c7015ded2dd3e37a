"""The study's table (issue 28): a "best adapter" for a task only where it beats the base; `--plan`
writes nothing."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

from qtulu.study.report import collect, text_table


def _plan(scores: dict[str, dict[str, float]]):
    """A plan whose complete eval cells hold ``scores`` ({row: {task: score}}), the base first."""
    rows, cols = list(scores), list(next(iter(scores.values())))
    study = SimpleNamespace(labels=rows, columns=[SimpleNamespace(name=t, task=t) for t in cols], average=cols, merge=None,
                            name="t", file=Path("t.yaml"), spec=SimpleNamespace(description=None), base_path="b",
                            eval=SimpleNamespace(profile="open_instruct", quick=False), limit=None)
    return SimpleNamespace(
        study=study, records=SimpleNamespace(read=lambda name: None),
        eval_complete=lambda label, c: {"score": scores[label][c.name], "metric": "exact match", "version": "1"})


def test_best_adapter_only_where_it_beats_the_base():
    res = collect(_plan({"base": {"copy": 1.0, "upper": 0.0, "tie": 0.5, "zero": 0.0},
                         "a": {"copy": 0.05, "upper": 1.0, "tie": 0.5, "zero": 0.0},
                         "b": {"copy": 0.03, "upper": 1.0, "tie": 0.4, "zero": 0.0}}))
    assert res["best"] == {"copy": [], "upper": ["a", "b"], "tie": [], "zero": []}
    line = text_table(res).splitlines()[-1]
    assert line == ("best adapter per task: copy: none beats the base (100.0); upper: a, b; "
                    "tie: none beats the base (50.0); zero: none beats the base (0.0)")


def test_without_a_base_row_the_best_scoring_adapter_is_named():
    res = collect(_plan({"a": {"x": 0.2}, "b": {"x": 0.7}}))
    assert res["best"] == {"x": ["b"]}
    res = collect(_plan({"a": {"x": 0.0}, "b": {"x": 0.0}}))
    assert res["best"] == {"x": []} and text_table(res).endswith("best adapter per task: x: n/a")


def test_plan_writes_nothing(tmp_path, capsys):
    from qtulu.cli import main

    out = tmp_path / "out"
    assert main(["study", "demo", "--out", str(out), "--plan"]) == 0
    printed = capsys.readouterr().out
    assert "0 of 18 cells complete" in printed and "to run" in printed
    assert not out.exists() and list(tmp_path.iterdir()) == []
