"""The benchmark's outputs: a text table, a Markdown section for docs/benchmarks.md, a PNG chart."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from qtulu.bench.harness import DOCS_HEADER, table
from qtulu.files import atomic_write, atomic_write_text


def _fmt(v: Any, spec: str, none: str = "-") -> str:
    return none if v is None else format(v, spec)


def ratios(results: list[dict[str, Any]], baseline: str = "baseline") -> None:
    """Add ``speedup`` (tokens/s over the baseline's) and ``mem_ratio`` (peak memory over the
    baseline's) to each result, in place, per shape. None where either side did not run."""
    by_shape: dict[str, dict[str, dict[str, Any]]] = {}
    for r in results:
        by_shape.setdefault(r["shape"], {})[r["name"]] = r
    for rows in by_shape.values():
        base = rows.get(baseline)
        ok = base is not None and base["status"] == "ok"
        for r in rows.values():
            both = ok and r["status"] == "ok"
            tps, base_tps = r.get("tokens_per_s"), base.get("tokens_per_s") if base else None
            r["speedup"] = tps / base_tps if both and tps and base_tps else None
            mem, base_mem = r.get("peak_mem_gb"), base.get("peak_mem_gb") if base else None
            r["mem_ratio"] = mem / base_mem if both and mem is not None and base_mem else None


COLUMNS = ("shape", "config", "tokens/s", "x base", "TFLOP/s", "MFU", "peak GB", "x base mem", "build GB", "pad %", "status")


def table_rows(results: list[dict[str, Any]]) -> list[list[str]]:
    rows = []
    for r in results:
        ok = r["status"] == "ok"
        rows.append(
            [
                r["shape"],
                r["name"],
                _fmt(r.get("tokens_per_s") if ok else None, ",.0f"),
                _fmt(r.get("speedup"), ".2f"),
                _fmt(r.get("model_tflops_per_s") if ok else None, ".1f" if (r.get("model_tflops_per_s") or 0) >= 1 else ".4f"),
                _fmt(None if r.get("mfu") is None else 100 * r["mfu"], ".1f") + ("%" if r.get("mfu") is not None else ""),
                _fmt(r.get("peak_mem_gb"), ".2f"),
                _fmt(r.get("mem_ratio"), ".2f"),
                _fmt(r.get("build_peak_gb"), ".2f"),
                _fmt(None if r.get("padding_frac") is None else 100 * r["padding_frac"], ".1f"),
                r["status"] if ok else f"{r['status']}: {(r.get('error') or '')[:60]}",
            ]
        )
    return rows


def format_table(results: list[dict[str, Any]]) -> str:
    """A fixed-width text table of the results (the harness's, as every benchmark prints)."""
    return table(COLUMNS, table_rows(results), left=2)


def markdown_table(results: list[dict[str, Any]]) -> str:
    rows = table_rows(results)
    out = ["| " + " | ".join(COLUMNS) + " |", "|" + "|".join("---" if i < 2 else "---:" for i in range(len(COLUMNS))) + "|"]
    out += ["| " + " | ".join(c.replace("|", "/") for c in row) + " |" for row in rows]
    return "\n".join(out)


def write_chart(results: list[dict[str, Any]], path: str | Path, title: str) -> Path:
    """Grouped bars, one group per shape, one bar per configuration: tokens/s and peak memory."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = list(dict.fromkeys(r["shape"] for r in results))
    configs = list(dict.fromkeys(r["name"] for r in results))
    by = {(r["shape"], r["name"]): r for r in results}
    fig, axes = plt.subplots(1, 2, figsize=(5 + 2.2 * len(shapes), 4.2))
    width = 0.8 / max(1, len(configs))
    for ax, key, label in ((axes[0], "tokens_per_s", "tokens / s (higher is better)"), (axes[1], "peak_mem_gb", "peak memory, GB (lower is better)")):
        for ci, cfg in enumerate(configs):
            xs, ys = [], []
            for si, shape in enumerate(shapes):
                r = by.get((shape, cfg))
                if r is not None and r["status"] == "ok" and r.get(key) is not None:
                    xs.append(si + (ci - (len(configs) - 1) / 2) * width)
                    ys.append(r[key])
            ax.bar(xs, ys, width=width, label=cfg)
        ax.set_xticks(range(len(shapes)), shapes)
        ax.set_ylabel(label)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110))
    plt.close(fig)
    return Path(path)


def append_record(docs_path: str | Path, summary: dict[str, Any], results: list[dict[str, Any]], chart: Path | None) -> Path:
    """Append a dated section for this run to ``docs_path`` (created with a header if absent)."""
    docs_path = Path(docs_path)
    old = docs_path.read_text(encoding="utf-8") if docs_path.exists() else DOCS_HEADER
    lines = [
        "",
        f"## End-to-end QLoRA training: {summary['date']}, {summary['device']}",
        "",
        f"`{summary['command']}`",
        "",
        f"seq_len {summary['seq_len']}, {summary['steps']} timed steps after {summary['warmup']} warmup, "
        f"LoRA r={summary['lora']['r']} on all linear layers, {summary['dtype']}, optimizer {summary.get('optimizer', 'adamw')}, "
        f"data: {summary['lengths']['source']} "
        f"({summary['lengths']['docs']} documents, mean {summary['lengths']['mean']:.0f} tokens). "
        f"Versions: {', '.join(f'{k} {v}' for k, v in summary['versions'].items())}.",
        "",
        markdown_table(results),
        "",
        "tokens/s counts real (unpadded) tokens of the timed steps; MFU = model FLOPs (4·N·T for the frozen "
        "matmuls, causal attention per document, LoRA; no checkpointing recompute) / time / the device's "
        f"bf16 peak ({summary['peak_tflops'] or 'unknown'} TFLOP/s); peak GB = "
        f"{results[0].get('mem_kind', 'peak memory') if results else 'peak memory'} per configuration (own process); "
        "build GB = peak while building the 4-bit model, before LoRA; pad % = padding among the tokens fed.",
        "",
    ]
    if summary["device"] == "cpu":
        lines += ["CPU run: exercises the code path only; no speed claim.", ""]
    if chart is not None:
        rel = os.path.relpath(chart, docs_path.parent)
        lines += [f"![e2e]({rel})", ""]
    atomic_write_text(docs_path, old.rstrip("\n") + "\n" + "\n".join(lines))
    return docs_path
