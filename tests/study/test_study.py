"""`qtulu study`: the schema (every key with a meaning, errors naming file and key before any model),
the shipped studies validate, and a 2 x 2 study on the demo's tiny model (2 recipes x 2 tasks, plus
the base and a merge as rows) killed mid-run from the outside, resumed, compared with the evals run
one by one, re-run finished (nothing runs, torch is not even imported), and grown by one recipe and
one task (only their cells run).

The killed study runs in a subprocess (a SIGKILL must hit a real process: ~20 s, most of it the
interpreter importing torch/transformers/trl) and resumes in this one; the rest reads its output
folder, or a copy of it.
Its settings are tiny (20 warm-up steps, 2 optimizer steps per adapter, 4 held-out examples), so
scores are mostly 0: the comparisons are on the predictions themselves, which differ between rows.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from qtulu.study.store import read_log

REPO = Path(__file__).resolve().parents[2]
TASKS = ["synthetic_upper", "synthetic_successor"]

TINY = """\
name: tiny
base:
  demo: {{warmup_steps: 20, warmup_batch: 8, warmup_examples: 32}}
  quantize: nf4
  compute_dtype: float32
synthetic: {{skills: [copy, upper, successor], train_examples: 24, test_examples: 4, seed: 0}}
recipes:
  - recipe: demo
    name: up
    overrides: {{sources.skill.path: "${{out}}/data/upper_train.jsonl", train.max_steps: 2, train.learning_rate: 2.0e-3,
                train.logging_steps: 1}}
  - recipe: demo
    name: succ
    overrides: {{sources.skill.path: "${{out}}/data/successor_train.jsonl", train.max_steps: 2, train.learning_rate: 2.0e-3,
                train.logging_steps: 1}}
{extra_recipes}tasks: [{tasks}]
eval: {{data_dir: "${{out}}/data", base_chat_format: tulu, batch_size: 8}}
merge_search: {{adapters: [up, succ], tasks: [synthetic_upper, synthetic_successor], methods: [linear],
               weights: [[0.5, 0.5]], limit: 2}}
"""
C_RECIPE = """\
  - recipe: demo
    name: up2
    overrides: {sources.skill.path: "${out}/data/upper_train.jsonl", train.max_steps: 2, train.learning_rate: 2.0e-3,
                train.logging_steps: 1}
"""


def tiny_study(path: Path, *, tasks=TASKS, extra_recipes: str = "") -> Path:
    path.write_text(TINY.format(tasks=", ".join(tasks), extra_recipes=extra_recipes))
    return path


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}


def _study_cmd(study: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "qtulu.cli", "study", str(study), "--out", str(out), "--no-progress"]


def _by_pid(out: Path) -> dict[int, list[dict]]:
    runs: dict[int, list[dict]] = {}
    for line in read_log(out):
        runs.setdefault(line["pid"], []).append(line)
    return runs


def _cells(lines, event):
    return {x["cell"] for x in lines if x["event"] == event}


def _mtimes(out: Path) -> dict[str, int]:
    return {str(p.relative_to(out)): p.stat().st_mtime_ns for p in (out / "cells").rglob("*.json")}


# --------------------------------------------------------------------------------------------
# the schema and the shipped studies (no model)


def test_every_study_key_has_a_meaning():
    import dataclasses

    from qtulu.recipe_cli import field_meanings
    from qtulu.study import schema

    classes = [c for c in vars(schema).values() if dataclasses.is_dataclass(c) and c.__module__ == schema.__name__]
    assert len(classes) >= 9
    for cls in classes:
        missing = {f.name for f in dataclasses.fields(cls)} - set(field_meanings(cls))
        assert not missing, f"{cls.__name__}: fields without a meaning comment: {missing}"


def test_paper_study_validates_without_running(tmp_path):
    from qtulu.study.load import load_study
    from qtulu.study.plan import Plan

    study = load_study(REPO / "recipes" / "studies" / "tulu_v1_llama7b.yaml", tmp_path / "out")
    sources = ["superni", "cot", "flan_v2", "dolly", "oasst1", "self_instruct", "unnatural_instructions",
               "stanford_alpaca", "code_alpaca", "gpt4_alpaca", "baize", "sharegpt"]
    assert [r.name for r in study.rows] == sources + ["tulu_v1_human_mix", "tulu_v1_mix"]
    assert study.labels == ["base", *sources, "tulu_v1_human_mix", "tulu_v1_mix", "merge12"]
    assert [c.name for c in study.columns] == ["mmlu", "gsm8k", "bbh", "tydiqa", "codex_humaneval", "alpaca_eval",
                                               "toxigen", "truthfulqa_gen"]
    assert study.average == ["mmlu", "gsm8k", "bbh", "tydiqa", "codex_humaneval", "alpaca_eval"]
    for r in study.rows:  # one base for all: the study's model settings in every recipe
        m = r.recipe.model
        assert (m.base, m.quantize, m.compute_dtype, m.blocksize) == ("huggyllama/llama-7b", "nf4", "bfloat16", 64)
        assert r.recipe.name == r.name and r.recipe.path.endswith(f"recipes/{r.name}.yaml")
    assert study.merge.adapters == sources
    assert study.columns[-1].judge.model == "allenai/truthfulqa-truth-judge-llama2-7B"
    assert study.columns[0].data_dir == (REPO / "data" / "eval").resolve()
    cells = Plan(study).cells()
    assert len(cells) == 14 + 14 + 15 * 8 + 1 + 8  # data, train, (base + 14) x 8 evals, merge, the merge's row
    assert not (tmp_path / "out").exists()


def test_demo_study_validates(tmp_path):
    from qtulu.study.load import load_study

    study = load_study("demo", tmp_path / "out")  # a bare name: recipes/studies/demo.yaml
    assert study.labels == ["base", "upper", "successor", "merge"]
    assert [c.name for c in study.columns] == ["synthetic_upper", "synthetic_successor", "synthetic_copy"]
    assert study.rows[0].recipe.sources[0].path == str(tmp_path / "out" / "data" / "upper_train.jsonl")
    assert study.rows[1].recipe.train.max_steps == 80 and study.base.demo is not None


BAD = [
    ("eval: {data_dir: x, batchsize: 8}", "eval.batchsize: unknown key"),
    ("eval: {data_dir: x, batch_size: '8'}", "eval.batch_size: expected int"),
    ("tasks: [{name: synthetic_upper, options: {skil: upper}}]", "tasks.0 (synthetic_upper): task 'synthetic_upper': "
                                                                 "unknown option 'skil'"),
    ("tasks: [synthetic_uper]", "tasks.0 (synthetic_uper): unknown task"),
    ("overrides: {train.max_stepz: 3}", "recipes.0 (demo): "),
    ("overrides: {model.quantize: null}", "overrides.model.quantize: every recipe shares the study's base: set "
                                          "base.quantize"),
    ("recipes: [{recipe: demo, name: x}, {recipe: demo, name: x}]", "recipes.1.name: row 'x' is already recipes.0"),
    ("recipes: [{recipe: demo, name: a}]", "recipes.0.name: adapter name 'a' is part of peft's 'lora_' prefix"),
    ("recipes: [{recipe: demo, name: base}]", "recipes.0.name"),
    ("merge_search: {adapters: [up, zz]}", "merge_search.adapters.1: 'zz' is not a row"),
    ("average: [mmlu]", "average.0: 'mmlu' is not a task"),
    ("base: {demo: {}, path: /x}", "base: give exactly one of base.path"),
    ("overrides: {data.chat_format: tokenizer}", "recipes.0: row 'up' trains with data.chat_format='tokenizer' but "
                                                 "eval.chat_format is 'tulu'"),
    ("tasks: [synthetic_upper, {name: synthetic_upper}]", "tasks.1: column 'synthetic_upper' is already tasks.0"),
    ("tasks: [{name: reply_loss, column: loss, options: {format: messages, path: a.jsonl, hold_out: 2}}, "
     "{name: reply_loss, column: loss, options: {format: messages, path: b.jsonl, hold_out: 2}}]",
     "tasks.1: column 'loss' is already tasks.0 (reply_loss): give each column of a task its own label"),
    ("tasks: [{name: synthetic_upper, column: 'a/b'}]", "tasks.0.column: 'a/b'"),
]


@pytest.mark.parametrize("change,needle", BAD)
def test_a_bad_study_fails_in_one_line_naming_file_and_key(tmp_path, capsys, change, needle, monkeypatch):
    import yaml

    from qtulu.cli import main

    _no_model(monkeypatch)
    raw = yaml.safe_load(TINY.format(tasks=", ".join(TASKS), extra_recipes=""))
    raw.update(yaml.safe_load(change))
    study = tmp_path / "bad.yaml"
    study.write_text(yaml.safe_dump(raw))
    assert main(["study", str(study), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith(f"qtulu study: error: {study}: "), err
    assert needle in err, err
    assert not (tmp_path / "out").exists()  # nothing written


def _no_model(monkeypatch):
    """Any model load or base build fails the test."""
    import qtulu.model.load
    import qtulu.study.demo_base

    def boom(*a, **k):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(qtulu.model.load, "load_base", boom)
    monkeypatch.setattr(qtulu.study.demo_base, "build_demo_base", boom)


def test_missing_inputs_fail_before_any_model(tmp_path, capsys, monkeypatch):
    from qtulu.cli import main

    _no_model(monkeypatch)
    study = tiny_study(tmp_path / "s.yaml")
    text = study.read_text()
    study.write_text(text.replace('eval: {data_dir: "${out}/data"', f'eval: {{data_dir: "{tmp_path}/nowhere"'))
    assert main(["study", str(study), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert f"tasks.0 (synthetic_upper): eval data folder {tmp_path}/nowhere not found" in err
    assert not (tmp_path / "out").exists()
    study.write_text(text.replace("${out}/data/successor_train.jsonl", f"{tmp_path}/none.jsonl"))
    assert main(["study", str(study), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "recipes.1 (succ): " in err and "none.jsonl" in err and err.count("\n") == 1
    # a skill the synthetic block does not write: found missing once the data is written, still before any model
    study.write_text(text.replace("skills: [copy, upper, successor]", "skills: [copy, upper]"))
    assert main(["study", str(study), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "tasks.1 (synthetic_successor): " in err and "successor_test.jsonl" in err


def test_one_study_per_output_folder(tmp_path, capsys):
    from qtulu.cli import main
    from qtulu.train.runlock import run_lock

    study = tiny_study(tmp_path / "s.yaml")
    with run_lock(tmp_path / "out"):
        assert main(["study", str(study), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "is in use by another qtulu study (pid" in err and "choose another --out" in err


# --------------------------------------------------------------------------------------------
# the 2 x 2 study: killed, resumed, compared, re-run, grown


@pytest.fixture(scope="module")
def killed_and_resumed(tmp_path_factory):
    """Run 1 (a subprocess) is SIGKILLed as soon as the first adapter's cell is recorded; run 2 completes it."""
    root = tmp_path_factory.mktemp("study")
    study, out = tiny_study(root / "tiny.yaml"), root / "out"
    first = subprocess.Popen(_study_cmd(study, out), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=_env(),
                             cwd=root)
    deadline = time.time() + 300
    while not (out / "cells" / "train" / "up.json").exists():
        assert first.poll() is None, first.communicate()[0][-3000:]
        assert time.time() < deadline
        time.sleep(0.02)
    first.send_signal(signal.SIGKILL)
    first.wait()
    before = _mtimes(out)
    adapter_a = (out / "runs" / "up" / "adapter" / "adapter_model.safetensors").stat().st_mtime_ns
    # the resume runs in this process (torch is imported already: ~10 s less than a third interpreter)
    import contextlib
    import io

    from qtulu.cli import main

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(_study_cmd(study, out)[3:]) == 0
    return {"study": study, "out": out, "first_pid": first.pid, "before": before,
            "adapter_a": adapter_a, "stdout": buf.getvalue()}


@pytest.mark.slow  # its fixture: ~30 s (a subprocess importing torch, then the resume in this process)
def test_a_killed_study_resumes_without_redoing_finished_cells(killed_and_resumed):
    k = killed_and_resumed
    out = k["out"]
    runs = _by_pid(out)
    assert len(runs) == 2
    first, second = runs[k["first_pid"]], next(x for p, x in runs.items() if p != k["first_pid"])
    done_first = _cells(first, "done")
    assert {"base", "data/up", "data/succ", "train/up"} <= done_first
    assert not _cells(second, "run") & done_first  # nothing finished in run 1 ran again in run 2
    assert _cells(second, "run") | _cells(second, "reused") | done_first >= {
        "train/succ", "merge", *(f"eval/{r}/{t}" for r in ("base", "up", "succ", "merge") for t in TASKS)}
    after = _mtimes(out)
    for cell, mtime in k["before"].items():  # the records of finished cells were not rewritten
        assert after[cell] == mtime, cell
    assert (out / "runs" / "up" / "adapter" / "adapter_model.safetensors").stat().st_mtime_ns == k["adapter_a"]
    res = json.loads((out / "results.json").read_text())
    assert list(res["table"]) == ["base", "up", "succ", "merge"] and res["columns"] == TASKS
    assert all(v is not None for row in res["table"].values() for v in row.values())
    assert "study 'tiny': scores x100" in k["stdout"] and (out / "heatmap.png").stat().st_size > 5000
    assert "| row | synthetic_upper | synthetic_successor | average |" in (out / "results.md").read_text()


def _predictions(path: Path) -> dict[str, str]:
    return {r["id"]: r["output"] for r in map(json.loads, path.read_text().splitlines())}


def test_the_table_equals_the_evals_run_one_by_one(killed_and_resumed, tmp_path, capsys):
    from qtulu.cli import main

    out = killed_and_resumed["out"]
    res = json.loads((out / "results.json").read_text())
    adapters = {"up": out / "runs" / "up" / "adapter", "succ": out / "runs" / "succ" / "adapter",
                "merge": out / "merge" / "best"}
    # the base row: `qtulu eval --model DIR` (no adapter) labels its row DIR's name, here "base"
    outputs = {}
    for row in res["rows"]:
        for task in TASKS:  # `qtulu eval` on one row and one task at a time, each on a freshly loaded base
            one = tmp_path / f"{row}-{task}"
            argv = ["eval", "--tasks", task, "--data-dir", str(out / "data"), "--out", str(one), "--batch-size", "8",
                    "--chat-format", "tulu", "--no-progress", "--no-resume"]
            if row == "base":
                argv += ["--model", str(out / "base"), "--dtype", "float32"]
            else:
                argv += ["--model", str(out / "base"), "--adapter", f"{row}={adapters[row]}"]
            assert main(argv) == 0, capsys.readouterr().err
            metrics = json.loads((one / row / task / "metrics.json").read_text())
            assert metrics["score"] == res["table"][row][task], (row, task)
            outputs[row, task] = _predictions(one / row / task / "predictions.jsonl")
            assert outputs[row, task] == _predictions(out / "eval" / row / task / "predictions.jsonl"), (row, task)
    for row in res["rows"][1:]:  # the rows really are different models (a wrong adapter would show)
        assert any(outputs[row, t] != outputs["base", t] for t in TASKS), row
    assert outputs["up", "synthetic_upper"] != outputs["succ", "synthetic_upper"] or \
        outputs["up", "synthetic_successor"] != outputs["succ", "synthetic_successor"]


def test_a_finished_study_rerun_runs_nothing_and_loads_nothing(killed_and_resumed):
    k = killed_and_resumed
    out = k["out"]
    before = _mtimes(out)
    results_mtime = (out / "results.json").stat().st_mtime_ns
    code = ("import sys; from qtulu.cli import main; rc = main(sys.argv[1:]); "
            "assert 'torch' not in sys.modules, 'torch was imported'; sys.exit(rc)")
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code, "study", str(k["study"]), "--out", str(out), "--no-progress"],
                          capture_output=True, text=True, env=_env(), timeout=120)
    took = time.perf_counter() - t0
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "nothing to train or evaluate" in proc.stdout and "study 'tiny': scores x100" in proc.stdout
    print(f"finished study re-run: {took:.2f}s")
    last = _by_pid(out)[max(_by_pid(out), key=lambda p: _by_pid(out)[p][0]["t"])]
    assert [x["event"] for x in last] == ["start", "end"] and last[0]["complete"] == last[0]["total"]
    assert _mtimes(out) == before and (out / "results.json").stat().st_mtime_ns == results_mtime


def test_a_new_recipe_and_task_run_only_their_cells_in_a_moved_folder(killed_and_resumed, tmp_path, capsys,
                                                                      monkeypatch):
    from qtulu.cli import main
    from qtulu.study.runner import StudyRun

    moved = tmp_path / "moved"
    shutil.copytree(killed_and_resumed["out"], moved)  # keys hold no absolute path: still complete
    assert main(["study", str(killed_and_resumed["study"]), "--out", str(moved), "--plan"]) == 0
    assert "to run" not in capsys.readouterr().out

    grown = tiny_study(tmp_path / "grown.yaml", tasks=[*TASKS, "synthetic_copy"], extra_recipes=C_RECIPE)
    start = len(read_log(moved))
    real_eval = StudyRun._eval

    def stop(self, label, col):  # Ctrl-C in the first eval cell of the grown study
        raise KeyboardInterrupt

    monkeypatch.setattr(StudyRun, "_eval", stop)
    assert main(["study", str(grown), "--out", str(moved), "--no-progress"]) == 130
    err = capsys.readouterr().err
    # the base, data and train of up, succ, up2, (base, up, succ, up2, merge) x 3 tasks, the merge; complete:
    # all but data/up2, train/up2 and the 9 new evals, and the first two ran before Ctrl-C
    assert err.strip().splitlines()[-1] == (f"qtulu study: interrupted: 16 of 23 cells complete in {moved}; "
                                            "run the same command again to resume"), err
    monkeypatch.setattr(StudyRun, "_eval", real_eval)
    assert main(["study", str(grown), "--out", str(moved), "--no-progress"]) == 0
    ran = [x["cell"] for x in read_log(moved)[start:] if x["event"] == "run"]
    new_evals = {f"eval/up2/{t}" for t in TASKS} | {f"eval/{r}/synthetic_copy" for r in ("base", "up", "succ", "up2", "merge")}
    assert ran[:3] == ["data/up2", "train/up2", "eval/base/synthetic_copy"]  # the third was interrupted
    assert sorted(ran[3:]) == sorted(new_evals)
    res = json.loads((moved / "results.json").read_text())
    assert list(res["table"]) == ["base", "up", "succ", "up2", "merge"]
    # up2 is up's recipe under another name: the same adapter (training is deterministic, so a cell
    # killed mid-training and re-run gives the table an uninterrupted run gives) and the same row
    assert (moved / "runs" / "up2" / "adapter" / "adapter_model.safetensors").read_bytes() == \
        (moved / "runs" / "up" / "adapter" / "adapter_model.safetensors").read_bytes()
    assert res["table"]["up2"] == res["table"]["up"]
    assert _predictions(moved / "eval" / "up2" / "synthetic_upper" / "predictions.jsonl") == \
        _predictions(moved / "eval" / "up" / "synthetic_upper" / "predictions.jsonl")


def test_reply_loss_columns_of_held_out_rows_run_under_their_labels(killed_and_resumed, tmp_path, capsys):
    """Two reply_loss columns (one task, two sources: the skills' test splits, never trained on) and
    a merge chosen on one of them: only their cells and the merge run; each is keyed, stored,
    tabulated and merged under its label."""
    from qtulu.cli import main
    from qtulu.study.load import load_study

    moved = tmp_path / "moved"
    shutil.copytree(killed_and_resumed["out"], moved)
    up = "{name: reply_loss, column: up_loss, options: {format: messages, path: upper_test.jsonl, hold_out: 3}}"
    succ = ("{name: reply_loss, column: succ_loss, options: {format: messages, path: ./succ.jsonl, hold_out: 0.5, "
            "max_seq_len: 32}}")
    (tmp_path / "succ.jsonl").write_bytes((moved / "data" / "successor_test.jsonl").read_bytes())
    grown = tiny_study(tmp_path / "grown.yaml", tasks=[*TASKS, up, succ])
    grown.write_text(grown.read_text().replace("tasks: [synthetic_upper, synthetic_successor], methods",
                                               "tasks: [synthetic_upper, up_loss], methods"))
    study = load_study(grown, moved)
    assert [(c.name, c.task) for c in study.columns][2:] == [("up_loss", "reply_loss"), ("succ_loss", "reply_loss")]
    assert study.columns[3].options["path"] == str(tmp_path / "succ.jsonl")  # ./ is the study file's folder
    start = len(read_log(moved))
    assert main(["study", str(grown), "--out", str(moved), "--no-progress"]) == 0
    ran = {x["cell"] for x in read_log(moved)[start:] if x["event"] == "run"}
    new = {f"eval/{r}/{c}" for r in ("base", "up", "succ") for c in ("up_loss", "succ_loss")}
    assert new | {"merge"} <= ran and not {c for c in ran if c.startswith(("data/", "train/"))}
    res = json.loads((moved / "results.json").read_text())
    assert res["columns"] == [*TASKS, "up_loss", "succ_loss"]
    assert res["tasks"]["up_loss"]["task"] == "reply_loss" and "task" not in res["tasks"]["synthetic_upper"]
    for row in ("base", "up", "succ", "merge"):
        a, b = (json.loads((moved / "eval" / row / c / "metrics.json").read_text()) for c in ("up_loss", "succ_loss"))
        assert a["column"] == "up_loss" and a["task"] == "reply_loss" and a["n"] == 3
        assert b["options"]["max_seq_len"] == 32 and a["loss"] != b["loss"]
        assert res["table"][row]["up_loss"] == pytest.approx(math.exp(-a["loss"]))
    search = json.loads((moved / "merge" / "merge_search.json").read_text())
    assert search["tasks"] == ["synthetic_upper", "up_loss"] and "up_loss" in search["best"]["scores"]
    assert (moved / "merge" / "candidates" / "input_up" / "up_loss" / "metrics.json").is_file()
    capsys.readouterr()
    assert main(["study", str(grown), "--out", str(moved), "--plan"]) == 0
    assert "to run" not in capsys.readouterr().out


def test_the_readme_study_example_loads(tmp_path):
    import re

    from qtulu.study.load import load_study

    text = (REPO / "README.md").read_text()
    block = re.search(r"A STUDY\.yaml .*?```yaml\n(.*?)```", text, re.S).group(1)
    (tmp_path / "s.yaml").write_text(block)
    study = load_study(tmp_path / "s.yaml", tmp_path / "out")
    assert study.labels == ["base", "dolly", "sharegpt_1k", "merge"]
    assert study.rows[1].recipe.sources[0].count == 1000 and study.columns[1].options == {"subtasks": ["navigate", "snarks"]}


def test_a_bad_training_row_stops_the_study_before_the_base_loads(tmp_path, capsys, monkeypatch):
    import qtulu.model.load
    from qtulu.cli import main

    def boom(*a, **k):
        raise AssertionError("the base was loaded")

    monkeypatch.setattr(qtulu.model.load, "load_base", boom)
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n'
                    '{"messages": [{"role": "user", "content": "hi"}\n')
    study = tiny_study(tmp_path / "s.yaml")
    study.write_text(study.read_text().replace("${out}/data/successor_train.jsonl", str(rows)))
    assert main(["study", str(study), "--out", str(tmp_path / "out"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("qtulu study: error: cell data/succ: ") and f"{rows}:2" in err, err
    assert err.endswith(f"(2 of 14 cells complete in {tmp_path / 'out'})"), err  # the base and data/up
    assert (tmp_path / "out" / "cells" / "data" / "up.json").is_file()  # what was done is kept


def test_a_kill_between_the_record_and_its_log_line_is_recovered_on_the_next_start(tmp_path):
    """The record is the commit point: a run killed after writing it but before its "done" line (the
    race a SIGKILL can hit) gets that line back, with the killed run's pid, when the next run starts;
    a line torn mid-append is ended, not glued to the next one."""
    from qtulu.study.store import Records

    rec = Records(tmp_path)
    rec.log("run", "train/a")
    rec.write("train/a", "k1", {}, {}, 1.0)
    rec.log("done", "train/a", key="k1")
    rec.write("train/b", "k2", {}, {}, 2.0)  # killed here: record written, "done" not logged
    with open(tmp_path / "log.jsonl", "a") as f:
        f.write('{"t": 1, "pid": 1, "event": "ru')  # and a line torn by the kill
    assert rec.recover() == 1
    assert rec.recover() == 0  # idempotent
    done = [x for x in read_log(tmp_path) if x["event"] == "done"]
    assert [(x["cell"], x["key"], x["pid"]) for x in done] == [("train/a", "k1", os.getpid()),
                                                                ("train/b", "k2", os.getpid())]
    assert done[1]["recovered"] is True and done[1]["seconds"] == 2.0
    rec.write("train/a", "k3", {}, {}, 1.0)  # the cell re-ran with another key: its new record needs its line
    assert rec.recover() == 1
