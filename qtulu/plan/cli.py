"""`qtulu plan RECIPE|--shape NAME`: the peak memory of one training step, before renting the GPU.

Runs the real step (see `qtulu.plan`) on fake tensors and prints the breakdown at the peak, the
floor (the physical minimum), the host side of a plan that offloads (pinned and pageable bytes, the
CPU optimizer step measured here: ZeRO-Offload), the largest transient buffers, and, last, one JSON
line (``peak_bytes``, ``settings``, ... and, with ``--compare-hf``, ``hf_peak_bytes`` for HF as TRL's
SFTTrainer sets it up with bf16 adapters, ``hf_float32_adapters_peak_bytes``, and each difference).
Per-layer progress goes to stderr. ``--optimize`` tries the memory switches that keep the
maths (`qtulu.plan.settings.REDUCTIONS`), keeps each one that lowers the peak, prints the chosen
settings as recipe overrides and plans them in full. ``--plot PNG`` draws the breakdown.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from qtulu.plan.errors import PlanError


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "plan",
        help="plan the peak GPU memory of a training step (no GPU needed)",
        description="Plan the memory of one optimizer step of RECIPE (or of a built-in shape / an HF config) by "
                    "running the real step on fake tensors; prints the breakdown and a final JSON line.",
    )
    p.add_argument("recipe", nargs="?", help="recipe name or YAML path (default: the recipe defaults)")
    p.add_argument("--set", "-o", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe key (as for qtulu train), repeatable")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--shape", help="built-in shape: llama-7b, llama-13b, llama-30b, llama-65b (or 7b ... 65b), tiny")
    src.add_argument("--config", help="an HF config: config.json, model directory or hub id (config only)")
    p.add_argument("--seq-len", type=int, help="tokens per packed row (default: recipe data.max_seq_len)")
    p.add_argument("--micro-batch-size", type=int, help="packed rows per micro-batch")
    p.add_argument("--examples-per-row", type=int, help="examples packed in a row (attention boundaries)")
    p.add_argument("--accumulation", type=int, help="micro-batches planned per optimizer step (default 2: "
                   "the second one runs with the gradients of the first alive)")
    p.add_argument("--rank", type=int, help="LoRA rank r")
    p.add_argument("--alpha", type=int, help="LoRA alpha")
    p.add_argument("--dropout", type=float, help="LoRA dropout")
    p.add_argument("--target-modules", help="LoRA targets (all-linear or comma-separated names)")
    p.add_argument("--optimizer", help="HF optimizer name, e.g. paged_adamw_8bit, adamw_8bit, adamw_torch")
    p.add_argument("--compute-dtype", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                   help="plan the GPU step (default) or this machine's CPU step")
    p.add_argument("--no-gradient-checkpointing", action="store_true")
    p.add_argument("--dropout-impl", choices=["peft", "recompute"], help="recipe lora.dropout_impl")
    p.add_argument("--loss-chunk-size", type=int, help="recipe train.loss_chunk_size (vocabulary columns per tile)")
    p.add_argument("--activation-offload", action=argparse.BooleanOptionalAction, default=None,
                   help="recipe train.activation_offload")
    p.add_argument("--optimize", action="store_true", help="pick the memory switches that keep the maths")
    p.add_argument("--compare-hf", action="store_true",
                   help="also plan transformers+peft+bitsandbytes as TRL's SFTTrainer sets them up (bf16 and fp32 "
                        "adapters) and name each difference")
    p.add_argument("--plot", metavar="PNG", help="write the breakdown as a PNG")
    p.add_argument("--gpus", type=int, metavar="N",
                   help="also the per-rank peak of FSDP2 on N GPUs (train.fsdp full_shard and shard_grad_op; "
                        "qtulu.plan.fsdp)")
    p.set_defaults(func=_cli)


def settings_from_args(args: argparse.Namespace):
    from qtulu.plan.settings import PlanSettings
    from qtulu.recipes import load_recipe, recipe_from_dict

    if args.recipe:
        recipe = load_recipe(args.recipe, args.overrides)
    else:
        recipe = recipe_from_dict({"name": "defaults", "sources": [{"name": "none", "format": "messages",
                                                                     "path": "unused.jsonl"}]}, args.overrides)
    targets = args.target_modules
    if targets is not None and targets != "all-linear":
        targets = [t.strip() for t in targets.split(",") if t.strip()]
    over: dict[str, Any] = dict(
        seq_len=args.seq_len, micro_batch_size=args.micro_batch_size, examples_per_row=args.examples_per_row,
        accumulation=args.accumulation, lora_r=args.rank, lora_alpha=args.alpha, lora_dropout=args.dropout,
        target_modules=targets, optimizer=args.optimizer, compute_dtype=args.compute_dtype, device=args.device,
        lora_dropout_impl=args.dropout_impl, loss_chunk_size=args.loss_chunk_size,
        activation_offload=args.activation_offload,
    )
    if args.no_gradient_checkpointing:
        over["gradient_checkpointing"] = False
    s = PlanSettings.from_recipe(recipe, **over)
    if args.shape or args.config:
        s = s.replace(shape=args.shape, config=args.config)
    elif s.config is None:
        raise PlanError(f"{args.recipe or 'the recipe defaults'}: model.base is not set: give --shape NAME or --config PATH")
    validate(s)
    return s


def validate(s) -> None:
    """Refuse impossible settings before any model is built (the message names the flag)."""
    from transformers.training_args import OptimizerNames

    for name, value in (("--seq-len", s.seq_len), ("--micro-batch-size", s.micro_batch_size),
                        ("--examples-per-row", s.examples_per_row), ("--accumulation", s.accumulation),
                        ("--rank", s.lora_r)):
        if value is None or int(value) < 1:
            raise PlanError(f"{name} must be a positive integer, got {value}")
    if s.examples_per_row * s.micro_batch_size > s.tokens:
        raise PlanError(f"--examples-per-row {s.examples_per_row}: more examples than tokens in a row")
    if s.loss_chunk_size is not None and s.loss_chunk_size < 1:
        raise PlanError(f"--loss-chunk-size must be positive, got {s.loss_chunk_size}")
    if not 0 <= s.lora_dropout < 1:
        raise PlanError(f"--dropout must be in [0, 1), got {s.lora_dropout}")
    try:
        OptimizerNames(s.optimizer)
    except ValueError:
        raise PlanError(f"--optimizer {s.optimizer!r} is not an HF optimizer name (e.g. paged_adamw_8bit, "
                        "adamw_8bit, adamw_torch)") from None
    if s.activation_offload and not s.gradient_checkpointing:
        raise PlanError("--activation-offload offloads the checkpointed layer inputs: it needs gradient checkpointing")


def _cli(args: argparse.Namespace) -> int:
    from qtulu.plan import optimize, plan_step, resolve_config
    from qtulu.plan.report import json_line, plot, summary, table

    s = settings_from_args(args)
    if args.gpus is not None and args.gpus < 2:
        raise PlanError(f"--gpus must be at least 2 (FSDP2 shards across ranks), got {args.gpus}")
    config = resolve_config(s.shape, s.config, seq_len=s.seq_len)
    layers = getattr(config, "num_hidden_layers", "?")
    _say(f"planning {getattr(config, '_name_or_path', '') or 'the model'} ({layers} layers), {s.tokens} tokens per "
         f"micro-batch, {s.device} semantics: every op of the step runs on fake tensors (minutes for 65B)")
    chosen = None
    if args.optimize:
        s, chosen = optimize(s, config, log=_say)
        _say("chosen: " + ", ".join(f"{k}={v}" for k, v in chosen["switches"].items()))
    result = plan_step(s, config=config, progress=_say)
    if s.master_weights == "host":  # the optimizer step moves to the CPU: measure it here
        from qtulu.plan.host import cpu_optimizer_time

        result.cpu_optimizer = cpu_optimizer_time(s.optimizer, result.host["lora_params"],
                                                  learning_rate=s.learning_rate)
    hf, diffs, setup = None, None, ""
    if args.compare_hf:
        import trl

        from qtulu.plan.models import HF_SETUP, hf_differences

        hf = [plan_step(s.hf_baseline(dt), stack="hf", config=config, progress=_say) for dt in ("bfloat16", "float32")]
        diffs, setup = hf_differences(s), HF_SETUP.format(trl=trl.__version__)
    print(table(result, hf, differences=diffs, setup=setup))
    if chosen is not None:
        print("recipe overrides: " + " ".join(f"--set {o}" for o in s.recipe_overrides()))
    if args.plot:
        print(f"plot: {plot(args.plot, result, hf)}")
    line = summary(result, hf, optimized=chosen, differences=diffs, setup=setup)
    if args.gpus:
        from qtulu.plan.fsdp import MODES, per_rank

        ranks = {m: per_rank(result.breakdown, result.units, args.gpus, m) for m in MODES}
        for m, r in ranks.items():
            parts = ", ".join(f"{k} {v / 1e9:.2f}" for k, v in r.breakdown.items() if v)
            print(f"FSDP2 {m} on {args.gpus} GPUs: {r.peak_bytes / 1e9:.2f} GB per rank ({parts})")
        line["fsdp"] = {"gpus": args.gpus, **{m: r.to_dict() for m, r in ranks.items()}}
    print(json_line(line))
    return 0


def _say(msg: str) -> None:
    print(f"[qtulu plan] {msg}", file=sys.stderr, flush=True)
