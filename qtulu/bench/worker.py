"""One benchmark configuration, run in its own process so that its peak memory is its own.

``run_config(spec) -> result`` builds the model (see ``build.py``), attaches LoRA, runs
``warmup + steps`` optimizer steps over the planned rows, and measures the timed steps:
CUDA events on a GPU (perf_counter on CPU), peak memory as ``torch.cuda.max_memory_allocated``
(peak RSS on CPU). A CUDA out-of-memory is a result ("oom"), not a crash.

This module imports torch and transformers at the top on purpose: it is the fork server's preload
on CPU (see ``server.py``), never imported by ``qtulu --help``.
"""

from __future__ import annotations

import json
import os
import resource
import time
import traceback
from pathlib import Path
from typing import Any

import torch

# Imported before the fork (CPU) or before the build, so that no configuration measures them.
import bitsandbytes  # noqa: F401
import peft  # noqa: F401
import transformers.integrations.bitsandbytes  # noqa: F401
import transformers.models.llama.modeling_llama  # noqa: F401

import qtulu.model.attention  # noqa: F401
import qtulu.kernels.varlen_attention  # noqa: F401
import qtulu.model.quant  # noqa: F401

from qtulu.bench.build import attach_lora, build_bnb_model, build_qtulu_model, make_optimizer
from qtulu.bench.flops import mfu, peak_tflops, step_flops
from qtulu.bench.lengths import padded_microbatches
from qtulu.model.shapes import shape_from_dict
from qtulu.files import atomic_write_text

GB = 1024**3
PAD_ID = 0
FIRST_ID = 3  # token ids drawn from [3, vocab): no pad/bos/eos


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def step_tokens(row: list[int], *, vocab: int, seed: int, step: int) -> torch.Tensor:
    """The token ids of one step's documents, concatenated (same for every configuration)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    return torch.randint(FIRST_ID, vocab, (sum(row),), generator=g)  # (total,)


def packed_batch(row: list[int], ids: torch.Tensor, device) -> dict[str, torch.Tensor]:
    """One packed row: ``(1, total)`` ids, position_ids restarting at 0 per document, and labels
    masked at each document's first token (never predict across a document boundary)."""
    pos = torch.cat([torch.arange(n) for n in row])  # (total,)
    labels = ids.clone()
    labels[pos == 0] = -100
    return {
        "input_ids": ids.view(1, -1).to(device),
        "position_ids": pos.view(1, -1).to(device),
        "labels": labels.view(1, -1).to(device),
    }


def padded_batches(row: list[int], ids: torch.Tensor, budget: int, device) -> list[tuple[dict[str, torch.Tensor], int]]:
    """The same documents as right-padded micro-batches of at most ``budget`` tokens (padding
    included), each with its count of real tokens."""
    starts = [0]
    for n in row[:-1]:
        starts.append(starts[-1] + n)
    out = []
    for group in padded_microbatches(row, budget):
        longest = row[group[0]]
        input_ids = torch.full((len(group), longest), PAD_ID, dtype=torch.long)  # (B, T)
        mask = torch.zeros((len(group), longest), dtype=torch.long)  # (B, T)
        for b, j in enumerate(group):
            input_ids[b, : row[j]] = ids[starts[j] : starts[j] + row[j]]
            mask[b, : row[j]] = 1
        labels = input_ids.masked_fill(mask == 0, -100)
        batch = {"input_ids": input_ids, "attention_mask": mask, "labels": labels}
        out.append(({k: v.to(device) for k, v in batch.items()}, int(mask.sum())))
    return out


class _Timer:
    """Per-step wall time: CUDA events on a GPU (no host sync inside the step), perf_counter on CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.pairs: list[Any] = []

    def start(self):
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return time.perf_counter()

    def stop(self, begin) -> None:
        if self.cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self.pairs.append((begin, end))
        else:
            self.pairs.append((begin, time.perf_counter()))

    def seconds(self) -> list[float]:
        if self.cuda:
            torch.cuda.synchronize()
            return [b.elapsed_time(e) / 1000.0 for b, e in self.pairs]
        return [e - b for b, e in self.pairs]


def _build(spec: dict[str, Any], device: torch.device, dtype: torch.dtype):
    shape = shape_from_dict(spec["shape"])
    common = dict(
        device=device,
        dtype=dtype,
        seed=spec["seed"],
        max_position_embeddings=max(2048, spec["seq_len"]),
        progress=spec.get("progress", False),
    )
    if spec["stack"] == "baseline":
        model = build_bnb_model(shape, **common)
    elif spec["stack"] == "qtulu":
        model = build_qtulu_model(shape, nf4_backend=spec["nf4_backend"], attn_implementation=spec["attention"], **common)
    else:
        raise ValueError(f"unknown stack {spec['stack']!r}")
    return model, shape


def run_config(spec: dict[str, Any]) -> dict[str, Any]:
    """Run one configuration and return its result dict.

    ``spec`` keys: name, stack ("qtulu" | "baseline"), nf4_backend, attention, batching ("packed" |
    "padded"), shape (``ShapeSpec.to_dict()``), seq_len, device, dtype (torch dtype name), rows
    (each step's document lengths, warmup steps first), warmup, lora {r, alpha, dropout}, seed;
    optional: optimizer, peak_tflops, threads, build_only, progress, lr."""
    result: dict[str, Any] = {"name": spec["name"], "status": "ok", "error": None}
    device = torch.device(spec["device"])
    dtype = getattr(torch, spec["dtype"])
    cuda = device.type == "cuda"
    rss0 = _rss_bytes()
    phase = "setup"
    try:
        if cuda and torch.cuda._is_in_bad_fork():
            raise RuntimeError("CUDA was initialized in the benchmark server before the fork; run it without --preload")
        torch.manual_seed(spec["seed"])
        if spec.get("threads"):
            torch.set_num_threads(int(spec["threads"]))
        result["device_name"] = torch.cuda.get_device_name(device) if cuda else "cpu"
        peak = spec.get("peak_tflops") or (peak_tflops(result["device_name"]) if cuda else None)
        result["peak_tflops"] = peak
        if cuda:
            torch.cuda.set_device(device)
            torch.cuda.reset_peak_memory_stats(device)
        phase = "build"
        t0 = time.perf_counter()
        model, shape = _build(spec, device, dtype)
        if cuda:
            torch.cuda.synchronize(device)
        result["build_s"] = time.perf_counter() - t0
        # the quantized base alone, against what its weights would take in bf16: the layer-by-layer
        # build must stay near the NF4 size (never the bf16 one)
        result["bf16_weights_gb"] = shape.total_params() * 2 / GB
        if cuda:
            result["build_peak_gb"] = torch.cuda.max_memory_allocated(device) / GB
        else:
            result["build_peak_gb"] = (_peak_rss_bytes() - rss0) / GB
        lora = spec["lora"]
        model = attach_lora(model, r=lora["r"], alpha=lora["alpha"], dropout=lora["dropout"], dtype=dtype)
        result["model_mem_gb"] = (torch.cuda.memory_allocated(device) if cuda else _rss_bytes() - rss0) / GB
        result["trainable_params"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
        if spec.get("build_only"):
            return _finish(result, device, rss0)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = make_optimizer(params, spec.get("optimizer", "adamw"), lr=spec.get("lr", 1e-4))
        autocast = torch.autocast(device.type, dtype=dtype, enabled=cuda and dtype != torch.float32)

        timer = _Timer(device)
        losses: list[torch.Tensor] = []
        rows = spec["rows"]
        warmup = spec["warmup"]
        phase = "train"
        fed = 0  # tokens fed to the model in the timed steps, padding included
        for k, row in enumerate(rows):
            ids = step_tokens(row, vocab=shape.vocab, seed=spec["seed"], step=k)
            if spec["batching"] == "packed":
                micro = [(packed_batch(row, ids, device), sum(row))]
            else:
                micro = padded_batches(row, ids, spec["seq_len"], device)
            if k == warmup and cuda:
                torch.cuda.synchronize(device)
            begin = timer.start()
            step_loss = torch.zeros((), device=device)
            total = sum(n for _, n in micro)
            if k >= warmup:
                fed += sum(b["input_ids"].numel() for b, _ in micro)
            for batch, n in micro:
                with autocast:
                    loss = model(**batch).loss * (n / total)
                loss.backward()
                step_loss += loss.detach().float()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if k >= warmup:
                timer.stop(begin)
            losses.append(step_loss)
        times = timer.seconds()[: len(rows) - warmup]
        loss_values = [float(x) for x in losses]
        if not all(map(lambda v: v == v and abs(v) != float("inf"), loss_values)):
            raise FloatingPointError(f"non-finite loss: {loss_values}")
        timed_rows = rows[warmup:]
        flops = [step_flops(shape, r, spec["lora"]["r"]) for r in timed_rows]
        tokens = sum(f["tokens"] for f in flops)
        seconds = sum(times)
        result.update(
            steps=len(timed_rows),
            tokens=tokens,
            padding_frac=1 - tokens / fed,
            seconds=seconds,
            step_s=times,
            tokens_per_s=tokens / seconds,
            model_tflops_per_s=sum(f["total"] for f in flops) / seconds / 1e12,
            losses=loss_values,
        )
        result["mfu"] = mfu(result["model_tflops_per_s"] * 1e12, peak)
    except torch.OutOfMemoryError as exc:  # a legitimate result: this stack does not fit
        result.update(status="oom", error=f"{phase}: {str(exc).splitlines()[0]}")
    except Exception as exc:  # reported per configuration so the other configurations still run
        result.update(status="error", error=f"{phase}: {type(exc).__name__}: {exc}", traceback=traceback.format_exc()[-4000:])
    return _finish(result, device, rss0)


def _finish(result: dict[str, Any], device: torch.device, rss0: int) -> dict[str, Any]:
    if device.type == "cuda" and torch.cuda.is_available():
        result["peak_mem_gb"] = torch.cuda.max_memory_allocated(device) / GB
        result["peak_reserved_gb"] = torch.cuda.max_memory_reserved(device) / GB
        result["mem_kind"] = "cuda max_memory_allocated"
    else:
        result["peak_mem_gb"] = (_peak_rss_bytes() - rss0) / GB
        result["mem_kind"] = "cpu peak RSS growth"
    return result


def child_main(spec_path: str, result_path: str) -> None:
    """Process entry point: read the spec JSON, run, write the result JSON atomically."""
    spec = json.loads(Path(spec_path).read_text())
    result = run_config(spec)
    atomic_write_text(result_path, json.dumps(result))
