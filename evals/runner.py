"""Run tasks over a loaded model and its adapters, save predictions and scores, write the report.

Layout of ``out_dir``::

    results.json  results.md  results.png
    <label>/<task>/predictions.jsonl   # one record per example, gold included
    <label>/<task>/metrics.json        # the task's scores, version, settings

where ``<label>`` is an adapter name, "base" (adapters disabled) or ``model_name`` for a model
evaluated as is. Several adapters are evaluated on one loaded base by swapping the active one.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Sequence

from qtulu.files import atomic_write_text, write_json, write_jsonl  # noqa: F401 - write_json(l) used by the tasks

from .lm import LM
from .tasks import get_task, parse_task_list

NEEDS = {
    "codex_humaneval": "allow_code_execution",
    "codex_humaneval_t01": "allow_code_execution",
    "alpaca_eval": "judge",
    "truthfulqa_gen": "judge",
    "toxigen": "classifier",
}


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{lineno}: not JSON ({e})") from e
    return rows


def check_requirements(task_names: Sequence[str], *, judge=None, classifier=None, allow_code_execution=False,
                       unsafe_no_isolation=False) -> None:
    """Fail before any generation when a task lacks its judge, classifier or code-execution opt-in
    (or the sandbox cannot isolate code here and ``unsafe_no_isolation`` was not given)."""
    from .judge import JudgeNotConfigured
    from .sandbox import require_opt_in
    from .tasks.toxigen import HOW_TO_CONFIGURE, ClassifierNotConfigured

    for name in task_names:
        need = NEEDS.get(name)
        if need == "allow_code_execution":
            require_opt_in(allow_code_execution, name, unsafe_no_isolation=unsafe_no_isolation)
        elif need == "judge" and judge is None:
            raise JudgeNotConfigured(name)
        elif need == "classifier" and classifier is None:
            raise ClassifierNotConfigured(HOW_TO_CONFIGURE)


def resolve_task(task_name: str, task_options: dict | None = None, profile: str | None = None):
    """The `Task` that `run_task` runs for these options (the eval cell's key hashes the same one).
    ``profile`` (None: the task's default, open_instruct) applies unless ``task_options`` names one."""
    return get_task(task_name, **{**({"profile": profile} if profile else {}), **(task_options or {})})


def run_task(lm: LM, task_name: str, *, data_dir, out_dir: Path | None = None, limit=None,
             task_options: dict | None = None, score_context: dict | None = None, profile: str | None = None,
             column: str | None = None) -> dict:
    """Load, predict, score one task with ``lm``; save predictions.jsonl + metrics.json in ``out_dir``.

    ``profile`` (None: the task's default, open_instruct) applies unless ``task_options`` names one.
    ``column``: the label the task's result goes under, when it is not the task's name (recorded).
    """
    task = resolve_task(task_name, task_options, profile)
    ctx = dict(score_context or {})
    t0 = time.time()
    examples = task.module.load(data_dir, limit=limit, **task.opts)
    preds = task.module.predict(lm, examples, **task.opts, **ctx)
    t1 = time.time()
    if out_dir is not None:
        write_jsonl(Path(out_dir) / "predictions.jsonl", preds)
    metrics = task.module.score(preds, **task.opts, **{"data_dir": data_dir, **ctx})
    about = task.module.describe(limit=limit, context=ctx, **task.opts)
    if lm.chat_format == "tokenizer" and about["comparable"]:  # the paper: Tulu format (plain for base models)
        about = {**about, "comparable": False, "note": "not comparable: the tokenizer's chat template (the paper: "
                                                       "the Tulu format, plain prompts for base models)"}
    metrics = {
        **metrics, "task": task_name, "version": task.version, "options": task.opts, "limit": limit,
        "profile": about["profile"], "subset": about["subset"], "metric": about["metric"],
        "comparable": about["comparable"], "comparability": about["note"],
        "chat_format": lm.chat_format, "predict_seconds": round(t1 - t0, 2),
        "score_seconds": round(time.time() - t1, 2),
    }
    if column is not None and column != task_name:
        metrics["column"] = column
    if out_dir is not None:
        write_json(Path(out_dir) / "metrics.json", metrics)
    return metrics


def evaluate(model, tokenizer, tasks, *, data_dir, out_dir, adapters: Sequence[str] | None = None,
             batch_size: int = 8, limit: int | None = None, chat_format: str | None = "tulu",
             judge=None, classifier=None, allow_code_execution: bool = False, workers: int | None = None,
             unsafe_no_isolation: bool = False, task_options: dict[str, dict] | None = None,
             model_name: str = "model", max_length: int | None = None,
             base_chat_format: str | None = None, progress: bool = True, report: bool = True,
             profile: str = "open_instruct", quick: bool = False, resume: bool = True, cache_dir=None,
             columns: dict[str, str] | None = None) -> dict:
    """Evaluate ``model`` (optionally under each of ``adapters``) on ``tasks``; returns the results dict.

    ``tasks``: names from ``qtulu.evals.tasks.TASKS`` (list or "a,b"). ``adapters``: names already
    loaded in the peft model, "base" = adapters disabled; None evaluates the model as it is.
    ``chat_format`` applies to tuned models (adapters, or the model as is); the "base" label uses
    ``base_chat_format`` (default None: plain prompts, as the Tulu paper evaluates base models).
    ``task_options``: per-task option overrides, e.g. ``{"mmlu": {"subjects": ["anatomy"]}}``.
    ``profile``: "open_instruct" (reproduces the paper's evaluation) or "corrected", for every task
    (a task's own ``profile`` option wins).
    ``quick``: a smoke run (`evals.quick`: few subtasks, short generations, one sample, a small
    default ``limit``). ``resume``: a (label, task) cell already complete in ``out_dir`` with the
    same key (`evals.cells`: model/adapter, task, options, data, code) is read back, not recomputed;
    ``cache_dir``: also look cells up in / store them to that content-addressed folder.
    ``columns``: ``{label: task}`` to run one task several times with different options (e.g.
    reply_loss per source): results, cell folders and ``task_options`` are keyed by the label
    (``tasks`` is then ignored); default: one column per task, labelled with its name.
    Ctrl-C raises `KeyboardInterrupt` saying how many cells are complete (a re-run resumes).
    The returned dict (also ``out_dir/results.json``) is
    ``{"results": {label: {task: metrics}}, "versions": {task: version}, "config": {...}}``.
    """
    columns = dict(columns) if columns else {n: n for n in parse_task_list(tasks)}
    names = list(columns)  # the column labels
    task_of = dict(zip(names, parse_task_list(list(columns.values()))))
    from .tasks._common import check_profile

    check_profile(profile)
    check_requirements(list(task_of.values()), judge=judge, classifier=classifier, allow_code_execution=allow_code_execution,
                       unsafe_no_isolation=unsafe_no_isolation)
    if quick:
        from .quick import apply_quick

        per_column = {lab: apply_quick([t], {t: (task_options or {}).get(lab, {})}, limit)[0][t] for lab, t in task_of.items()}
        task_options, limit = per_column, apply_quick([], None, limit)[1]
    for name in names:  # an unknown option fails here, before any generation
        resolve_task(task_of[name], (task_options or {}).get(name), profile)
    out_dir = Path(out_dir)
    labels = list(adapters) if adapters else [model_name]
    if adapters:
        from qtulu.adapters.store import set_active
    ctx = {"judge": judge, "classifier": classifier, "allow_code_execution": allow_code_execution,
           "workers": workers, "progress": progress, "unsafe_no_isolation": unsafe_no_isolation}
    def make_lm(fmt):
        return LM(model, tokenizer, batch_size=batch_size, chat_format=fmt, progress=progress, max_length=max_length)
    results: dict[str, dict] = {}
    was_training = getattr(model, "training", False)
    model.eval()
    from tqdm.auto import tqdm

    from .cells import cell_key, load_cell, model_identity, seal_cell

    scoring = {"judge": None if judge is None else {"url": judge.url, "model": judge.model},
               "classifier": classifier if isinstance(classifier, (str, type(None))) else repr(classifier),
               "allow_code_execution": allow_code_execution}
    bar = tqdm(total=len(labels) * len(names), desc="eval", unit="cell", disable=not progress)
    done = reused = 0
    from qtulu.model.dense_cache import dense_weights

    dense = dense_weights(model)  # CPU: the NF4 base dequantized once, not at every matmul
    dense.__enter__()
    try:
        for label in labels:
            if adapters:
                set_active(model, label)
            lm = make_lm(base_chat_format if adapters and label == "base" else chat_format)  # a model as is: chat_format
            identity = model_identity(model, label if adapters else None)
            results[label] = {}
            for name in names:
                bar.set_description(f"eval {label} · {name}")  # which adapter, which task
                cell_dir, opts = out_dir / label / name, (task_options or {}).get(name)
                key, what = cell_key(identity, resolve_task(task_of[name], opts, profile), data_dir=data_dir, limit=limit,
                                     chat_format=lm.chat_format, batch_size=batch_size, max_length=max_length,
                                     scoring=scoring)
                metrics = load_cell(cell_dir, key, cache_dir) if resume else None
                if metrics is not None:
                    reused += 1
                else:
                    metrics = run_task(lm, task_of[name], data_dir=data_dir, out_dir=cell_dir, limit=limit,
                                       task_options=opts, score_context=ctx, profile=profile, column=name)
                    metrics = seal_cell(cell_dir, key, what, metrics, cache_dir)
                results[label][name] = metrics
                done += 1
                bar.update()
    except KeyboardInterrupt:
        raise KeyboardInterrupt(f"{done} of {len(labels) * len(names)} eval cells complete in {out_dir}; "
                                "run the same command again to resume") from None
    finally:
        dense.__exit__(None, None, None)
        bar.close()
        if was_training:
            model.train()
    if reused:
        print(f"[qtulu eval] {reused} of {len(labels) * len(names)} cells were complete in {out_dir} "
              "(same model, adapter, task, options, data and code): read back, not recomputed", flush=True)
    out = {
        "results": results,
        "versions": {n: get_task(task_of[n]).version for n in names},
        "config": {"tasks": names, "labels": labels, "batch_size": batch_size, "limit": limit, "quick": quick,
                   "chat_format": chat_format, "base_chat_format": base_chat_format, "data_dir": str(data_dir),
                   "profile": profile,
                   "judge": None if judge is None else {"url": judge.url, "model": judge.model},
                   "classifier": classifier if isinstance(classifier, (str, type(None))) else repr(classifier)},
    }
    if report:
        from .report import write_report

        write_report(out, out_dir)
    return out
