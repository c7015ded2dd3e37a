"""How long the CPU study takes: its first run, the same command on the finished folder, and
`qtulu demo` in the same conditions for comparison (wall and CPU seconds of each process).

    python benchmarks/bench_study.py                # one of each on the machine as it is
    python benchmarks/bench_study.py --busy 1       # with one busy-looping process alongside
    python benchmarks/bench_study.py --no-demo      # the study only

Each command runs in a fresh process (imports included, as a user runs it): ``qtulu study
recipes/studies/demo.yaml --out TMP`` twice, then ``qtulu demo --out TMP2``. Per-cell seconds come
from the study's own log (``OUT/log.jsonl``). Prints a table and a final JSON line.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

from qtulu.bench import harness


def measure(busy: int, demo: bool) -> dict:
    def timed(cmd):
        r = harness.run_timed(cmd)
        return {"wall": round(r["wall"], 2), "cpu": round(r["cpu"], 2)}

    with harness.busy(busy), tempfile.TemporaryDirectory(prefix="qtulu-bench-study-") as tmp:
        out = Path(tmp) / "study_out"
        study = [sys.executable, "-m", "qtulu.cli", "study", "recipes/studies/demo.yaml", "--out", str(out),
                 "--no-progress"]
        first = timed(study)
        again = timed(study)
        log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
        pids = list(dict.fromkeys(x["pid"] for x in log))  # the first run's, then the second's
        cells = {x["cell"]: x["seconds"] for x in log if x["event"] == "done" and x["pid"] == pids[0]}
        ran_again = sum(1 for x in log if x["event"] == "run" and x["pid"] == pids[-1])
        table = json.loads((out / "results.json").read_text())["table"]
        runs = {"study (first run)": first, "study (finished, again)": again}
        if demo:
            runs["demo (for comparison)"] = timed([sys.executable, "-m", "qtulu.cli", "demo", "--out",
                                                   str(Path(tmp) / "demo_out"), "--no-progress"])
    m = harness.machine()
    return {"bench": "study", "busy_processes": busy, "cpu_count": m["cpu_count"],
            "load_average_1m": m["load_average_1m"], "python": m["python"], "runs": runs,
            "rerun_fraction": round(again["wall"] / first["wall"], 4), "cells_run_again": ran_again,
            "cell_seconds": cells, "table": table, "date": m["date"]}


def format_summary(s: dict) -> str:
    return "\n".join([
        f"qtulu study recipes/studies/demo.yaml: {s['busy_processes']} busy process(es) alongside, "
        f"{s['cpu_count']} cores, load {s['load_average_1m']}",
        harness.table(["process", "wall s", "CPU s"], [[k, t["wall"], t["cpu"]] for k, t in s["runs"].items()],
                      ["", ".2f", ".2f"]),
        f"finished re-run: {100 * s['rerun_fraction']:.1f}% of the first run's wall time, "
        f"{s['cells_run_again']} cell(s) run again",
        "first run, seconds per cell (the first one pays the imports of torch, transformers):",
        harness.table(["cell", "seconds"], list(s["cell_seconds"].items()), ["", ".2f"]),
    ])


def main(argv: list[str] | None = None) -> int:
    p = harness.parser(__doc__)
    p.add_argument("--busy", type=int, default=0, help="busy-looping processes alongside (e.g. 1)")
    p.add_argument("--no-demo", action="store_true", help="do not time `qtulu demo` for comparison")
    args = p.parse_args(argv)
    summary = measure(args.busy, not args.no_demo)
    return harness.finish(summary, format_summary(summary), args.record, title="`qtulu study demo`")


if __name__ == "__main__":
    sys.exit(main())
