"""Print a plan (table), write its breakdown as a PNG, and the JSON summary line."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from qtulu.files import atomic_write
from qtulu.plan.tracker import CATEGORIES

GB = 1e9  # decimal gigabytes, as the memory goals are stated


HF_LABELS = {"bfloat16": "HF+TRL bf16 adapters", "float32": "HF+TRL fp32 adapters"}


def _hf_cols(hf) -> list[tuple[str, Any]]:
    """``hf``: None, one HF plan, or a list of them (labelled by their adapter dtype)."""
    if hf is None:
        return []
    items = hf if isinstance(hf, (list, tuple)) else [hf]
    return [(HF_LABELS.get(r.settings.get("adapter_dtype", ""), "transformers+peft+bnb"), r) for r in items]


def table(result, hf=None, *, differences: list[str] | None = None, setup: str = "") -> str:
    """The breakdown at the peak (GB, or MB for small models), the floor, and the notable buffers."""
    hfs = _hf_cols(hf)
    cols = [("qtulu", result)] + hfs
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
    for name, r in hfs:
        lines.append(f"qtulu / {name} = {result.peak_bytes / max(1, r.peak_bytes):.3f}")
    if hfs:
        if setup:
            lines.append(f"HF+TRL: {setup}")
        lines.append("differences (qtulu vs HF+TRL):")
        lines += [f"  - {d}" for d in differences or []]
    lines += offload_lines(result, unit, div)
    lines.append("")
    lines.append("largest transient buffers:")
    for t in result.largest_transients[:4]:
        lines.append(f"  {t['bytes'] / 1e6:8.1f} MB  {t['op']}  {t['module'] or '-'}  {t['dtype']} {t['shape']}")
    copies = result.dequantized_weight_copies
    lines.append("dequantized copies of a 4-bit weight: " + (
        "none" if not copies else "; ".join(f"{c['bytes'] / 1e6:.1f} MB by {c['op']} in {c['module']}" for c in copies[:3])
    ))
    if hfs and hfs[0][1].dequantized_weight_copies:
        c = hfs[0][1].dequantized_weight_copies[0]
        lines.append(f"  ({hfs[0][0]}: {c['bytes'] / 1e6:.1f} MB by {c['op']} in {c['module']})")
    return "\n".join(lines)


def offload_lines(result, unit: str = "GB", div: float = GB) -> list[str]:
    """GPU bytes, pinned and pageable host bytes and the CPU optimizer step, side by side, for a plan
    that offloads (an all-on-GPU plan prints nothing)."""
    h = result.host or {}
    if not h.get("pinned_bytes") and not h.get("pageable_bytes"):
        return []
    cpu = result.cpu_optimizer
    step = (f"{cpu['seconds_per_step']:.1f} s per optimizer step ({cpu['class']}, {cpu['ns_per_param']:.1f} ns/param "
            f"x {cpu['params'] / 1e6:.0f}M LoRA parameters, {cpu['threads']} threads, measured on this machine)"
            if cpu else "none (no optimizer on the host)")
    def v(n: int) -> str:
        return f"{n / div:.2f}"

    return ["", "offload (ZeRO-Offload when the optimizer runs on the host):",
            f"  GPU peak {v(result.peak_bytes)} {unit} | pinned host {v(h['pinned_bytes'])} {unit} (activations "
            f"{v(h['pinned_activations'])}, fp32 masters {v(h['pinned_masters'])}, gradient staging "
            f"{v(h['pinned_staging'])}) | pageable host {v(h['pageable_bytes'])} {unit} (fp32 gradient sums "
            f"{v(h['grad_sums'])}, optimizer states {v(h['optimizer_states'])})",
            f"  CPU optimizer: {step}"]


def summary(result, hf=None, *, optimized: dict[str, Any] | None = None, differences: list[str] | None = None,
            setup: str = "") -> dict[str, Any]:
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
        "host": result.host,
        "cpu_optimizer": result.cpu_optimizer,
    }
    if optimized is not None:
        out["optimize"] = optimized
    for i, (name, r) in enumerate(_hf_cols(hf)):
        # the first HF plan is TRL's default (bf16 adapters): hf_*; the others hf_<adapter dtype>_*
        p = "hf_" if i == 0 else f"hf_{r.settings.get('adapter_dtype') or i}_adapters_"
        out.update({
            f"{p}peak_bytes": r.peak_bytes,
            f"{p}peak_gb": round(r.peak_bytes / GB, 3),
            f"{p}breakdown": r.breakdown,
            f"peak_over_{p.removesuffix('_')}": round(result.peak_bytes / max(1, r.peak_bytes), 4),
            f"{p}dequantized_weight_copies": len(r.dequantized_weight_copies),
        })
        if i == 0:
            out.update(hf_label=name, hf_setup=setup, hf_differences=list(differences or []))
    return out


def plot(path: str | os.PathLike, result, hf=None) -> Path:
    """Stacked bars of the breakdown at the peak (and the floor), and live memory over the step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    bars = [("qtulu", result.breakdown)]
    for name, r in _hf_cols(hf):
        bars.append((name.replace(" ", "\n", 1), r.breakdown))
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
    for name, r in [("qtulu", result)] + _hf_cols(hf):
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
