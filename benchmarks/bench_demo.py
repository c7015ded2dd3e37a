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

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def start_busy(n: int) -> list[subprocess.Popen]:
    """``n`` processes that spin on one core each (the issue's "one other busy process")."""
    code = "while True:\n    pass\n"
    return [subprocess.Popen([sys.executable, "-c", code]) for _ in range(n)]


def run_once(out_dir: Path, extra: list[str]) -> dict:
    """One ``qtulu demo`` in a child process; its report plus the process's own wall and CPU."""
    cmd = [sys.executable, "-m", "qtulu.cli", "demo", "--out", str(out_dir), "--no-progress", *extra]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=REPO)
    output, _ = proc.communicate()
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.stderr.write(output[-4000:])
        raise SystemExit(f"qtulu demo failed with exit status {proc.returncode}")
    report = json.loads((out_dir / "report.json").read_text())
    return {"wall": wall, "output": output, "report": report}


def child_cpu() -> float:
    """CPU seconds (user + sys) of the waited-for child processes so far."""
    import resource

    u = resource.getrusage(resource.RUSAGE_CHILDREN)
    return u.ru_utime + u.ru_stime


def measure(repeat: int, busy: int, extra: list[str]) -> dict:
    runs = []
    hogs = start_busy(busy)
    try:
        for i in range(repeat):
            with tempfile.TemporaryDirectory(prefix="qtulu-bench-demo-") as tmp:
                cpu0 = child_cpu()
                r = run_once(Path(tmp) / "demo_out", extra)
                r["cpu"] = child_cpu() - cpu0
                runs.append(r)
                print(f"run {i + 1}/{repeat}: {r['wall']:.1f}s wall, {r['cpu']:.1f}s CPU", file=sys.stderr, flush=True)
    finally:
        for h in hogs:
            h.kill()
            h.wait()
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
    return {
        "bench": "demo",
        "runs": len(runs),
        "busy_processes": busy,
        "cpu_count": os.cpu_count(),
        "load_average_1m": round(os.getloadavg()[0], 2),
        "threads": last.get("threads"),
        "python": platform.python_version(),
        "phases": med,
        "accuracy": last["tasks"],
        "date": time.strftime("%Y-%m-%d"),
    }


def print_table(summary: dict) -> None:
    print(f"qtulu demo: median of {summary['runs']} run(s), {summary['busy_processes']} busy process(es) alongside, "
          f"{summary['cpu_count']} cores, load {summary['load_average_1m']}, {summary['threads']} torch thread(s)")
    print(f"{'phase':<22}{'wall s':>10}{'CPU s':>10}")
    print("-" * 42)
    for name, t in summary["phases"].items():
        if name == "process":
            print("-" * 42)
        print(f"{name:<22}{t['wall']:>10.1f}{t['cpu']:>10.1f}")
    acc = summary["accuracy"]
    print("held-out exact match: " + "; ".join(f"{task}: " + ", ".join(f"{k} {v:.2f}" for k, v in row.items())
                                              for task, row in acc.items()))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeat", type=int, default=1, help="runs (the table shows medians)")
    p.add_argument("--busy", type=int, default=0, help="busy-looping processes alongside (e.g. 1)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    summary = measure(args.repeat, args.busy, ["--seed", str(args.seed)])
    print_table(summary)
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
