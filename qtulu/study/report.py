"""The study's table, as the paper prints it: rows = base, adapters (and the merge), columns = tasks.

``OUT/results.json``::

    {"table": {ROW: {TASK: score}},            # headline scores in [0, 1] (None: cell missing)
     "average": {ROW: mean},                   # over `average` (all tasks), lower-is-better ones as 1 - score
     "percent_of_best": {ROW: {TASK|"average": %}},   # of the best row in that column
     "best": {TASK: [ROW, ...]},               # the best adapter per task (ties listed), only where it
                                               # beats the base (none if none does, or all score 0)
     "rows": [...], "columns": [...], "tasks": {TASK: {"metric", "lower_is_better", "version", "n"}},
                                               # TASK: a column's label ("task": its task when they differ)
     "merge": {...} | null, "study": {...}, "cells_digest": ...}

``OUT/results.md`` (the same as markdown, with each task's profile, subset and comparability) and
``OUT/heatmap.png`` (% of the best in the column, each cell annotated with its score).
A finished study re-run rewrites none of them when no cell changed (``cells_digest``).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from qtulu.files import atomic_write, atomic_write_text
from qtulu.study.store import digest, write_json_atomic


def _num(x) -> float | None:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else float(x)


def collect(plan) -> dict:
    """The results of every complete eval cell, arranged as the table."""
    study = plan.study
    rows, cols = study.labels, [c.name for c in study.columns]
    table: dict[str, dict[str, float | None]] = {}
    metrics: dict[str, dict[str, dict]] = {}
    keys = []
    for label in rows:
        table[label], metrics[label] = {}, {}
        for c in study.columns:
            m = plan.eval_complete(label, c)
            table[label][c.name] = _num(m.get("score")) if m else None
            if m:
                metrics[label][c.name] = m
            rec = plan.records.read(f"eval/{label}/{c.name}") if m else None
            keys.append([label, c.name, rec and rec.get("key")])
    tasks = {}
    for c in study.columns:
        t = c.name
        m = next((metrics[lab][t] for lab in rows if t in metrics[lab]), {})
        tasks[t] = {"metric": m.get("metric"), "lower_is_better": bool(m.get("lower_is_better")),
                    "version": m.get("version"), "n": m.get("n"), **({"task": c.task} if c.task != t else {})}
    oriented = {lab: {t: (None if table[lab][t] is None else
                          (1.0 - table[lab][t] if tasks[t]["lower_is_better"] else table[lab][t])) for t in cols}
                for lab in rows}
    over = study.average
    average = {lab: (None if any(oriented[lab][t] is None for t in over) else
                     sum(oriented[lab][t] for t in over) / len(over)) for lab in rows}
    pct: dict[str, dict[str, float | None]] = {lab: {} for lab in rows}
    for t in [*cols, "average"]:
        vals = {lab: (average[lab] if t == "average" else oriented[lab][t]) for lab in rows}
        top = max((v for v in vals.values() if v is not None), default=None)
        for lab in rows:
            v = vals[lab]
            pct[lab][t] = None if v is None or not top else round(100.0 * v / top, 1)
    adapters = [lab for lab in rows if lab != "base"]
    best = {}
    for t in cols:
        vals = {lab: oriented[lab][t] for lab in adapters if oriented[lab][t] is not None}
        top = max(vals.values(), default=None)
        base = oriented["base"][t] if "base" in oriented else None
        # an adapter that scores 5 where the base scores 100 is the best of the adapters, not a best
        beats = top is not None and top > 0 and (base is None or top > base)
        best[t] = [lab for lab, v in vals.items() if beats and v == top]
    merge = None
    if study.merge:
        rec = plan.records.read("merge")
        if rec:
            chosen = (rec.get("result") or {}).get("best", {})
            merge = {"name": study.merge.name, "adapters": study.merge.adapters, "tasks": study.merge.tasks,
                     "limit": study.merge.spec.limit, "candidate": chosen.get("name"),
                     **{k: chosen.get(k) for k in ("method", "weights", "density", "objective", "scores")}}
    return {
        "table": table, "average": average, "percent_of_best": pct, "best": best, "rows": rows, "columns": cols,
        "tasks": tasks, "merge": merge, "average_over": over,
        "study": {"name": study.name, "file": str(study.file), "description": study.spec.description,
                  "base": study.base_path, "profile": study.eval.profile, "limit": study.limit,
                  "quick": study.eval.quick},
        "cells_digest": digest([keys, _report_code()]),
        "_metrics": metrics,
    }


def _report_code() -> str:
    """This module's SHA-256: a new report format rewrites the files of a finished study."""
    import hashlib

    return hashlib.sha256(Path(__file__).read_bytes()).hexdigest()


def _f(x, width=0) -> str:
    return f"{'n/a' if x is None else f'{100 * x:.1f}':>{width}}"


def _header(res: dict, t: str) -> str:
    """``gsm8k (EM)``: the task and its headline metric where the paper names one (evals.report.HEADLINE)."""
    from qtulu.evals.report import HEADLINE

    lower = " ↓" if res["tasks"][t]["lower_is_better"] else ""
    task = res["tasks"][t].get("task", t)  # a labelled column: its task's headline
    return f"{t} ({HEADLINE[task]}{lower})" if task in HEADLINE else f"{t}{lower}"


def markdown(res: dict) -> str:
    from qtulu.evals.report import run_notes, settings_table

    rows, cols = res["rows"], res["columns"]
    s = res["study"]
    lines = [f"# Study `{s['name']}`", ""]
    if s["description"]:
        lines += [s["description"], ""]
    lines += [f"Base: `{s['base']}`. Rows: the base (adapters disabled) and one adapter per recipe"
              + (" and the merge chosen by the suite" if res["merge"] else "")
              + ", all on one loaded base. Scores ×100; **bold**: the best in the column. ↓: lower is better "
              "(counted as 100 − x in the average and the percentages)."
              + ("" if res["average_over"] == cols else f" The average is over {', '.join(res['average_over'])}."),
              ""]
    lines.append("| row | " + " | ".join(_header(res, t) for t in cols) + " | average |")
    lines.append("|---|" + "---:|" * (len(cols) + 1))
    for lab in rows:
        cells = []
        for t in [*cols, "average"]:
            v = res["average"][lab] if t == "average" else res["table"][lab][t]
            best = res["percent_of_best"][lab][t] == 100.0
            cells.append(f"**{_f(v)}**" if best else _f(v))
        lines.append(f"| {lab} | " + " | ".join(cells) + " |")
    lines += ["", "% of the best in the column:", ""]
    lines.append("| row | " + " | ".join(cols) + " | average |")
    lines.append("|---|" + "---:|" * (len(cols) + 1))
    for lab in rows:
        p = res["percent_of_best"][lab]
        lines.append(f"| {lab} | " + " | ".join("n/a" if p[t] is None else f"{p[t]:.0f}%" for t in [*cols, "average"])
                     + " |")
    lines += ["", "Best adapter per task (one that beats the base): " + "; ".join(
        f"{t}: {_best(res, t)}" for t in cols) + "."]
    if res["merge"]:
        m = res["merge"]
        lines += ["", f"Merge `{m['name']}` (candidate {m['candidate']}): {m.get('method')} of {', '.join(m['adapters'])} (weights "
                  f"{m.get('weights')}, density {m.get('density')}), chosen by the mean score on the first "
                  f"{m['limit']} examples per task of {', '.join(m['tasks'])}: those examples are in its row's "
                  "scores too (see OUT/merge/merge_search.md)."]
    metrics = res["_metrics"]
    shaped = {"results": metrics, "versions": {t: res["tasks"][t]["version"] for t in cols},
              "config": {"quick": s["quick"], "limit": s["limit"]}}
    return "\n".join(lines) + "\n" + run_notes(shaped) + settings_table(shaped)


def text_table(res: dict) -> str:
    """The table as `qtulu study` prints it."""
    rows, cols = res["rows"], res["columns"]
    w0 = max(len("row"), *(len(r) for r in rows)) + 2
    widths = [max(len(t), 7) + 2 for t in cols] + [9]
    out = [f"study {res['study']['name']!r}: scores x100 (* best in the column)"]
    out.append(f"{'row':<{w0}}" + "".join(f"{t:>{w}}" for t, w in zip([*cols, "average"], widths)))
    out.append("-" * (w0 + sum(widths)))
    for lab in rows:
        line = f"{lab:<{w0}}"
        for t, w in zip([*cols, "average"], widths):
            v = res["average"][lab] if t == "average" else res["table"][lab][t]
            mark = "*" if res["percent_of_best"][lab][t] == 100.0 else " "
            line += f"{_f(v, w - 1)}{mark}"
        out.append(line)
    out.append("% of the best in the column")
    for lab in rows:
        p = res["percent_of_best"][lab]
        out.append(f"{lab:<{w0}}" + "".join(f"{'n/a' if p[t] is None else f'{p[t]:.0f}%':>{w - 1}} "
                                             for t, w in zip([*cols, "average"], widths)))
    out.append("best adapter per task: " + "; ".join(f"{t}: {_best(res, t)}" for t in cols))
    return "\n".join(out)


def _best(res: dict, t: str) -> str:
    """The task's best adapters, or why there is none (the base scores higher, or nothing scores)."""
    if res["best"][t]:
        return ", ".join(res["best"][t])
    base = (res["table"].get("base") or {}).get(t)
    return f"none beats the base ({_f(base)})" if base is not None else "n/a"


def heatmap(res: dict, path: Path) -> Path:
    """Rows x (tasks + average), colour = % of the best in the column, text = score x 100."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, cols = res["rows"], [*res["columns"], "average"]
    grid = [[res["percent_of_best"][lab][t] if res["percent_of_best"][lab][t] is not None else float("nan")
             for t in cols] for lab in rows]
    fig, ax = plt.subplots(figsize=(2.2 + 1.25 * len(cols), 1.0 + 0.42 * len(rows)), dpi=100)
    im = ax.imshow(grid, cmap="YlGn", vmin=0, vmax=100, aspect="auto")
    for i, lab in enumerate(rows):
        for j, t in enumerate(cols):
            v = res["average"][lab] if t == "average" else res["table"][lab][t]
            ax.text(j, i, _f(v), ha="center", va="center", fontsize=9,
                    color="white" if (grid[i][j] == grid[i][j] and grid[i][j] > 70) else "black")
    ax.set_xticks(range(len(cols)), [c.replace("_", "_\u200b") for c in cols], fontsize=8)
    ax.set_yticks(range(len(rows)), rows, fontsize=9)
    ax.set_title(f"study {res['study']['name']}: score x100, colour = % of the best in the column", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.04, pad=0.02).set_label("% of the best", fontsize=8)
    fig.subplots_adjust(left=0.16, right=0.92, bottom=0.14, top=0.88)
    atomic_write(path, fig.savefig)
    plt.close(fig)
    return path


def write_results(plan, *, progress: bool = True) -> dict:
    """Write results.json, results.md and heatmap.png (unless they already hold these cells)."""
    out = plan.out
    res = collect(plan)
    metrics = res.pop("_metrics")
    paths = [out / "results.json", out / "results.md", out / "heatmap.png"]
    try:
        old = json.loads(paths[0].read_text(encoding="utf-8"))
    except (OSError, ValueError):
        old = None
    if old is not None and old.get("cells_digest") == res["cells_digest"] and old.get("study") == res["study"] \
            and all(p.is_file() for p in paths):
        return old
    atomic_write_text(paths[1], markdown({**res, "_metrics": metrics}))
    heatmap(res, paths[2])
    write_json_atomic(paths[0], res)  # last: it marks the three as written
    return res
