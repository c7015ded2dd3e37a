"""Peak memory of one training step on this machine's CPU: each memory switch, the planner beside it.

For every setting, one optimizer step (two micro-batches, gradient checkpointing, clipping, the
optimizer update; `qtulu.plan.step`) runs on real tensors under ``torch.profiler`` with
``profile_memory=True``, and the peak of the CPU allocator's own events (plus the model, optimizer
states and batches resident before the step) is the measured peak (`qtulu.plan.measure`). The same
step is planned on fake tensors (``qtulu plan --device cpu``); both are printed with their ratio.
The transformers + peft + bitsandbytes step as TRL's SFTTrainer sets it up (bitsandbytes' CPU backend) runs in the same table.

What a CPU step can and cannot show: the CPU trainer computes in fp32 without autocast and keeps
everything in one memory, so ``train.master_weights: host`` (host == device) and
``train.activation_offload`` (it moves CUDA tensors only) change nothing here; their GPU effect is
planned (``qtulu plan``, the default ``--device cuda``) and, on a GPU, measured by
``--device cuda``: the real step on the GPU against ``torch.cuda.max_memory_allocated``.

    python benchmarks/bench_memory.py                  # CPU, a small LLaMA shape, ~5 minutes
    python benchmarks/bench_memory.py --smoke          # tiny, seconds
    python benchmarks/bench_memory.py --device cuda --shape llama-7b --seq-len 4096    # on a GPU (owed)
"""

from __future__ import annotations

import sys
import time

from qtulu.bench import harness

# name -> (stack, changes to the baseline settings)
# key -> (label, stack, changes to the baseline settings); cumulative, in this order
SETTINGS = {
    "defaults": ("qtulu (recipe defaults)", "qtulu", {}),
    "loss": ("+ train.loss_chunk_size=8192", "qtulu", {"loss_chunk_size": 8192}),
    "dropout": ("+ lora.dropout_impl=recompute", "qtulu", {"loss_chunk_size": 8192, "lora_dropout_impl": "recompute"}),
    "8bit": ("+ 8-bit AdamW (bitsandbytes)", "qtulu", {"loss_chunk_size": 8192, "lora_dropout_impl": "recompute",
                                                      "optimizer": "adamw_8bit"}),
    "hf": ("HF+TRL 1.16 SFTTrainer (bf16 adapters)", "hf", {}),
}
# on a GPU the recipe default optimizer is paged 8-bit AdamW already; these two act on CUDA tensors only
CUDA_SETTINGS = {
    "offload": ("+ train.activation_offload", "qtulu", {"loss_chunk_size": 8192, "lora_dropout_impl": "recompute",
                                                       "activation_offload": True}),
    "host": ("+ train.master_weights=host", "qtulu", {"loss_chunk_size": 8192, "lora_dropout_impl": "recompute",
                                                      "activation_offload": True, "master_weights": "host"}),
}


def _config(args):
    from qtulu.plan import resolve_config

    if args.shape != "small":
        return resolve_config(args.shape, seq_len=args.seq_len)
    # a LLaMA-architecture model with LLaMA's vocabulary, small enough for a CPU step
    from qtulu.model.shapes import ShapeSpec

    cfg = ShapeSpec("small", hidden=512, layers=4, heads=8, intermediate=1376).llama_config()
    cfg._name_or_path = "small (hidden 512, 4 layers, vocab 32000)"
    return cfg


def _cuda_measure(settings, stack, config):
    """The real step on the GPU: torch.cuda.max_memory_allocated around it (after a warm-up step)."""
    import gc

    import torch

    from qtulu.plan.measure import build_real_step
    from qtulu.plan.step import run_step

    gc.collect()  # the previous setting's model (peft keeps reference cycles) must be gone
    torch.cuda.empty_cache()
    model, optimizer, batches, kw = build_real_step(settings, stack=stack, config=config, device="cuda")
    run_step(model, optimizer, batches, **kw)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t = time.time()
    run_step(model, optimizer, batches, **kw)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated(), time.time() - t


def main(argv=None) -> int:
    p = harness.parser(__doc__)
    p.add_argument("--shape", default="small", help="small (CPU default), tiny, or a built-in LLaMA shape")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--loss-chunk-size", type=int, default=None,
                   help="train.loss_chunk_size for the loss row (default 1024 on CPU, where TRL's torch fold keeps "
                        "several fp32 copies of a tile, 8192 on CUDA, where its Triton fold works in place)")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--smoke", action="store_true", help="tiny shape, 256 tokens")
    p.add_argument("--only", help="comma-separated setting keys: " + ", ".join(list(SETTINGS) + list(CUDA_SETTINGS)))
    p.add_argument("--fast-plan", action="store_true",
                   help="plan 2 and 3 layers and extrapolate to the full depth (exact for identical layers; "
                        "tests/plan/test_plan.py checks it) instead of planning every layer")
    args = p.parse_args(argv)
    if args.smoke:
        args.shape, args.seq_len = "tiny", 256
    chunk = args.loss_chunk_size or (8192 if args.device == "cuda" else 1024)

    import warnings

    import torch

    from qtulu.plan import PlanSettings, plan_step
    from qtulu.plan.measure import measure_step

    warnings.filterwarnings("ignore")
    torch.set_num_threads(max(1, torch.get_num_threads()))
    config = _config(args)
    cuda = args.device == "cuda"
    base = PlanSettings(shape=None, config=None, seq_len=args.seq_len, lora_r=args.rank, accumulation=2,
                        device=args.device, compute_dtype="bfloat16" if cuda else "float32",
                        optimizer="paged_adamw_8bit" if cuda else "adamw_torch")
    settings = dict(SETTINGS)
    if cuda:
        settings.pop("8bit")  # the GPU default is paged 8-bit AdamW already
        settings.update(CUDA_SETTINGS)
    if args.only:
        keys = [k.strip() for k in args.only.split(",") if k.strip()]
        unknown = [k for k in keys if k not in settings]
        if unknown:
            p.error(f"--only: unknown setting(s) {unknown}; known: {', '.join(settings)}")
        settings = {k: settings[k] for k in keys}
    rows = []
    for name, stack, changes in settings.values():
        if "loss_chunk_size" in changes:
            changes = {**changes, "loss_chunk_size": chunk}
            name = name.replace("8192", str(chunk))
        s = base.replace(**changes)
        if stack == "hf":
            s = s.hf_baseline()
        t = time.time()
        if cuda:
            measured, step_s = _cuda_measure(s, stack, config)
        else:
            m = measure_step(s, stack=stack, config=config)
            measured, step_s = m.peak_bytes, time.time() - t
        if args.fast_plan:
            from qtulu.plan.search import estimate, with_layers

            planned = plan_step(s, stack=stack, config=with_layers(config, min(3, int(config.num_hidden_layers))))
            for k, v in estimate(s, config, stack=stack).items():  # the breakdown stays the 3-layer one
                setattr(planned, k, v)
        else:
            planned = plan_step(s, stack=stack, config=config)
        # bitsandbytes' paged states live in CUDA unified memory (cudaMallocManaged), which
        # torch.cuda.max_memory_allocated does not see: compare the allocator's share of the plan
        comparable = planned.peak_bytes - (planned.paged_bytes if cuda else 0)
        rows.append({"setting": name, "stack": stack, "changes": changes, "measured_peak_bytes": int(measured),
                     "planned_peak_bytes": planned.peak_bytes, "planned_paged_bytes": planned.paged_bytes,
                     "planned_over_measured": comparable / measured,
                     "planned_breakdown": planned.breakdown, "plan_seconds": round(planned.seconds, 1),
                     "seconds": round(step_s, 1)})
        print(f"  {name}: measured {measured / 1e6:.1f} MB, planned {planned.peak_bytes / 1e6:.1f} MB", file=sys.stderr)
    ref = rows[0]["measured_peak_bytes"]
    what = ("torch.cuda.max_memory_allocated (planned: without bitsandbytes' paged states)" if cuda
            else "CPU allocator (torch.profiler)")
    text = harness.table(
        ["setting", "measured MB", "planned MB", "plan/meas", "vs defaults"],
        [[r["setting"], r["measured_peak_bytes"] / 1e6,
          (r["planned_peak_bytes"] - (r["planned_paged_bytes"] if cuda else 0)) / 1e6,
          r["planned_over_measured"], r["measured_peak_bytes"] / ref] for r in rows],
        ["", ".1f", ".1f", ".3f", ".3f"])
    head = (f"model: {getattr(config, '_name_or_path', '')}, {args.seq_len} tokens x 2 micro-batches, "
            f"LoRA r {args.rank}, device {args.device}; measured: {what}")
    return harness.finish({"bench": "memory", "device": args.device, "model": getattr(config, "_name_or_path", ""),
                           "seq_len": args.seq_len, "rank": args.rank, "torch": torch.__version__,
                           "date": time.strftime("%Y-%m-%d"), "results": rows},
                          head + "\n" + text, args.record, title="Memory switches: measured vs planned")


if __name__ == "__main__":
    raise SystemExit(main())
