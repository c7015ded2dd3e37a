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

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_demo import child_cpu, start_busy  # this folder: the script's own sys.path entry

REPO = Path(__file__).resolve().parents[1]


def timed(cmd: list[str]) -> dict:
    """Run ``cmd`` in a child process; its wall and CPU seconds (it must succeed)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cpu0, t0 = child_cpu(), time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    wall, cpu = time.perf_counter() - t0, child_cpu() - cpu0
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-3000:])
        raise SystemExit(f"{' '.join(cmd[2:4])} failed with exit status {proc.returncode}")
    return {"wall": round(wall, 2), "cpu": round(cpu, 2), "stdout": proc.stdout}


def measure(busy: int, demo: bool) -> dict:
    hogs = start_busy(busy)
    try:
        with tempfile.TemporaryDirectory(prefix="qtulu-bench-study-") as tmp:
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
    finally:
        for h in hogs:
            h.kill()
            h.wait()
    return {
        "bench": "study",
        "busy_processes": busy,
        "cpu_count": os.cpu_count(),
        "load_average_1m": round(os.getloadavg()[0], 2),
        "python": platform.python_version(),
        "runs": {k: {"wall": v["wall"], "cpu": v["cpu"]} for k, v in runs.items()},
        "rerun_fraction": round(again["wall"] / first["wall"], 4),
        "cells_run_again": ran_again,
        "cell_seconds": cells,
        "table": table,
        "date": time.strftime("%Y-%m-%d"),
    }


def print_table(s: dict) -> None:
    print(f"qtulu study recipes/studies/demo.yaml: {s['busy_processes']} busy process(es) alongside, "
          f"{s['cpu_count']} cores, load {s['load_average_1m']}")
    print(f"{'process':<28}{'wall s':>10}{'CPU s':>10}")
    print("-" * 48)
    for name, t in s["runs"].items():
        print(f"{name:<28}{t['wall']:>10.2f}{t['cpu']:>10.2f}")
    print(f"finished re-run: {100 * s['rerun_fraction']:.1f}% of the first run's wall time, "
          f"{s['cells_run_again']} cell(s) run again")
    print("first run, seconds per cell (the first one pays the imports of torch, transformers):")
    for cell, secs in s["cell_seconds"].items():
        print(f"  {cell:<36}{secs:>8.2f}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--busy", type=int, default=0, help="busy-looping processes alongside (e.g. 1)")
    p.add_argument("--no-demo", action="store_true", help="do not time `qtulu demo` for comparison")
    args = p.parse_args(argv)
    summary = measure(args.busy, not args.no_demo)
    print_table(summary)
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
