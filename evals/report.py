"""results.json, a markdown table (tasks x models/adapters) and a PNG bar chart of the headline scores."""

from __future__ import annotations

import json
import math
from pathlib import Path

from qtulu.files import atomic_write, atomic_write_text

HEADLINE = {  # what "score" means per task, for the table's row labels
    "mmlu": "acc", "mmlu_5shot": "acc", "gsm8k": "EM", "gsm8k_direct": "EM", "bbh": "EM", "bbh_direct": "EM",
    "tydiqa": "F1", "tydiqa_nocontext": "F1", "codex_humaneval": "pass@10", "codex_humaneval_t01": "pass@1",
    "alpaca_eval": "win %", "toxigen": "% toxic (lower better)", "truthfulqa_mc": "MC2",
    "truthfulqa_gen": "% true+info",
}


def _fmt(x) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return f"{100 * x:.1f}"


def markdown_table(results: dict) -> str:
    """Rows: tasks (with version and metric); columns: labels; cells: headline score x 100."""
    labels = list(results["results"])
    tasks = list(results.get("versions") or {t for lab in labels for t in results["results"][lab]})
    lines = ["| task | " + " | ".join(labels) + " |", "|---|" + "---|" * len(labels)]
    for t in tasks:
        ver = results.get("versions", {}).get(t, "?")
        cells = [_fmt(results["results"][lab].get(t, {}).get("score")) for lab in labels]
        lines.append(f"| {t} v{ver} ({HEADLINE.get(t, 'score')}) | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n" + run_notes(results) + settings_table(results) + _isolation_note(results)


def settings_table(results: dict) -> str:
    """Per task: profile, subset (n and seed), metric, and whether the numbers are comparable to the
    paper's table (from the first label that ran the task)."""
    rows = []
    for t in results.get("versions") or {}:
        m = next((r[t] for r in results["results"].values() if isinstance(r.get(t), dict) and "profile" in r[t]), None)
        if m is None:
            continue
        comparable = "yes" if m.get("comparable") else m.get("comparability", "no")
        rows.append(f"| {t} | {m['profile']} | {m.get('subset', '?')} (n={m.get('n', '?')}) | {m.get('metric', '?')} | "
                    f"{comparable} |")
    if not rows:
        return ""
    head = ["", "| task | profile | subset | metric | comparable to the paper's table |", "|---|---|---|---|---|"]
    return "\n".join(head + rows) + "\n" + _subset_order_note(results)


SUBSET_ORDER_NOTE = (
    "Subset order: qtulu draws the BBH and ToxiGen subsets (seeded) taking the task/group files in sorted "
    "order, and TyDi QA's languages in sorted order; open-instruct took the files in `glob` order (the file "
    "system's listing, which depends on the machine) and the languages in `set` order (which depends on "
    "PYTHONHASHSEED), so its samples equal qtulu's only where those orders were sorted.")


def _subset_order_note(results: dict) -> str:
    """The subset order rule, where a task whose sample depends on the file order was run."""
    tasks = results.get("versions") or {}
    return f"\n{SUBSET_ORDER_NOTE}\n" if any(t.startswith(("bbh", "toxigen", "tydiqa")) for t in tasks) else ""


def _isolation_note(results: dict) -> str:
    """How model-written code was run (tasks whose metrics record the sandbox's ``isolation``)."""
    seen: dict[str, list[str]] = {}
    for lab, tasks in results["results"].items():
        for t, m in tasks.items():
            iso = m.get("isolation") if isinstance(m, dict) else None
            if iso:
                if iso.get("level") == "full":
                    what = (f"isolated ({', '.join(iso.get('namespaces', []))} namespaces; {iso.get('filesystem')}; "
                            f"{iso.get('uid')}; memory: {iso.get('memory')})")
                else:
                    what = f"NOT isolated (--unsafe-no-isolation: {iso.get('reason', '')})"
                seen.setdefault(what, []).append(f"{lab}/{t}")
    return "".join(f"\nCode execution ({', '.join(where)}): {what}\n" for what, where in seen.items())


def run_notes(results: dict) -> str:
    """What makes these numbers partial (``--limit``, ``--quick``), said under the table."""
    cfg = results.get("config") or {}
    notes = []
    if cfg.get("quick"):
        notes.append("**Quick mode** (`--quick`): a few subtasks/subjects, short generations, one sample per "
                     "problem; a smoke run, not comparable to full-suite numbers.")
    if cfg.get("limit") is not None:
        notes.append(f"**Limited run** (`--limit {cfg['limit']}`): at most {cfg['limit']} examples per "
                     "subject/subtask/language/group; not comparable to full-suite numbers.")
    return "".join(f"\n{n}\n" for n in notes)


def bar_chart(results: dict, path: Path) -> Path:
    """Grouped bars: one group per task, one bar per label (scores x 100), each labelled with its
    value; a score of 0 is drawn as a sliver on the axis (a bar of height 0 is invisible, and reads
    as "missing"), a missing score as "n/a" with no bar."""
    fig = chart_figure(results)
    import matplotlib.pyplot as plt

    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120))
    plt.close(fig)
    return path


def chart_figure(results: dict):
    """The figure `bar_chart` saves (its bars' heights and value labels are what a reader sees)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(results["results"])
    tasks = list(results.get("versions") or {})
    width = 0.8 / max(len(labels), 1)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.2 * len(tasks) * max(1, len(labels)) ** 0.5), 4.0))
    scores = {lab: [results["results"][lab].get(t, {}).get("score") for t in tasks] for lab in labels}
    scores = {lab: [None if s is None or (isinstance(s, float) and math.isnan(s)) else 100 * s for s in row]
              for lab, row in scores.items()}
    top = max([100.0, *(v for row in scores.values() for v in row if v is not None)])
    sliver = top * 0.01  # visible on the axis, far below any score it could be mistaken for
    many = len(labels) * len(tasks) > 12
    for i, lab in enumerate(labels):
        vals = scores[lab]
        bars = ax.bar([j + i * width for j in range(len(tasks))],
                      [0.0 if v is None else max(v, sliver) for v in vals], width, label=lab)
        ax.bar_label(bars, labels=["n/a" if v is None else f"{v:.1f}" for v in vals], padding=2,
                     fontsize=6 if many else 7, rotation=90 if many else 0)
    ax.set_ylim(0, top * (1.22 if many else 1.12))  # room for the labels above a full bar
    ax.set_xticks([j + width * (len(labels) - 1) / 2 for j in range(len(tasks))])
    ax.set_xticklabels(tasks, rotation=30, ha="right")
    ax.set_ylabel("score (x100)")
    ax.set_title("qtulu eval")
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.0, 1.0))  # outside: it hid bars
    fig.tight_layout()
    return fig


def write_report(results: dict, out_dir) -> dict[str, Path]:
    """Write results.json, results.md and results.png into ``out_dir``; returns their paths."""
    from qtulu.files import write_json

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "results.json", "markdown": out_dir / "results.md", "chart": out_dir / "results.png"}
    write_json(paths["json"], results)
    atomic_write_text(paths["markdown"], markdown_table(results))
    bar_chart(results, paths["chart"])
    return paths


def load_results(path) -> dict:
    return json.loads(Path(path).read_text(encoding="utf-8"))
