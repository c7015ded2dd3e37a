"""``qtulu study STUDY.yaml``: the Tülu paper's experiment as one resumable command.

One base, one adapter per recipe trained on it, the base and every adapter (and optionally the
merge the suite chooses) evaluated on every task with the adapters swapped on one loaded base, and
the paper's table: rows = adapters, columns = benchmarks, the average, "% of the best in the
column", a heatmap. Every cell (a recipe's data, its adapter, one (row, task) score, the merge) is
keyed by the hash of what produced it, so a re-run after a crash, or after adding a recipe or a
task, runs only the missing cells, and a finished study re-run runs nothing.

Modules: `schema` (the STUDY.yaml dataclasses), `load` (the file resolved: recipes, tasks),
`plan` (cells and keys, from files only), `store` (records, log, content hashes), `demo_base`
(the CPU study's in-process base and synthetic data), `runner` (runs the missing cells),
`report` (results.json/md, heatmap), `cli`.

    from qtulu.study import run_study
    results = run_study("recipes/studies/demo.yaml", "study_out")
    results["table"]["upper"]["synthetic_upper"]
"""

from __future__ import annotations


def run_study(path, out_dir=None, *, progress: bool = True, plan_only: bool = False) -> dict:
    """See `qtulu.study.runner.run_study`."""
    from qtulu.study.runner import run_study as _run

    return _run(path, out_dir, progress=progress, plan_only=plan_only)
