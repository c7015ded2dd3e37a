"""``qtulu eval``: run the suite, re-score saved predictions, or search merges.

Everything that needs no model (task names and options, each task's data, judge/classifier
settings, adapters, the base's files) is checked before the base is loaded; finished (adapter,
task) cells are read back on a re-run (`evals.cells`).

    qtulu eval --model BASE [--adapter DIR ...] [--include-base] --tasks mmlu,gsm8k --data-dir DIR --out DIR
        [--quick] [--limit N] [-o TASK.KEY=VALUE ...] [--no-resume]
    qtulu eval --list-tasks     # every task: version, options (defaults, meanings), --quick values
    qtulu eval score --task gsm8k --predictions OUT/label/gsm8k/predictions.jsonl [--data-dir DIR]
    qtulu eval merge-search --model BASE --adapter A --adapter B --tasks mmlu,gsm8k --data-dir DIR --out DIR
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from qtulu.errors import QtuluError


class EvalUsageError(QtuluError, ValueError):
    """A `qtulu eval` request that cannot run as given (printed as one line, exit 2)."""


def _positive_int(text: str) -> int:
    """argparse type: a count (batch size, limit, workers) checked as the command line is read,
    before any import of torch or load of a model."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


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
    p.add_argument("--workers", type=_positive_int, default=None, help="sandbox workers (default: CPU count)")


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
                   help="compute dtype of the base (default: the one the first adapter was trained with, else bfloat16)")
    p.add_argument("--tasks", help="comma-separated task names, or 'all' (see `qtulu eval --list-tasks`)")
    p.add_argument("--out", help="output dir")
    p.add_argument("--overwrite", action="store_true", help="write into a non-empty --out that is not a qtulu eval output")
    p.add_argument("--batch-size", type=_positive_int, default=8)
    p.add_argument("--limit", type=_positive_int, default=None,
                   help="examples per subject/task/language/group (per task where it has none)")
    p.add_argument("--chat-format", choices=("tulu", "tokenizer", "none"), default=None,
                   help="prompt format: tulu (tuned models), tokenizer (its chat template), none (base models); "
                        "default: the one the adapters were trained with (their qtulu.json), else tulu")
    p.add_argument("--set", "-o", "--task-option", dest="task_option", action="append", default=[],
                   metavar="TASK.KEY=VALUE",
                   help="per-task option, value YAML-parsed, e.g. -o mmlu.subjects=[anatomy] (repeatable; "
                        "`qtulu eval --list-tasks` lists each task's options)")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: a few subtasks, short generations, 1 sample, --limit 5 unless given "
                        "(results.md says so; not comparable numbers)")


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "eval", help="evaluate a base and its adapters on the Tulu suite", allow_abbrev=False,
        description="Evaluate a base model and adapters on the Tulu suite; `score` re-scores predictions; "
                    "`merge-search` picks the best merge of adapters by the suite.")
    _model_args(p)
    _common(p, tasks_required=True)
    _profile_arg(p)
    p.add_argument("--include-base", action="store_true", help="also evaluate the base (adapters disabled)")
    p.add_argument("--list-tasks", action="store_true",
                   help="print every task with its version, options (defaults, meanings) and quick-mode values")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--no-resume", action="store_true",
                   help="recompute every (adapter, task) cell; by default a cell already complete in --out with "
                        "the same model, adapter, task, options, data and code is read back")
    p.set_defaults(func=_run)
    sub = p.add_subparsers(dest="eval_command", metavar="{score,merge-search}")

    s = sub.add_parser("score", help="re-score saved predictions.jsonl")
    s.add_argument("--task", required=True)
    s.add_argument("--predictions", required=True)
    s.add_argument("--out", help="write the metrics JSON here (default: print only)")
    s.add_argument("--set", "-o", "--task-option", dest="task_option", action="append", default=[],
                   metavar="KEY=VALUE", help="task option (repeatable)")
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
            from qtulu.adapters.store import AdapterError

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
            raise EvalUsageError(f"--task-option {item!r}: expected {'TASK.' if prefixed else ''}KEY=VALUE")
        key, value = item.split("=", 1)
        if prefixed:
            if "." not in key:
                raise EvalUsageError(f"--task-option {item!r}: expected TASK.KEY=VALUE")
            task, key = key.split(".", 1)
            out.setdefault(task, {})[key] = _yaml_value(value)
        else:
            out[key] = _yaml_value(value)
    return out


def _judge(args):
    if args.judge_url or args.judge_model:
        if not (args.judge_url and args.judge_model):
            raise EvalUsageError("give both --judge-url and --judge-model")
        from .judge import Judge

        return Judge(args.judge_url, args.judge_model, api_key_env=args.judge_api_key_env)
    return None


def _preflight(args, names: list[str], task_options: dict) -> None:
    """Every check that needs no model, before the base is loaded: a typo costs seconds, not a load.

    Task names, every task option (unknown ones refused, naming the valid ones), the data of each
    task (read with limit 1), the judge/classifier/code-execution requirements, each adapter's
    files and manifest (checksums; the base match is checked once the base is loaded), adapter
    names, and the base path (file checks only) or, offline, the hub cache.
    """
    from pathlib import Path

    from qtulu.files import check_output
    from qtulu.preflight import check_before_load

    from .runner import check_requirements, resolve_task
    from .tasks import TASKS

    unknown = sorted(set(task_options) - set(TASKS))
    if unknown:  # a misspelt task in -o TASK.KEY=VALUE must not pass silently either
        raise EvalUsageError(f"--set names unknown task(s) {unknown}; known tasks: {', '.join(TASKS)}")
    for name in sorted(set(task_options) - set(names)):  # options for a task not run: still checked
        resolve_task(name, task_options[name], getattr(args, "profile", None))
    if not Path(args.data_dir).is_dir():
        from qtulu.preflight import demo_hint

        raise EvalUsageError(f"--data-dir {args.data_dir}: not a directory{demo_hint(args.data_dir)}")
    from qtulu.adapters.store import parse_adapter_spec

    check_output(args.out, kind="eval", overwrite=args.overwrite, inputs=[  # never over what it reads
        ("base model", args.model), ("data dir", args.data_dir), *[("adapter", parse_adapter_spec(a)[1]) for a in args.adapter]])
    if getattr(args, "quick", False):
        from .quick import apply_quick

        task_options, _ = apply_quick(names, task_options, args.limit)
    for name in names:
        task = resolve_task(name, task_options.get(name), getattr(args, "profile", None))
        task.module.load(args.data_dir, limit=1, **task.opts)  # TaskDataError names the missing file
    check_requirements(names, judge=_judge(args), classifier=args.toxigen_classifier,
                       allow_code_execution=args.allow_code_execution,
                       unsafe_no_isolation=getattr(args, "unsafe_no_isolation", False))
    # adapters (files, checksums, names, --trained-on for plain PEFT ones) and the base's files
    check_before_load(args.model, args.adapter, getattr(args, "trained_on", None))


def _resolve_chat_format(args) -> None:
    """``--chat-format`` left out: the format the adapters were trained with, else tulu."""
    if args.chat_format is not None:
        return
    from qtulu.adapters.store import prompt_format_of

    args.chat_format = prompt_format_of(args.adapter)


def _load(args):
    from qtulu.adapters.store import load_model, parse_adapter_spec

    if not args.model:
        raise EvalUsageError("--model is required")
    specs = [parse_adapter_spec(a) for a in args.adapter]
    model, tok = load_model(args.model, [(n, str(p)) for n, p in specs],
                            quantize={None: "auto", "none": None}.get(args.quantize, args.quantize), force=args.force,
                            compute_dtype=args.dtype, trained_on=args.trained_on)
    from qtulu.model.threads import fit_threads

    fit_threads(model)  # one intra-op thread for a small model: more only oversubscribe the cores
    return model, tok, [n for n, _ in specs]


def _require(args, *names):
    missing = [f"--{n.replace('_', '-')}" for n in names if not getattr(args, n)]
    if missing:
        raise EvalUsageError(f"missing {' '.join(missing)}")


def list_tasks() -> str:
    """Every task variant: version, options with defaults and meanings, the values --quick uses."""
    from .quick import quick_options
    from .tasks import TASKS, get_task

    lines = []
    for name, (module_name, preset) in TASKS.items():
        task = get_task(name)
        quick = quick_options(name)
        lines.append(f"{name}\tv{task.version}  (module {module_name}"
                     + (f"; {', '.join(f'{k}={v!r}' for k, v in preset.items())}" if preset else "") + ")")
        for opt, (default, meaning) in getattr(task.module, "OPTIONS", {}).items():
            value = task.opts.get(opt, default)
            q = f"  [--quick: {quick[opt]!r}]" if opt in quick else ""
            lines.append(f"    {name}.{opt} = {value!r}  {meaning}{q}")
    lines.append("set one with -o/--set TASK.OPTION=VALUE (YAML value), e.g. -o bbh.subtasks=[navigate]")
    return "\n".join(lines)


@_clean_errors
def _run(args) -> int:
    if args.list_tasks:
        print(list_tasks())
        return 0
    _require(args, "model", "tasks", "data_dir", "out")
    from .runner import evaluate
    from .tasks import parse_task_list

    names = parse_task_list(args.tasks)
    if args.include_base and not args.adapter:
        raise EvalUsageError("--include-base needs at least one --adapter")
    _resolve_chat_format(args)
    task_options = _task_options(args.task_option)
    try:
        key = _request_key(args, names, task_options)
    except (QtuluError, ValueError, KeyError, OSError):
        key = None  # the preflight names what is wrong
    # a finished run of this very request (same files, stats unchanged since the preflight passed
    # on them) is printed before the preflight, which imports torch for the base's file checks
    if key and not args.no_resume and _read_back(args, key):
        return 0
    _preflight(args, names, task_options)  # everything checkable without the model, first
    judge = _judge(args)
    model, tok, adapter_names = _load(args)
    labels = (["base"] if args.include_base else []) + adapter_names
    from pathlib import Path

    results = evaluate(
        model, tok, names, data_dir=args.data_dir, out_dir=args.out, adapters=labels or None,
        batch_size=args.batch_size, limit=args.limit,
        chat_format=None if args.chat_format == "none" else args.chat_format, judge=judge,
        classifier=args.toxigen_classifier, allow_code_execution=args.allow_code_execution, workers=args.workers,
        unsafe_no_isolation=args.unsafe_no_isolation, task_options=task_options,
        model_name=Path(args.model).name or "model", profile=args.profile,
        quick=args.quick, resume=not args.no_resume, progress=not args.no_progress,
    )
    if key:
        from .cells import record_request

        record_request(args.out, key, results)
    print((Path(args.out) / "results.md").read_text(encoding="utf-8"))
    print(json.dumps({lab: {t: m.get("score") for t, m in r.items()} for lab, r in results["results"].items()}))
    return 0


def _request_key(args, names: list[str], task_options: dict) -> str | None:
    """The key of the whole request, from files only (`evals.cells.request_key`); None when the base
    or an adapter is not a local folder (then only the per-cell keys, after the load, decide)."""
    from qtulu.adapters.store import parse_adapter_spec

    from .cells import _canonical, code_sha256, data_sha256, request_key, stat_identity
    from .runner import resolve_task

    limit = args.limit
    if args.quick:
        from .quick import apply_quick

        task_options, limit = apply_quick(names, task_options, limit)
    model = stat_identity(args.model)
    adapters = [[n, stat_identity(p)] for n, p in map(parse_adapter_spec, args.adapter)]
    if model is None or any(ident is None for _, ident in adapters):
        return None
    tasks = []
    for name in names:
        task = resolve_task(name, task_options.get(name), args.profile)
        tasks.append({"name": name, "version": task.version, "options": _canonical(task.opts),
                      "data": data_sha256(task, args.data_dir), "code": code_sha256(task)})
    here = Path(__file__).resolve().parent
    return request_key({
        "model": model, "adapters": adapters, "include_base": args.include_base,
        "load": {"quantize": args.quantize, "trained_on": args.trained_on, "dtype": args.dtype, "force": args.force},
        "tasks": tasks, "limit": limit, "quick": args.quick, "profile": args.profile,
        "run": {"batch_size": args.batch_size, "chat_format": args.chat_format, "judge": [args.judge_url, args.judge_model],
                "classifier": args.toxigen_classifier, "allow_code_execution": args.allow_code_execution},
        "report": [_file_sha256(here / n) for n in ("cli.py", "runner.py", "report.py", "cells.py")],
    })


def _file_sha256(path) -> str:
    import hashlib

    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _read_back(args, key: str) -> bool:
    """Print a complete earlier run of this very request from ``--out``, loading no model (nor torch)."""
    from .cells import read_back

    results = read_back(args.out, key)
    if results is None:
        return False
    n = sum(len(row) for row in results.values())
    print(f"[qtulu eval] {n} of {n} cells were complete in {args.out} (same model, adapter, task, options, data "
          "and code): read back, not recomputed; no model loaded", flush=True)
    print((Path(args.out) / "results.md").read_text(encoding="utf-8"))
    print(json.dumps({lab: {t: m.get("score") for t, m in r.items()} for lab, r in results.items()}))
    return True


@_clean_errors
def _score(args) -> int:
    from pathlib import Path

    from qtulu.files import write_json
    from qtulu.files import check_output
    from .runner import read_jsonl
    from .tasks import get_task

    if args.out:  # never over the predictions or the data it reads
        check_output(args.out, kind="file", inputs=[("predictions file", args.predictions), ("data dir", args.data_dir)])

    task = get_task(args.task, **{"profile": args.profile, **_task_options(args.task_option, prefixed=False)})
    preds = read_jsonl(args.predictions)
    if args.data_dir:  # predictions must belong to this data: every id must exist there
        known = {ex["id"] for ex in task.module.load(args.data_dir, **task.opts)}
        unknown = [p.get("id") for p in preds if p.get("id") not in known]
        if unknown:
            print(f"qtulu eval score: error: {args.predictions}: {len(unknown)} prediction ids not in "
                  f"{args.data_dir} ({task.name}), e.g. {unknown[:3]}", file=sys.stderr)
            return 2
    # data_dir: tasks that execute code (codex_humaneval) take their tests from the dataset, never the file
    metrics = task.module.score(preds, **task.opts, judge=_judge(args), classifier=args.toxigen_classifier,
                                allow_code_execution=args.allow_code_execution, workers=args.workers,
                                unsafe_no_isolation=args.unsafe_no_isolation, data_dir=args.data_dir,
                                predictions_source=str(args.predictions))
    metrics = {**metrics, "task": task.name, "version": task.version, "predictions": str(args.predictions)}
    if args.out:
        write_json(Path(args.out), metrics)
    print(json.dumps({k: v for k, v in metrics.items() if not isinstance(v, dict)}, default=str))
    return 0


@_clean_errors
def _merge_search(args) -> int:
    _require(args, "model", "tasks", "data_dir", "out")
    if len(args.adapter) < 2:
        raise EvalUsageError("give at least two --adapter")
    _resolve_chat_format(args)
    from .merge_search import merge_search, search_table
    from .runner import check_requirements
    from .tasks import parse_task_list

    names = parse_task_list(args.tasks)
    judge = _judge(args)
    check_requirements(names, judge=judge, classifier=args.toxigen_classifier,
                       allow_code_execution=args.allow_code_execution, unsafe_no_isolation=args.unsafe_no_isolation)
    _preflight(args, names, _task_options(args.task_option))  # everything checkable without the model, first
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
