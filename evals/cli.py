"""``qtulu eval``: run the suite, re-score saved predictions, or search merges.

    qtulu eval --model BASE [--adapter DIR ...] [--include-base] --tasks mmlu,gsm8k --data-dir DIR --out DIR
    qtulu eval score --task gsm8k --predictions OUT/label/gsm8k/predictions.jsonl [--data-dir DIR]
    qtulu eval merge-search --model BASE --adapter A --adapter B --tasks mmlu,gsm8k --data-dir DIR --out DIR
"""

from __future__ import annotations

import argparse
import json
import sys


def _common(p: argparse.ArgumentParser, *, tasks_required: bool) -> None:
    p.add_argument("--data-dir", help="eval data root (mmlu/, gsm/, bbh/, ...; see docs)")
    p.add_argument("--allow-code-execution", action="store_true",
                   help="run model-written code (codex_humaneval) in the sandbox; refused otherwise")
    p.add_argument("--unsafe-no-isolation", action="store_true",
                   help="where the sandbox cannot isolate code (not root), run it anyway, unisolated")
    p.add_argument("--judge-url", help="OpenAI-compatible chat endpoint (alpaca_eval, truthfulqa_gen)")
    p.add_argument("--judge-model", help="model name at the judge endpoint")
    p.add_argument("--judge-api-key-env", default="OPENAI_API_KEY", help="env var holding the judge's API key")
    p.add_argument("--toxigen-classifier", help="toxicity classifier path or hub id (toxigen)")
    p.add_argument("--workers", type=int, default=None, help="sandbox workers (default: CPU count)")


def _profile_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--profile", choices=("open_instruct", "corrected"), default="open_instruct",
                   help="open_instruct (default): open-instruct's Tulu-1 evaluation, the paper's numbers; "
                        "corrected: its mistakes fixed (see each task's docstring)")


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="base model dir (safetensors) or hub id")
    p.add_argument("--adapter", action="append", default=[], help="adapter dir or NAME=DIR (repeatable)")
    p.add_argument("--quantize", choices=("nf4", "none"), default=None,
                   help="load the base in NF4 or not (default: as the adapters were trained; NF4 without adapters)")
    p.add_argument("--trained-on", choices=("nf4", "bf16", "fp16", "fp32"), default=None,
                   help="what the adapters were trained against (required for plain PEFT adapters, no qtulu.json)")
    p.add_argument("--force", action="store_true", help="load adapters recorded for another base")
    p.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default=None,
                   help="compute dtype of the base (default: the adapter's, else bfloat16)")
    p.add_argument("--tasks", help="comma-separated task names, or 'all' (see `qtulu eval --list-tasks`)")
    p.add_argument("--out", help="output dir")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--limit", type=int, default=None,
                   help="examples per subject/task/language/group (per task where it has none)")
    p.add_argument("--chat-format", choices=("tulu", "tokenizer", "none"), default="tulu",
                   help="prompt format: tulu (tuned models), tokenizer (its chat template), none (base models)")
    p.add_argument("--task-option", action="append", default=[], metavar="TASK.KEY=VALUE",
                   help="per-task option, value YAML-parsed, e.g. mmlu.subjects=[anatomy] (repeatable)")


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "eval", help="evaluate a base and its adapters on the Tulu suite", allow_abbrev=False,
        description="Evaluate a base model and adapters on the Tulu suite; `score` re-scores predictions; "
                    "`merge-search` picks the best merge of adapters by the suite.")
    _model_args(p)
    _common(p, tasks_required=True)
    _profile_arg(p)
    p.add_argument("--include-base", action="store_true", help="also evaluate the base (adapters disabled)")
    p.add_argument("--list-tasks", action="store_true", help="print the task names and versions, then exit")
    p.set_defaults(func=_run)
    sub = p.add_subparsers(dest="eval_command", metavar="{score,merge-search}")

    s = sub.add_parser("score", help="re-score saved predictions.jsonl")
    s.add_argument("--task", required=True)
    s.add_argument("--predictions", required=True)
    s.add_argument("--out", help="write the metrics JSON here (default: print only)")
    s.add_argument("--task-option", action="append", default=[], metavar="KEY=VALUE")
    _profile_arg(s)
    _common(s, tasks_required=False)
    s.set_defaults(func=_score)

    m = sub.add_parser("merge-search", help="evaluate candidate merges of adapters; save the best")
    _model_args(m)
    _common(m, tasks_required=True)
    m.add_argument("--methods", default="linear,ties,dare_linear,dare_ties,cat")
    m.add_argument("--weights", action="append", default=None, metavar="W1,W2,...",
                   help="a weight vector to try (repeatable; default: a small grid per method)")
    m.add_argument("--densities", default="0.5", help="comma-separated densities for ties/dare_*")
    m.add_argument("--seed", type=int, default=0)
    m.set_defaults(func=_merge_search, limit_default=20)


def _clean_errors(fn):
    """Known user errors print one line naming the problem (exit 2) instead of a traceback."""
    import functools

    @functools.wraps(fn)
    def wrapper(args) -> int:
        from .judge import JudgeError, JudgeNotConfigured
        from .sandbox import CodeExecutionRefused
        from .tasks._common import TaskDataError
        from .tasks.toxigen import ClassifierNotConfigured

        known: tuple = (CodeExecutionRefused, JudgeNotConfigured, JudgeError, ClassifierNotConfigured,
                        TaskDataError, KeyError, ValueError)
        try:
            from qtulu.adapters import AdapterError

            known += (AdapterError,)
        except ImportError:
            pass
        try:
            return fn(args)
        except known as e:
            if getattr(args, "debug", False):
                raise
            msg = e.args[0] if isinstance(e, KeyError) and e.args else e
            print(f"qtulu eval: error: {msg}", file=sys.stderr)
            return 2

    return wrapper


def _yaml_value(text: str):
    import yaml

    return yaml.safe_load(text)


def _task_options(items: list[str], *, prefixed: bool = True) -> dict:
    out: dict = {}
    for item in items:
        if "=" not in item:
            raise SystemExit(f"qtulu eval: error: --task-option {item!r}: expected {'TASK.' if prefixed else ''}KEY=VALUE")
        key, value = item.split("=", 1)
        if prefixed:
            if "." not in key:
                raise SystemExit(f"qtulu eval: error: --task-option {item!r}: expected TASK.KEY=VALUE")
            task, key = key.split(".", 1)
            out.setdefault(task, {})[key] = _yaml_value(value)
        else:
            out[key] = _yaml_value(value)
    return out


def _judge(args):
    if args.judge_url or args.judge_model:
        if not (args.judge_url and args.judge_model):
            raise SystemExit("qtulu eval: error: give both --judge-url and --judge-model")
        from .judge import Judge

        return Judge(args.judge_url, args.judge_model, api_key_env=args.judge_api_key_env)
    return None


def _load(args):
    from qtulu.adapters import load_model, parse_adapter_spec

    if not args.model:
        raise SystemExit("qtulu eval: error: --model is required")
    specs = [parse_adapter_spec(a) for a in args.adapter]
    model, tok = load_model(args.model, [(n, str(p)) for n, p in specs],
                            quantize={None: "auto", "none": None}.get(args.quantize, args.quantize), force=args.force,
                            compute_dtype=args.dtype, trained_on=args.trained_on)
    return model, tok, [n for n, _ in specs]


def _require(args, *names):
    missing = [f"--{n.replace('_', '-')}" for n in names if not getattr(args, n)]
    if missing:
        raise SystemExit(f"qtulu eval: error: missing {' '.join(missing)}")


@_clean_errors
def _run(args) -> int:
    from .tasks import TASKS, get_task

    if args.list_tasks:
        for name in TASKS:
            print(f"{name}\tv{get_task(name).version}")
        return 0
    _require(args, "model", "tasks", "data_dir", "out")
    from .runner import check_requirements, evaluate
    from .tasks import parse_task_list

    names = parse_task_list(args.tasks)
    judge = _judge(args)
    # refuse before loading weights when a task lacks its judge/classifier/opt-in
    check_requirements(names, judge=judge, classifier=args.toxigen_classifier,
                       allow_code_execution=args.allow_code_execution, unsafe_no_isolation=args.unsafe_no_isolation)
    model, tok, adapter_names = _load(args)
    labels = (["base"] if args.include_base else []) + adapter_names
    if args.include_base and not adapter_names:
        raise SystemExit("qtulu eval: error: --include-base needs at least one --adapter")
    from pathlib import Path

    results = evaluate(
        model, tok, names, data_dir=args.data_dir, out_dir=args.out, adapters=labels or None,
        batch_size=args.batch_size, limit=args.limit,
        chat_format=None if args.chat_format == "none" else args.chat_format, judge=judge,
        classifier=args.toxigen_classifier, allow_code_execution=args.allow_code_execution, workers=args.workers,
        unsafe_no_isolation=args.unsafe_no_isolation, task_options=_task_options(args.task_option),
        model_name=Path(args.model).name or "model", profile=args.profile,
    )
    print((Path(args.out) / "results.md").read_text(encoding="utf-8"))
    print(json.dumps({lab: {t: m.get("score") for t, m in r.items()} for lab, r in results["results"].items()}))
    return 0


@_clean_errors
def _score(args) -> int:
    from pathlib import Path

    from .runner import read_jsonl, write_json
    from .tasks import get_task

    task = get_task(args.task, **{"profile": args.profile, **_task_options(args.task_option, prefixed=False)})
    preds = read_jsonl(args.predictions)
    if args.data_dir:  # predictions must belong to this data: every id must exist there
        known = {ex["id"] for ex in task.module.load(args.data_dir, **task.opts)}
        unknown = [p.get("id") for p in preds if p.get("id") not in known]
        if unknown:
            print(f"qtulu eval score: error: {args.predictions}: {len(unknown)} prediction ids not in "
                  f"{args.data_dir} ({task.name}), e.g. {unknown[:3]}", file=sys.stderr)
            return 2
    metrics = task.module.score(preds, **task.opts, judge=_judge(args), classifier=args.toxigen_classifier,
                                allow_code_execution=args.allow_code_execution, workers=args.workers,
                                unsafe_no_isolation=args.unsafe_no_isolation)
    metrics = {**metrics, "task": task.name, "version": task.version, "predictions": str(args.predictions)}
    if args.out:
        write_json(Path(args.out), metrics)
    print(json.dumps({k: v for k, v in metrics.items() if not isinstance(v, dict)}, default=str))
    return 0


@_clean_errors
def _merge_search(args) -> int:
    _require(args, "model", "tasks", "data_dir", "out")
    if len(args.adapter) < 2:
        raise SystemExit("qtulu eval merge-search: error: give at least two --adapter")
    from .merge_search import merge_search, search_table
    from .runner import check_requirements
    from .tasks import parse_task_list

    names = parse_task_list(args.tasks)
    judge = _judge(args)
    check_requirements(names, judge=judge, classifier=args.toxigen_classifier,
                       allow_code_execution=args.allow_code_execution, unsafe_no_isolation=args.unsafe_no_isolation)
    model, tok, adapter_names = _load(args)
    grid = [[float(x) for x in w.split(",")] for w in args.weights] if args.weights else None
    result = merge_search(
        model, tok, adapter_names, names, data_dir=args.data_dir, out_dir=args.out,
        methods=[m.strip() for m in args.methods.split(",") if m.strip()], weight_grid=grid,
        densities=[float(d) for d in args.densities.split(",")],
        limit=args.limit if args.limit is not None else args.limit_default, batch_size=args.batch_size,
        chat_format=None if args.chat_format == "none" else args.chat_format,
        task_options=_task_options(args.task_option), seed=args.seed, judge=judge,
        classifier=args.toxigen_classifier, allow_code_execution=args.allow_code_execution, workers=args.workers,
        unsafe_no_isolation=args.unsafe_no_isolation,
    )
    print(search_table(result))
    print(json.dumps({"best": result["best"]["name"], "best_dir": result["best_dir"],
                      "objective": result["best"]["objective"]}))
    return 0
