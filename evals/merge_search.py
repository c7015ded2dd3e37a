"""Merge search: let the suite choose the merge.

Given several adapters loaded on one base, build candidate merges (methods x weight vectors x
densities) with ``qtulu.adapters.merge.combine_adapters``, evaluate each (and each input adapter alone, for
reference) on small slices of the chosen tasks, tabulate, and save the best candidate as an
adapter with ``qtulu.adapters.store.save_adapter`` (its ``qtulu.json`` ``extra.merge_search`` records
the method, weights, density and the slice scores).

The objective is the mean headline score over the tasks (``1 - score`` for tasks where lower is
better, e.g. ToxiGen). The slices are the first ``limit`` examples of each task's evaluation split
(MMLU can use its dev split: ``task_options={"mmlu": {"split": "dev"}}``), so a merge chosen this way
should be reported on the rest of the suite, not on the slice.
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path
from typing import Sequence

from .lm import LM
from qtulu.files import write_json

from .runner import check_requirements, run_task
from .tasks import parse_task_list


def default_grid(method: str, n: int) -> list[list[float]]:
    """Uniform weights, plus for two adapters a lean to each side."""
    if method in ("ties", "dare_ties"):
        grid = [[1.0] * n]
        if n == 2:
            grid += [[1.0, 0.5], [0.5, 1.0]]
    else:
        grid = [[1.0 / n] * n]
        if n == 2:
            grid += [[0.75, 0.25], [0.25, 0.75]]
    return grid


def objective(metrics_by_task: dict) -> float:
    vals = []
    for m in metrics_by_task.values():
        s = m.get("score")
        if s is None or (isinstance(s, float) and math.isnan(s)):
            return float("nan")
        vals.append(1.0 - s if m.get("lower_is_better") else s)
    return sum(vals) / len(vals)


def merge_search(model, tokenizer, adapters: Sequence[str], tasks, *, data_dir, out_dir,
                 methods: Sequence[str] = ("linear", "ties", "dare_linear", "dare_ties", "cat"),
                 weight_grid: Sequence[Sequence[float]] | None = None, densities: Sequence[float] = (0.5,),
                 limit: int | None = 20, batch_size: int = 8, chat_format: str | None = "tulu",
                 task_options: dict | None = None, base_info: dict | None = None, seed: int = 0,
                 include_inputs: bool = True, progress: bool = True, columns: dict[str, str] | None = None,
                 **score_context) -> dict:
    """Evaluate every candidate merge of ``adapters``; save the best to ``out_dir/best``.

    Returns ``{"candidates": [row, ...], "best": row, "best_dir": str}`` where a row is
    ``{"name", "method", "weights", "density", "objective", "scores": {task: score}}``; also
    writes ``out_dir/merge_search.json`` and ``out_dir/merge_search.md``. ``columns``: ``{label: task}``
    (as `evals.runner.evaluate`): scores, folders and ``task_options`` keyed by the label.
    """
    from qtulu.adapters.store import save_adapter, set_active
    from qtulu.adapters.merge import METHODS, combine_adapters

    columns = dict(columns) if columns else {n: n for n in parse_task_list(tasks)}
    names = list(columns)
    task_of = dict(zip(names, parse_task_list(list(columns.values()))))
    check_requirements(list(task_of.values()), judge=score_context.get("judge"), classifier=score_context.get("classifier"),
                       allow_code_execution=score_context.get("allow_code_execution", False))
    adapters = list(adapters)
    if len(adapters) < 2:
        raise ValueError(f"merge search needs at least two adapters, got {adapters}")
    for m in methods:
        if m not in METHODS:
            raise ValueError(f"unknown merge method {m!r}; choose from {METHODS}")
    out_dir = Path(out_dir)
    lm = LM(model, tokenizer, batch_size=batch_size, chat_format=chat_format, progress=False)
    ctx = {"progress": False, **score_context}

    specs = []
    for method in methods:
        grid = [list(w) for w in weight_grid] if weight_grid else default_grid(method, len(adapters))
        dens = list(densities) if method in ("ties", "dare_linear", "dare_ties") else [None]
        for w, d in itertools.product(grid, dens):
            if len(w) != len(adapters):
                raise ValueError(f"weights {w} do not match the {len(adapters)} adapters {adapters}")
            specs.append({"method": method, "weights": [float(x) for x in w], "density": d})

    def evaluate_active(label: str) -> dict:
        return {t: run_task(lm, task_of[t], data_dir=data_dir, out_dir=out_dir / "candidates" / label / t, limit=limit,
                            task_options=(task_options or {}).get(t), score_context=ctx, column=t) for t in names}

    rows = []
    steps = ([("input", a) for a in adapters] if include_inputs else []) + [("candidate", i) for i in range(len(specs))]
    from tqdm.auto import tqdm

    from qtulu.model.dense_cache import dense_weights

    model.eval()
    # one bar over the inputs and the candidates; on a CPU the NF4 base is dequantized once (dense_cache)
    with tqdm(total=len(steps), desc="merge search", unit="model", disable=not progress) as bar, dense_weights(model):
        for kind, x in steps:
            if kind == "input":
                bar.set_description(f"merge search · input {x}")
                set_active(model, x)
                metrics = evaluate_active(f"input_{x}")
                rows.append({"name": f"input_{x}", "method": "input", "weights": None, "density": None,
                             "objective": objective(metrics), "scores": {t: m["score"] for t, m in metrics.items()}})
            else:
                spec = specs[x]
                name = f"cand{x}_{spec['method']}"
                bar.set_description(f"merge search · {name}")
                combine_adapters(model, adapters, spec["method"], spec["weights"], spec["density"], new_name=name,
                                 seed=seed)
                try:
                    set_active(model, name)
                    metrics = evaluate_active(name)
                finally:
                    set_active(model, adapters[0])
                    model.delete_adapter(name)  # keep memory flat: only the winner is rebuilt below
                rows.append({"name": name, **spec, "objective": objective(metrics),
                             "scores": {t: m["score"] for t, m in metrics.items()}})
            bar.update(1)

    merged = [r for r in rows if r["method"] != "input" and not math.isnan(r["objective"])]
    if not merged:
        raise RuntimeError("merge search: no candidate produced a score")
    best = max(merged, key=lambda r: r["objective"])  # first of equals: the order of `methods`
    # rebuild the winner (deterministic for a seed) and save it
    combine_adapters(model, adapters, best["method"], best["weights"], best["density"], new_name=best["name"], seed=seed)
    if base_info is None:
        from qtulu.model.load import base_info as get_base_info

        base_info = get_base_info(model)
    best_dir = save_adapter(model, out_dir / "best", adapter_name=best["name"], base_info=base_info,
                            extra={"merge_search": {"adapters": adapters, "tasks": names, "limit": limit, **best}})
    model.delete_adapter(best["name"])
    result = {"adapters": adapters, "tasks": names, "limit": limit, "candidates": rows, "best": best,
              "best_dir": str(best_dir)}
    write_json(out_dir / "merge_search.json", result)
    (out_dir / "merge_search.md").write_text(search_table(result), encoding="utf-8")
    return result


def search_table(result: dict) -> str:
    tasks = result["tasks"]
    lines = ["| candidate | method | weights | density | " + " | ".join(tasks) + " | objective |",
             "|---|---|---|---|" + "---|" * (len(tasks) + 1)]
    for r in result["candidates"]:
        mark = " **best**" if r["name"] == result["best"]["name"] else ""
        w = "-" if r["weights"] is None else ", ".join(f"{x:g}" for x in r["weights"])
        cells = [f"{100 * r['scores'][t]:.1f}" if r["scores"][t] == r["scores"][t] else "n/a" for t in tasks]
        lines.append(f"| {r['name']}{mark} | {r['method']} | {w} | {r['density'] if r['density'] is not None else '-'} | "
                     + " | ".join(cells) + f" | {100 * r['objective']:.1f} |")
    return "\n".join(lines) + "\n"
