"""The small harness every script in ``benchmarks/`` stands on: its argument parser, timing, child
processes, a text table, and the end of every run (the table, then one JSON line; with
``--record``, a dated section in docs/benchmarks.md). Importing it imports no torch."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

from qtulu.files import atomic_write_text

REPO = Path(__file__).resolve().parents[2]
DOCS = REPO / "docs" / "benchmarks.md"
DOCS_HEADER = "# Benchmarks\n\nMeasured figures only; each section names its device, date and command.\n"


def parser(doc: str | None, **kw: Any) -> argparse.ArgumentParser:
    """An argument parser whose help is the script's docstring, with ``--record`` added."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter, **kw)
    p.add_argument("--record", nargs="?", const=str(DOCS), default=None, metavar="MD",
                   help="also append a dated section (command, table) to MD (default docs/benchmarks.md)")
    return p


def machine() -> dict[str, Any]:
    """Where the figures come from: cores, load, Python, date (UTC)."""
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return {"cpu_count": os.cpu_count(), "load_average_1m": round(load, 2), "python": platform.python_version(),
            "processor": platform.processor() or platform.machine(), "date": time.strftime("%Y-%m-%d", time.gmtime())}


# ------------------------------------------------------------------------------------ timing


def best_of(fn: Callable[[], Any], repeat: int) -> tuple[float, Any]:
    """(fastest wall seconds over ``repeat`` calls, the last call's result)."""
    times, out = [], None
    for _ in range(max(1, repeat)):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return min(times), out


def median_seconds(fn: Callable[[], Any], reps: int, warmup: int = 0, *, cuda: bool = False,
                   before: Callable[[], Any] | None = None) -> float:
    """Median seconds of ``reps`` calls after ``warmup`` untimed ones; CUDA events on a GPU (the
    launch is asynchronous, so wall time would measure the queue). ``before`` runs untimed ahead
    of every timed call (e.g. an L2 flush)."""
    for _ in range(warmup):
        fn()
    if cuda:
        import torch

        torch.cuda.synchronize()
    times = []
    for _ in range(max(1, reps)):
        if before is not None:
            before()
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


# ---------------------------------------------------------------------------- child processes


def child_cpu() -> float:
    """CPU seconds (user + sys) of the waited-for child processes so far."""
    import resource

    u = resource.getrusage(resource.RUSAGE_CHILDREN)
    return u.ru_utime + u.ru_stime


@contextlib.contextmanager
def busy(n: int) -> Iterator[None]:
    """``n`` processes that spin on one core each while the block runs ("one other busy process")."""
    hogs = [subprocess.Popen([sys.executable, "-c", "while True:\n    pass\n"]) for _ in range(n)]
    try:
        yield
    finally:
        for h in hogs:
            h.kill()
            h.wait()


def run_timed(cmd: list[str], *, cwd: Path = REPO) -> dict[str, Any]:
    """Run ``cmd`` to completion in a child process: its output, wall and CPU seconds. A failure
    prints the end of its output and exits."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cpu0, t0 = child_cpu(), time.perf_counter()
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=cwd)
    wall, cpu = time.perf_counter() - t0, child_cpu() - cpu0
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-4000:])
        raise SystemExit(f"{' '.join(cmd[2:4])} failed with exit status {proc.returncode}")
    return {"wall": wall, "cpu": cpu, "output": proc.stdout}


# ------------------------------------------------------------------------------------- output


def _cell(value: Any, spec: str) -> str:
    if value is None:
        return "-"
    if isinstance(value, str):
        return value
    return format(value, spec)


def table(columns: Sequence[str], rows: Iterable[Sequence[Any]], specs: Sequence[str] = (),
          left: int | Iterable[int] = 1) -> str:
    """A fixed-width text table: a header, a rule, one line per row. ``specs[i]`` formats column
    i's numbers (None prints as "-"); left-aligned are the first ``left`` columns (or the columns
    of those indices), the rest right-aligned."""
    specs = list(specs) + [""] * (len(columns) - len(specs))
    left = set(range(left)) if isinstance(left, int) else {i % len(columns) for i in left}
    cells = [list(columns)] + [[_cell(v, s) for v, s in zip(row, specs)] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    lines = ["  ".join(c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip()
             for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def finish(summary: dict[str, Any], text: str, record: str | None = None, *, title: str | None = None) -> int:
    """The end of every benchmark: ``text`` (its table), then ``summary`` as one JSON line; with
    ``record`` (a Markdown path) also a dated section with the command and the table. Returns 0."""
    print(text)
    if record:
        path = Path(record)
        old = path.read_text(encoding="utf-8") if path.exists() else DOCS_HEADER
        name = title or summary.get("bench", "benchmark")
        command = "python " + " ".join([os.path.relpath(sys.argv[0], REPO), *sys.argv[1:]])
        section = (f"\n## {name}: {time.strftime('%Y-%m-%d', time.gmtime())}, {summary.get('device', 'cpu')}\n\n"
                   f"`{command}`\n\n```\n{text}\n```\n")
        atomic_write_text(path, old.rstrip("\n") + "\n" + section)
        summary = {**summary, "recorded": str(path)}
    print(json.dumps(summary))
    return 0
