"""Throughput of `qtulu data build` (load + convert + tokenize + mask + pack) on the real sources.

    python benchmarks/bench_data_build.py [--recipe tests/fixtures/shared_sources.yaml] [--repeats 3]

Builds the recipe once to warm up (imports, tokenizer conversion), then ``--repeats`` times, and
prints a table: examples/s of wall time and examples per CPU-second (all threads; the fairer figure
when other jobs share the machine), the time per stage, and the token utilization of BFD packing
next to the baseline of padding each batch of 8 examples to its longest. The last line is JSON.
CPU only: the build does not use a GPU.
"""

from __future__ import annotations

import os
import platform
import statistics
import sys
import time
from pathlib import Path

from qtulu.bench import harness

REPO = Path(__file__).resolve().parents[1]


def pad_to_longest_utilization(lengths: list[int], batch: int = 8) -> float:
    """Real tokens / padded tokens when consecutive batches of ``batch`` are padded to their longest."""
    used = padded = 0
    for i in range(0, len(lengths), batch):
        chunk = lengths[i : i + batch]
        used += sum(chunk)
        padded += max(chunk) * len(chunk)
    return used / padded if padded else 0.0


def _plot(path: str, built, budget: int, baseline: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    lengths = np.asarray(built.example_lengths)
    fill = np.asarray([sum(r) for r in built.dataset["seq_lens"]]) / budget
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    a.hist(lengths, bins=60, color="#4c72b0")
    a.axvline(budget, color="k", ls="--", lw=1)
    a.set(title=f"example lengths ({len(lengths)} examples)", xlabel="tokens", ylabel="examples", yscale="log")
    b.hist(fill, bins=40, color="#55a868")
    b.set(title=f"packed-row fill (BFD, mean {fill.mean():.3f}; pad-to-longest x8: {baseline:.3f})",
          xlabel="tokens / budget", ylabel="rows")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = harness.parser(__doc__)
    ap.add_argument("--recipe", default=str(REPO / "tests" / "fixtures" / "shared_sources.yaml"))
    ap.add_argument("--tokenizer", default=None, help="default: the recipe's data.tokenizer")
    ap.add_argument("--max-seq-len", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--plot", metavar="PNG", help="also write a chart: example lengths and packed-row fill")
    args = ap.parse_args(argv)

    from qtulu.data.build import build_dataset, resolve_tokenizer
    from qtulu.recipes import load_recipe

    recipe = load_recipe(args.recipe)
    if not all(Path(s.path).exists() for s in recipe.sources if s.path):
        print(f"sources of {args.recipe} not found (is ../shared/data beside the repo?)", file=sys.stderr)
        return 2
    tok = resolve_tokenizer(recipe, args.tokenizer)
    warm = build_dataset(recipe, tok, max_seq_len=args.max_seq_len, progress=False)

    runs = []
    for _ in range(args.repeats):
        w0, c0 = time.perf_counter(), time.process_time()
        built = build_dataset(recipe, tok, max_seq_len=args.max_seq_len, progress=False)
        runs.append((time.perf_counter() - w0, time.process_time() - c0, built.timings))
    m = built.manifest
    n = m["examples"]
    wall = statistics.median(r[0] for r in runs)
    cpu = statistics.median(r[1] for r in runs)
    stages = {k: statistics.median(r[2][k] for r in runs) for k in runs[0][2]}
    # the same examples in source order, padded in batches of 8 to their longest: the unpacked baseline
    # (against the same max_seq_len budget per row as packing is not needed: padding is the waste)
    baseline = pad_to_longest_utilization([int(x) for x in warm.example_lengths], 8)

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    rows = [
        ("recipe", recipe.name),
        ("examples", n),
        ("tokens", m["tokens"]),
        ("packed rows", m["packing"]["sequences"]),
        ("max_seq_len", m["packing"]["max_seq_len"]),
        ("wall s (median of %d)" % args.repeats, f"{wall:.2f}"),
        ("CPU s (all threads)", f"{cpu:.2f}"),
        ("examples/s (wall)", f"{n / wall:,.0f}"),
        ("examples per CPU-s", f"{n / cpu:,.0f}"),
        ("tokens/s (wall)", f"{m['tokens'] / wall:,.0f}"),
        ("stage load+convert s", f"{stages['load']:.2f}"),
        ("stage tokenize+mask s", f"{stages['tokenize']:.2f}"),
        ("stage pack s", f"{stages['pack']:.2f}"),
        ("utilization BFD", f"{m['packing']['utilization']:.4f}"),
        ("utilization pad-to-longest, batch 8", f"{baseline:.4f}"),
        ("machine", f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, load avg {load:.1f}"),
    ]
    if args.plot:
        _plot(args.plot, warm, m["packing"]["max_seq_len"], baseline)
        rows.append(("chart", args.plot))
    return harness.finish({
        "bench": "data_build", "recipe": recipe.name, "examples": n, "tokens": m["tokens"],
        "wall_s": round(wall, 3), "cpu_s": round(cpu, 3),
        "examples_per_s": round(n / wall, 1), "examples_per_cpu_s": round(n / cpu, 1),
        "stages_s": {k: round(v, 3) for k, v in stages.items()},
        "utilization": round(m["packing"]["utilization"], 4), "pad_to_longest_utilization": round(baseline, 4),
        "cpus": os.cpu_count(), "load_avg": round(load, 2),
    }, harness.table(["measure", "value"], [(k, str(v)) for k, v in rows], left=2), args.record,
        title="Data build (tokenize + mask + pack)")


if __name__ == "__main__":
    sys.exit(main())
