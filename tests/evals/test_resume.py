"""Eval cells (evals/cells.py): an interrupted run resumes per (adapter, task), a changed adapter,
option, data file or limit recomputes its cells only, a cache folder serves other output folders;
--quick and --limit are stated in results.md; quick options are options the tasks declare."""

from __future__ import annotations

import json

import pytest
import torch

from qtulu.demo.synthetic import make_examples, write_jsonl


@pytest.fixture
def synth_dir(tmp_path):
    d = tmp_path / "data"
    for skill in ("upper", "successor"):
        write_jsonl(make_examples(skill, 6, split="test", seed=0), d / f"{skill}_test.jsonl")
    return d


@pytest.fixture
def counted(monkeypatch):
    """Counts predict calls of the synthetic task; ``stop_at`` (call number) raises Ctrl-C there."""
    from qtulu.evals.tasks import synthetic

    state = {"calls": 0, "stop_at": None}
    real = synthetic.predict

    def predict(lm, examples, **opts):
        state["calls"] += 1
        if state["calls"] == state["stop_at"]:
            raise KeyboardInterrupt
        return real(lm, examples, **opts)

    monkeypatch.setattr(synthetic, "predict", predict)
    return state


def _run(model, tok, synth_dir, out, **kw):
    from qtulu.evals.runner import evaluate

    kw.setdefault("adapters", ["base", "alpha", "beta"])
    return evaluate(model, tok, ["synthetic_upper", "synthetic_successor"], data_dir=synth_dir, out_dir=out,
                    batch_size=4, progress=False, **kw)


def test_interrupted_eval_resumes_per_cell_and_recomputes_only_what_changed(lora_pair, synth_dir, tmp_path,
                                                                             counted, capsys):
    model, tok = lora_pair
    out = tmp_path / "out"
    counted["stop_at"] = 4  # Ctrl-C in the 4th of 6 cells
    with pytest.raises(KeyboardInterrupt, match=r"3 of 6 eval cells complete .*same command again to resume"):
        _run(model, tok, synth_dir, out)
    first = {lab: {t: json.loads((out / lab / t / "metrics.json").read_text()) for t in ("synthetic_upper",)}
             for lab in ("base", "alpha")}
    counted.update(calls=0, stop_at=None)
    res = _run(model, tok, synth_dir, out)
    assert counted["calls"] == 3  # only the cells that were not complete
    assert "3 of 6 cells were complete" in capsys.readouterr().out
    assert res["results"]["alpha"]["synthetic_upper"]["cell"]["key"] == first["alpha"]["synthetic_upper"]["cell"]["key"]
    counted["calls"] = 0
    fresh = _run(model, tok, synth_dir, tmp_path / "fresh", resume=False)
    assert counted["calls"] == 6
    for lab in ("base", "alpha", "beta"):  # read back == computed
        for t in ("synthetic_upper", "synthetic_successor"):
            assert res["results"][lab][t]["score"] == fresh["results"][lab][t]["score"]

    # what changes a cell's key: one adapter's weights (its cells only), an option, the data, the limit
    counted["calls"] = 0
    weight = next(p for n, p in model.named_parameters() if "lora_B.beta" in n)
    saved = weight.detach().clone()
    with torch.no_grad():
        weight.add_(0.5)
    try:
        _run(model, tok, synth_dir, out)
    finally:
        with torch.no_grad():
            weight.copy_(saved)  # the fixture is shared by the session
    assert counted["calls"] == 2  # beta's two cells
    counted["calls"] = 0
    _run(model, tok, synth_dir, out, task_options={"synthetic_upper": {"max_new_tokens": 5}})
    # synthetic_upper for each label, and beta's successor cell: its weights are back to the original,
    # which its cell (last written with the changed weights) no longer matches
    assert counted["calls"] == 4
    counted["calls"] = 0
    _run(model, tok, synth_dir, out, limit=3)
    assert counted["calls"] == 6
    counted["calls"] = 0
    rows = (synth_dir / "successor_test.jsonl").read_text().splitlines()
    (synth_dir / "successor_test.jsonl").write_text("\n".join(rows[:-1]) + "\n")
    _run(model, tok, synth_dir, out, limit=3)
    assert counted["calls"] == 6  # every task's data folder is hashed as a whole (here, one folder)

    # a cell whose metrics were damaged, or written without a key, is recomputed
    counted["calls"] = 0
    (out / "alpha" / "synthetic_upper" / "metrics.json").write_text("{not json")
    _run(model, tok, synth_dir, out, limit=3)
    assert counted["calls"] == 1


def test_cache_dir_serves_another_output_folder(lora_pair, synth_dir, tmp_path, counted):
    model, tok = lora_pair
    cache = tmp_path / "cache"
    _run(model, tok, synth_dir, tmp_path / "a", adapters=["alpha"], cache_dir=cache)
    assert counted["calls"] == 2 and len(list(cache.iterdir())) == 2
    counted["calls"] = 0
    res = _run(model, tok, synth_dir, tmp_path / "b", adapters=["alpha"], cache_dir=cache)
    assert counted["calls"] == 0
    assert (tmp_path / "b" / "alpha" / "synthetic_upper" / "predictions.jsonl").is_file()
    assert res["results"]["alpha"]["synthetic_upper"]["cell"]["key"] in {p.name for p in cache.iterdir()}


def test_quick_and_limit_are_stated_in_results_md(lora_pair, synth_dir, tmp_path):
    model, tok = lora_pair
    res = _run(model, tok, synth_dir, tmp_path / "q", adapters=["alpha"], quick=True)
    assert res["config"]["quick"] is True and res["config"]["limit"] == 5  # quick's default limit
    md = (tmp_path / "q" / "results.md").read_text()
    assert "Quick mode" in md and "Limited run" in md and "--limit 5" in md
    _run(model, tok, synth_dir, tmp_path / "full", adapters=["alpha"])
    md = (tmp_path / "full" / "results.md").read_text()
    assert "Quick mode" not in md and "Limited run" not in md


def test_quick_options_are_declared_by_their_tasks():
    from qtulu.evals.quick import QUICK_OPTIONS, apply_quick, quick_options
    from qtulu.evals.tasks import TASKS, get_task

    modules = {m for m, _ in TASKS.values()}
    assert set(QUICK_OPTIONS) == modules  # every task module has its quick entry (possibly empty)
    for name, (module_name, _) in TASKS.items():
        declared = get_task(name).module.OPTIONS
        missing = set(QUICK_OPTIONS[module_name]) - set(declared)
        assert not missing, (name, missing)
        get_task(name, **quick_options(name))  # valid values for the task
    opts, limit = apply_quick(["bbh", "codex_humaneval"], {"bbh": {"max_new_tokens": 64}}, None)
    assert opts["bbh"]["max_new_tokens"] == 64 and len(opts["bbh"]["subtasks"]) == 3  # the user's option wins
    assert opts["codex_humaneval"]["num_samples"] == 1 and limit == 5


def test_quick_bbh_and_mmlu_subsets_exist_in_the_real_data(eval_data):
    from qtulu.evals.quick import QUICK_OPTIONS

    bbh = {p.stem for p in (eval_data / "bbh" / "bbh").glob("*.json")}
    assert set(QUICK_OPTIONS["bbh"]["subtasks"]) <= bbh
    mmlu = {p.name[: -len("_test.csv")] for p in (eval_data / "mmlu" / "test").glob("*_test.csv")}
    assert set(QUICK_OPTIONS["mmlu"]["subjects"]) <= mmlu


def test_list_tasks_shows_options_defaults_and_quick_values(capsys):
    from qtulu.cli import main
    from qtulu.evals.tasks import TASKS, get_task

    assert main(["eval", "--list-tasks"]) == 0
    out = capsys.readouterr().out
    for name in TASKS:
        for opt, (default, meaning) in get_task(name).module.OPTIONS.items():
            assert f"    {name}.{opt} = " in out and meaning in out, (name, opt)
    assert "bbh.subtasks = None" in out and "[--quick: ['boolean_expressions'" in out
