"""`qtulu merge`: combine adapters into a new adapter (linear / ties / dare / cat, `qtulu.adapters.merge`),
or with ``--full`` into a released model (`qtulu.adapters.export`). Arguments, adapters and the
base's files are checked before the base is loaded (`qtulu.preflight`)."""

from __future__ import annotations

import argparse

from qtulu.adapters.merge import _NEEDS_DENSITY, METHODS, MergeError, combine_adapters, default_weights, merge_report

def register(subparsers) -> None:
    p = subparsers.add_parser(
        "merge",
        help="combine adapters into a new adapter, or (--full) into a released model",
        description=(
            "Combine LoRA adapters (linear|ties|dare_linear|dare_ties|cat) into a new adapter dir, or with "
            "--full merge them into the base: each NF4 base weight is dequantized (the weights the adapter "
            "trained against), the LoRA delta added in fp32, and safetensors shards + index + config + "
            "tokenizer written, one layer at a time."
        ),
    )
    p.add_argument("--model", required=True, help="base model dir (safetensors) the adapters were trained on")
    p.add_argument("--adapter", action="append", required=True, help="adapter dir or NAME=DIR (repeatable)")
    p.add_argument("--method", choices=METHODS, default="linear")
    p.add_argument("--weights", type=float, nargs="+", default=None, help="one weight per adapter")
    p.add_argument("--density", type=float, default=None, help="fraction kept (ties, dare_*)")
    p.add_argument("--rank", type=int, default=None, help="SVD rank for ties/dare_* (default: sum of ranks)")
    p.add_argument("--seed", type=int, default=0, help="seed for DARE's random drop")
    p.add_argument("--out", required=True, help="output dir (new adapter, or merged model with --full)")
    p.add_argument("--full", action="store_true", help="write a merged model instead of an adapter")
    p.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16",
                   help="dtype of the merged model's weights (--full)")
    p.add_argument("--quantize", choices=("nf4",), default=None,
                   help="(--full) also re-quantize the merged weights to NF4 and report the error it adds")
    p.add_argument("--no-measure", action="store_true",
                   help="(--quantize nf4) skip measuring the logit error against base + adapter")
    p.add_argument("--max-shard-size", default="5GB", help="(--full) shard size, e.g. 2GB, 500MB")
    p.add_argument("--trained-on", choices=("nf4", "bf16", "fp16", "fp32"), default=None,
                   help="what the adapters were trained against: required for plain PEFT adapters (no qtulu.json); "
                        "--full gives dequant(NF4(W)) + BA for nf4, W + BA for a float dtype")
    p.add_argument("--no-quantize-base", action="store_true",
                   help="load the base unquantized (default: as the adapters were trained)")
    p.add_argument("--compute-dtype", default=None, choices=("bfloat16", "float16", "float32"),
                   help="base compute dtype (default: the one the first adapter was trained with)")
    p.add_argument("--force", action="store_true", help="load adapters recorded for another base/quantization")
    p.add_argument("--overwrite", action="store_true",
                   help="write to a non-empty --out that is not a qtulu adapter (merged model with --full)")
    p.set_defaults(func=_main)


def check_arguments(args: argparse.Namespace, n_adapters: int) -> None:
    """The merge request's own consistency, checked before anything is loaded (`MergeError`)."""
    import math
    from pathlib import Path

    if not (args.full and n_adapters == 1) and n_adapters < 2:
        raise MergeError("combining needs at least two --adapter (one adapter: use --full to export it)")
    if args.weights is not None and len(args.weights) != n_adapters:
        raise MergeError(f"--weights: {len(args.weights)} weights for {n_adapters} adapters")
    if args.weights is not None and not all(math.isfinite(w) and abs(w) <= 1e6 for w in args.weights):
        # a huge weight scales the merged factors past what the compute dtype holds
        raise MergeError(f"--weights: {args.weights}: each weight must be finite and at most 1e6 in size")
    if n_adapters > 1 and args.method in _NEEDS_DENSITY:
        if args.density is None:
            raise MergeError(f"method {args.method!r} needs a density: --density (fraction of each delta kept, in (0, 1])")
        if not 0.0 < args.density <= 1.0:
            raise MergeError(f"--density must be in (0, 1], got {args.density}")
    if args.rank is not None and args.rank < 1:
        raise MergeError(f"--rank must be >= 1, got {args.rank}")
    if args.quantize and not args.full:
        raise MergeError("--quantize applies to --full (a merged model); an adapter stays as trained")
    if Path(args.out).is_file():
        raise MergeError(f"--out {args.out}: is a file (a directory is written there)")


def check_merge_output(args: argparse.Namespace, specs) -> None:
    """--out is none of the inputs (base, adapters), not inside one, holds none, and is empty, new or an
    earlier output of the same kind unless --overwrite (`qtulu.files.check_output`)."""
    from qtulu.files import check_output

    inputs = [("base model", args.model), *[("adapter", p) for _, p in specs]]
    check_output(args.out, kind="model" if args.full else "adapter", inputs=inputs,
                 overwrite=getattr(args, "overwrite", False))


def merged_name(out) -> str | None:
    """The merged adapter's name: its directory's name, when that can name an adapter."""
    from pathlib import Path

    from qtulu.adapters.store import adapter_name_problem

    name = Path(out).resolve().name
    return name if adapter_name_problem(name) is None else None


def merge_summary(report: dict, names: list[str], weights, density, rank: int | None, out) -> str:
    """What `merge_report` measured, in words: the method, the layers, the relative error of the
    merged update against the method's own full-rank result and whether that size is expected."""
    method, layers = report["method"], report.get("layers")
    how = f"weights {', '.join(f'{w:g}' for w in weights)}" + (f", density {density:g}" if density is not None else "")
    lines = [f"merged {len(names)} adapters ({', '.join(names)}) with {method} ({how}) -> {out}"]
    err_max, err_mean = report.get("rel_error_max"), report.get("rel_error_mean")
    if err_max is None:
        lines.append(f"  {method}: DARE drops entries at random (seeded), so there is no fixed result to compare the "
                     "merge with; judge it by its evals (qtulu eval)")
        return "\n".join(lines)
    def pct(x: float) -> str:
        return f"{x:.2%}" if x >= 1e-4 else f"{x:.1e}"

    lines.append(f"  {layers} LoRA layers; relative error of the merged update vs the full-rank {method} result: "
                 f"max {pct(err_max)}, mean {pct(err_mean)}")
    if report.get("exact"):
        meaning = ("exact: the adapters' ranks are stacked, so the merged update is their weighted sum up to float "
                   "rounding" if err_max < 1e-4 else
                   "should be float rounding (< 0.01%) for an exact method: this merge is not what it claims")
    else:
        meaning = (f"the merged adapter is a rank-{rank} truncated SVD of the {method} "
                   "combination; the error is that truncation, expected for ties/dare (TIES' trimmed, sign-elected "
                   "sum is not low-rank) and not a fault: judge the merge by its evals (qtulu eval), or raise --rank")
    lines.append(f"  what it means: {meaning}")
    return "\n".join(lines)


def _main(args: argparse.Namespace) -> int:
    import json
    import tempfile
    from pathlib import Path

    from qtulu.adapters.store import AUTO, load_model, parse_adapter_spec, save_adapter
    from qtulu.preflight import check_before_load

    specs = [parse_adapter_spec(a) for a in args.adapter]
    check_arguments(args, len(specs))  # before torch is imported (qtulu.adapters.export imports it)
    from qtulu.adapters.export import parse_size

    parse_size(args.max_shard_size)
    # adapters (readable, base precision known: --trained-on) and base files, before the base is loaded
    check_before_load(args.model, args.adapter, args.trained_on)
    check_merge_output(args, specs)
    quantize = None if args.no_quantize_base else AUTO
    if args.full and len(specs) == 1:
        from qtulu.adapters.export import export_merged

        result = export_merged(
            args.model, specs[0][1], args.out, dtype=args.dtype, quantize=args.quantize,
            max_shard_size=args.max_shard_size, force=args.force, compute_dtype=args.compute_dtype,
            measure=not args.no_measure, trained_on=args.trained_on,
        )
        print(json.dumps(result, default=str))
        return 0
    model, _tok = load_model(
        args.model, [(n, str(p)) for n, p in specs], quantize=quantize, force=args.force,
        compute_dtype=args.compute_dtype, device="cpu", attn_implementation=None, trained_on=args.trained_on,
    )
    names = [n for n, _ in specs]
    new = combine_adapters(
        model, names, args.method, args.weights, args.density, new_name="merged", rank=args.rank, seed=args.seed
    )
    report = merge_report(model, names, args.method, args.weights, args.density, new)
    from qtulu.model.load import base_info

    extra = {
        "merge": {
            "method": args.method,
            "weights": args.weights or default_weights(args.method, len(names)),
            "density": args.density,
            "seed": args.seed,
            "sources": {n: str(p) for n, p in specs},
            "report": report,
        }
    }
    info = base_info(model.get_base_model())
    summary = merge_summary(report, names, extra["merge"]["weights"], args.density,
                            getattr(model.peft_config.get(new), "r", None), args.out)
    if not args.full:
        out = save_adapter(model, args.out, adapter_name=new, base_info=info, extra=extra, name=merged_name(args.out))
        print(summary)
        print(json.dumps({"adapter": str(out), **report}))
        return 0
    from qtulu.adapters.export import export_merged

    with tempfile.TemporaryDirectory(dir=Path(args.out).resolve().parent) as tmp:
        adir = save_adapter(model, Path(tmp) / "merged", adapter_name=new, base_info=info, extra=extra)
        del model
        result = export_merged(
            args.model, adir, args.out, dtype=args.dtype, quantize=args.quantize,
            max_shard_size=args.max_shard_size, force=args.force, compute_dtype=args.compute_dtype,
            measure=not args.no_measure,
        )
    print(summary)
    print(json.dumps({**result, "combine": report}, default=str))
    return 0
