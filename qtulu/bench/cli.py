"""The ``qtulu bench`` command (``qtulu bench e2e ...``); the logic lives in ``e2e.py``."""

from __future__ import annotations

import argparse
import json
import sys

SHAPE_NAMES = ("llama-7b", "llama-13b", "llama-30b", "llama-65b", "tiny")
CONFIG_NAMES = ("qtulu", "qtulu-no-nf4-kernel", "qtulu-no-varlen", "baseline")


def _configs(text: str) -> list[str]:
    names = [c.strip() for c in text.split(",") if c.strip()]
    bad = [c for c in names if c not in CONFIG_NAMES]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"unknown configuration(s) {bad}; choose from {', '.join(CONFIG_NAMES)}")
    return names


def register(subparsers) -> None:
    p = subparsers.add_parser("bench", help="benchmarks: `qtulu bench e2e` (QLoRA training vs HF+peft+bnb)")
    sub = p.add_subparsers(dest="bench_command", metavar="BENCH")
    e = sub.add_parser(
        "e2e",
        help="end-to-end QLoRA training throughput and memory, qtulu vs transformers+peft+bitsandbytes",
        description="Builds each shape with random NF4 weights layer by layer, runs the same packed real-data "
        "steps with each configuration in its own process, prints a table and a final JSON line.",
    )
    e.add_argument("--shape", nargs="+", default=["tiny"], choices=SHAPE_NAMES, help="one or more shapes")
    e.add_argument("--seq-len", type=int, default=2048, help="packed row length in tokens (default 2048)")
    e.add_argument("--steps", type=int, default=None, help="timed optimizer steps (default 10 on GPU, 2 on CPU)")
    e.add_argument(
        "--warmup", type=int, default=None,
        help="untimed steps first, replaying the timed rows so kernels are compiled/tuned for their shapes "
        "(default: --steps on GPU, 1 on CPU)",
    )
    e.add_argument("--configs", type=_configs, default=list(CONFIG_NAMES), help="comma-separated subset of " + ",".join(CONFIG_NAMES))
    e.add_argument("--device", default="auto", help="auto (cuda if present), cuda, cuda:N or cpu")
    e.add_argument("--dtype", default="auto", choices=("auto", "bfloat16", "float16", "float32"), help="compute dtype (auto: bf16 on GPU, fp32 on CPU)")
    e.add_argument("--recipe", default=None,
                   help="recipe (name or YAML) whose examples give the document lengths, built by the data pipeline "
                        "(any source format); default tests/fixtures/shared_sources.yaml (../shared/data/sources)")
    e.add_argument("--set", "-o", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a key of --recipe, e.g. -o sources.lima.count=500 (repeatable)")
    e.add_argument("--tokenizer", default=None,
                   help="tokenizer for the lengths (default: the recipe's data.tokenizer)")
    e.add_argument("--lengths-file", default=None, help="use these document lengths instead (JSON list or one per line)")
    e.add_argument("--max-docs", type=int, default=None, help="tokenize only this many documents")
    e.add_argument("--lora-r", type=int, default=64)
    e.add_argument("--lora-alpha", type=int, default=16)
    e.add_argument("--lora-dropout", type=float, default=0.1)
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--peak-tflops", type=float, default=None, help="device bf16 peak for MFU (default: looked up by GPU name)")
    e.add_argument("--out-dir", default=None, help="results.json, chart and per-config files (default: a new temp dir)")
    e.add_argument("--overwrite", action="store_true", help="write into a non-empty --out-dir that is not a benchmark output")
    e.add_argument("--no-chart", action="store_true", help="skip the PNG chart")
    e.add_argument("--record", action="store_true", help="append a dated section to docs/benchmarks.md (and copy the chart to docs/img)")
    e.add_argument("--docs", default=None, help="file to --record into (default docs/benchmarks.md of the repo)")
    e.add_argument("--timeout", type=float, default=None, help="seconds per configuration before it is killed")
    e.add_argument("--progress", action="store_true", help="progress bar while quantizing layers")
    e.add_argument("--threads", type=int, default=None, help="torch CPU threads per configuration (default: torch's)")
    e.add_argument(
        "--optimizer", default="adamw", choices=("adamw", "adamw_8bit"),
        help="for every stack: torch AdamW (default) or bitsandbytes 8-bit AdamW (non-paged, so its memory is counted)",
    )
    e.add_argument("--build-only", action="store_true", help="only build each model (4-bit, layer by layer) and report its memory")
    e.set_defaults(func=run_e2e_command)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])


def run_e2e_command(args) -> int:
    import torch

    from qtulu.bench.e2e import command_line, run_e2e

    gpu = args.device.startswith("cuda") or (args.device == "auto" and torch.cuda.is_available())
    steps = args.steps if args.steps is not None else (10 if gpu else 2)
    warmup = args.warmup if args.warmup is not None else (steps if gpu else 1)
    summary = run_e2e(
        args.shape,
        seq_len=args.seq_len,
        steps=steps,
        warmup=warmup,
        configs=args.configs,
        device=args.device,
        dtype=args.dtype,
        lengths_file=args.lengths_file,
        recipe=args.recipe,
        overrides=args.overrides,
        tokenizer=args.tokenizer,
        max_docs=args.max_docs,
        lora={"r": args.lora_r, "alpha": args.lora_alpha, "dropout": args.lora_dropout},
        seed=args.seed,
        peak_tflops=args.peak_tflops,
        out_dir=_checked_out_dir(args),
        chart=not args.no_chart,
        record=args.record,
        docs_path=args.docs,
        command=command_line(),
        timeout=args.timeout,
        progress=args.progress,
        threads=args.threads,
        build_only=args.build_only,
        optimizer=args.optimizer,
    )
    return emit(summary)


def emit(summary: dict, out=None) -> int:
    """Print the table, where the files are, and the summary as the final JSON line; the exit code
    is 0 when every configuration ran or ran out of GPU memory (a result), 1 otherwise."""
    from qtulu.bench.report import format_table

    out = out or sys.stdout
    print(file=out)
    print(format_table(summary["results"]), file=out)
    where = f"results: {summary['out_dir']}/results.json"
    if summary.get("chart"):
        where += f"  chart: {summary['chart']}"
    print("\n" + where, file=out)
    if summary.get("recorded"):
        print(f"recorded in {summary['recorded']}", file=out)
    print(json.dumps(summary), file=out)
    out.flush()
    return 0 if all(r["status"] in ("ok", "oom") for r in summary["results"]) else 1


def _checked_out_dir(args):
    """--out-dir, refused when it would write over the recipe, the lengths file or a foreign folder."""
    if args.out_dir is None:
        return None
    from qtulu.files import check_output

    return check_output(args.out_dir, kind="bench", overwrite=args.overwrite, flag="--out-dir",
                        inputs=[("recipe", args.recipe), ("lengths file", args.lengths_file), ("tokenizer", args.tokenizer)])
