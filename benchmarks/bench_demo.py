"""How long `qtulu demo` takes, phase by phase: wall and CPU seconds (user + sys).

    python benchmarks/bench_demo.py                 # one run on the machine as it is
    python benchmarks/bench_demo.py --busy 1        # with one busy-looping process alongside
    python benchmarks/bench_demo.py --repeat 3      # the median of three runs

Runs ``qtulu demo`` in a fresh process (imports included, as a user runs it), reads the per-phase
times the demo records in ``report.json``, and prints a table and a final JSON line. "startup"
is the process's time outside the demo's own phases (interpreter start, imports of torch,
transformers, peft, trl). CPU seconds are the guide while other work shares the machine (they do
not grow with the wait for a core); wall seconds are the claim, taken on a quiet machine.
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
from pathlib import Path

from qtulu.bench import harness


def measure(repeat: int, busy: int, extra: list[str]) -> dict:
    """``repeat`` runs of ``qtulu demo`` in child processes, with ``busy`` spinning processes alongside."""
    runs = []
    with harness.busy(busy):
        for i in range(repeat):
            with tempfile.TemporaryDirectory(prefix="qtulu-bench-demo-") as tmp:
                out = Path(tmp) / "demo_out"
                r = harness.run_timed([sys.executable, "-m", "qtulu.cli", "demo", "--out", str(out),
                                       "--no-progress", *extra])
                r["report"] = json.loads((out / "report.json").read_text())
                runs.append(r)
                print(f"run {i + 1}/{repeat}: {r['wall']:.1f}s wall, {r['cpu']:.1f}s CPU", file=sys.stderr, flush=True)
    return summarize(runs, busy)


def summarize(runs: list[dict], busy: int) -> dict:
    """Median per phase over ``runs``; "startup" = process time outside the demo's phases."""
    phases: dict[str, dict[str, list[float]]] = {}
    for r in runs:
        times = dict(r["report"]["phases"])
        total = times.pop("total")
        times["startup"] = {"wall": r["wall"] - total["wall"], "cpu": r["cpu"] - total["cpu"]}
        times["process"] = {"wall": r["wall"], "cpu": r["cpu"]}
        for name, t in times.items():
            slot = phases.setdefault(name, {"wall": [], "cpu": []})
            slot["wall"].append(t["wall"])
            slot["cpu"].append(t["cpu"])
    order = ["startup"] + [k for k in phases if k not in ("startup", "process")] + ["process"]
    med = {k: {m: round(statistics.median(phases[k][m]), 2) for m in ("wall", "cpu")} for k in order}
    last = runs[-1]["report"]
    m = harness.machine()
    return {"bench": "demo", "runs": len(runs), "busy_processes": busy, "cpu_count": m["cpu_count"],
            "load_average_1m": m["load_average_1m"], "threads": last.get("threads"), "python": m["python"],
            "phases": med, "accuracy": last["tasks"], "date": m["date"]}


def format_summary(summary: dict) -> str:
    head = (f"qtulu demo: median of {summary['runs']} run(s), {summary['busy_processes']} busy process(es) alongside, "
            f"{summary['cpu_count']} cores, load {summary['load_average_1m']}, {summary['threads']} torch thread(s)")
    text = harness.table(["phase", "wall s", "CPU s"],
                         [[name, t["wall"], t["cpu"]] for name, t in summary["phases"].items()], ["", ".1f", ".1f"])
    acc = "; ".join(f"{task}: " + ", ".join(f"{k} {v:.2f}" for k, v in row.items())
                    for task, row in summary["accuracy"].items())
    return f"{head}\n{text}\nheld-out exact match: {acc}"


def main(argv: list[str] | None = None) -> int:
    p = harness.parser(__doc__)
    p.add_argument("--repeat", type=int, default=1, help="runs (the table shows medians)")
    p.add_argument("--busy", type=int, default=0, help="busy-looping processes alongside (e.g. 1)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    summary = measure(args.repeat, args.busy, ["--seed", str(args.seed)])
    return harness.finish(summary, format_summary(summary), args.record, title="`qtulu demo`")


if __name__ == "__main__":
    sys.exit(main())
