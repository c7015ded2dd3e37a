"""Print a plan (table), write its breakdown as a PNG, and the JSON summary line."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from qtulu.files import atomic_write
from qtulu.plan.tracker import CATEGORIES

GB = 1e9  # decimal gigabytes, as the memory goals are stated


def table(result, hf=None) -> str:
    """The breakdown at the peak (GB, or MB for small models), the floor, and the notable buffers."""
    cols = [("qtulu", result)] + ([("transformers+peft+bnb", hf)] if hf is not None else [])
    unit, div = ("GB", GB) if max(r.peak_bytes for _, r in cols) >= GB else ("MB", 1e6)

    def gb(n: int | float) -> str:
        return f"{n / div:.2f}" if unit == "GB" else f"{n / div:.1f}"

    w = 24
    lines = [f"{f'at the peak ({unit})':<{w}}" + "".join(f"{name:>24}" for name, _ in cols)]
    for cat in CATEGORIES:
        lines.append(f"{cat:<{w}}" + "".join(f"{gb(r.breakdown.get(cat, 0)):>24}" for _, r in cols))
    lines.append(f"{'peak':<{w}}" + "".join(f"{gb(r.peak_bytes):>24}" for _, r in cols))
    lines.append(f"{'peak during':<{w}}" + "".join(f"{r.peak_phase:>24}" for _, r in cols))
    lines.append(f"{'host (offloaded)':<{w}}" + "".join(f"{gb(r.host_bytes):>24}" for _, r in cols))
    lines.append(f"{'paged optimizer states':<{w}}" + "".join(f"{gb(r.paged_bytes):>24}" for _, r in cols))
    f = result.floor
    lines.append("")
    rs, tile = f.get("recompute_set", 0), f.get("loss_tile", 0)
    lines.append(
        f"floor {gb(result.floor_bytes)} {unit} (the physical minimum) = weights {gb(f['weights'])} + quant state "
        f"{gb(f['quant_state'])} + LoRA {gb(f['lora'])} + optimizer {gb(f['optimizer'])} + gradients "
        f"{gb(f.get('grads', 0))} + checkpointed layer inputs {gb(f['activations'])} + max(one layer's recompute set "
        f"{gb(rs)}, loss tile {gb(tile)}); peak / floor = {result.peak_bytes / max(1, result.floor_bytes):.3f}"
    )
    if hf is not None:
        lines.append(f"qtulu / transformers+peft+bnb = {result.peak_bytes / max(1, hf.peak_bytes):.3f}")
    lines.append("")
    lines.append("largest transient buffers:")
    for t in result.largest_transients[:4]:
        lines.append(f"  {t['bytes'] / 1e6:8.1f} MB  {t['op']}  {t['module'] or '-'}  {t['dtype']} {t['shape']}")
    copies = result.dequantized_weight_copies
    lines.append("dequantized copies of a 4-bit weight: " + (
        "none" if not copies else "; ".join(f"{c['bytes'] / 1e6:.1f} MB by {c['op']} in {c['module']}" for c in copies[:3])
    ))
    if hf is not None and hf.dequantized_weight_copies:
        c = hf.dequantized_weight_copies[0]
        lines.append(f"  (transformers+peft+bnb: {c['bytes'] / 1e6:.1f} MB by {c['op']} in {c['module']})")
    return "\n".join(lines)


def summary(result, hf=None, *, optimized: dict[str, Any] | None = None) -> dict[str, Any]:
    """The JSON object printed last: peak_bytes, settings, breakdown, floor (+ hf_*)."""
    out: dict[str, Any] = {
        "model": result.model,
        "device": result.settings.get("device"),
        "peak_bytes": result.peak_bytes,
        "peak_gb": round(result.peak_bytes / GB, 3),
        "settings": result.settings,
        "breakdown": result.breakdown,
        "floor_bytes": result.floor_bytes,
        "floor": result.floor,
        "peak_over_floor": round(result.peak_bytes / max(1, result.floor_bytes), 4),
        "host_bytes": result.host_bytes,
        "paged_bytes": result.paged_bytes,
        "peak_phase": result.peak_phase,
        "largest_transient_bytes": result.largest_transients[0]["bytes"] if result.largest_transients else 0,
        "dequantized_weight_copies": len(result.dequantized_weight_copies),
        "seconds": round(result.seconds, 1),
    }
    if optimized is not None:
        out["optimize"] = optimized
    if hf is not None:
        out.update(
            hf_peak_bytes=hf.peak_bytes,
            hf_peak_gb=round(hf.peak_bytes / GB, 3),
            hf_breakdown=hf.breakdown,
            peak_over_hf=round(result.peak_bytes / max(1, hf.peak_bytes), 4),
            hf_dequantized_weight_copies=len(hf.dequantized_weight_copies),
        )
    return out


def plot(path: str | os.PathLike, result, hf=None) -> Path:
    """Stacked bars of the breakdown at the peak (and the floor), and live memory over the step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    bars = [("qtulu", result.breakdown)]
    if hf is not None:
        bars.append(("transformers\n+peft+bnb", hf.breakdown))
    floor = dict.fromkeys(CATEGORIES, 0)
    floor.update({k: v for k, v in result.floor.items() if k in CATEGORIES})
    rs, tile = result.floor.get("recompute_set", 0), result.floor.get("loss_tile", 0)
    floor["activations" if rs >= tile else "loss"] += max(rs, tile)
    bars.append(("floor", floor))
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 4.8), gridspec_kw={"width_ratios": [1, 1.6]})
    colors = plt.get_cmap("tab10").colors
    for i, (name, bd) in enumerate(bars):
        bottom = 0.0
        for j, cat in enumerate(CATEGORIES):
            v = bd.get(cat, 0) / GB
            ax.bar(i, v, bottom=bottom, color=colors[j % 10], label=cat if i == 0 else None, width=0.6)
            bottom += v
        ax.text(i, bottom, f"{bottom:.2f}", ha="center", va="bottom", fontsize=9)
    ax.set_xticks(range(len(bars)), [b[0] for b in bars])
    ax.set_ylabel("GB at the peak")
    top = max(sum(bd.get(c, 0) for c in CATEGORIES) for _, bd in bars) / GB
    ax.set_ylim(0, top * 1.45)  # headroom for the legend
    ax.legend(fontsize=7, loc="upper center", ncol=3)
    title = f"{result.model or 'model'}: {result.settings.get('seq_len')} tokens, r {result.settings.get('lora_r')}"
    ax.set_title(title, fontsize=10)
    for name, r in [("qtulu", result)] + ([("transformers+peft+bnb", hf)] if hf is not None else []):
        if r.timeline:
            xs = [i for i, _ in r.timeline]
            x0, x1 = xs[0], max(xs[-1], xs[0] + 1)
            ax2.plot([(x - x0) / (x1 - x0) for x in xs], [b / GB for _, b in r.timeline], label=name)
    ax2.set_xlabel("progress through the step (events)")
    ax2.set_ylabel("live device GB")
    ax2.legend(fontsize=8)
    ax2.set_title("forward, loss, backward with recomputation, optimizer step", fontsize=10)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110))
    plt.close(fig)
    return path


def json_line(obj: dict[str, Any]) -> str:
    return json.dumps(obj, sort_keys=False, default=str)
