"""HumanEval completions and their pass check, in the sandbox, with the verdict outside it.

For each completion the sandbox runs the module ``prompt + completion`` (``module``) and serves
calls of the problem's entry point; the problem's ``test`` code and ``check(candidate)`` run in
the sandbox's checker (``launcher.py``: another process, another uid, outside the sandbox), where
``candidate`` and the entry point's name are a proxy that sends the arguments into the sandbox
and gets plain data back. The prompt, test and entry point come from the dataset only (the
caller passes the dataset's rows), never from a predictions file.

Against openai/human-eval (human_eval/execution.py at 6d43fb9, ``check_program`` = prompt +
completion + test + ``check(entry_point)`` executed in one interpreter), the verdicts agree for
honest completions (all 164 canonical solutions pass), with these deliberate differences: a
completion that ends the interpreter (``os._exit``) fails (human-eval: "timed out", also a
failure); a return value that is not plain data (None, bool, int, float, str, bytes and lists,
tuples, dicts, sets of them) fails; names the completion redefines (``check``, the prompt's
helpers such as ``encode_cyclic``, ``abs``) do not change the tests, which use the dataset's own;
and a candidate's mutation of its arguments is not seen by the test (no HumanEval test looks at
its arguments after the call: every test passes literals or fresh copies).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from . import SandboxConfig, isolation, run_programs


def program(example: dict, completion: str) -> str:
    """human-eval's ``check_program`` for one completion (what openai/human-eval executes; kept
    for reference and for the parity tests: the sandbox itself runs `module` and checks outside)."""
    return (example["prompt"] + completion + "\n" + example["test"] + "\n"
            + f"check({example['entry_point']})\n")


def module(example: dict, completion: str) -> str:
    """What the sandbox executes for one completion: the prompt and the completion, nothing else
    (the tests never enter the sandbox)."""
    return example["prompt"] + completion + "\n"


def check_of(example: dict) -> dict:
    """The trusted check the checker runs: the dataset's prompt (its helpers), test and entry point."""
    return {"prompt": example["prompt"], "test": example["test"], "entry_point": example["entry_point"]}


@dataclass
class Checked:
    """Per problem: ``passed[i]`` passing completions; ``statuses`` counts; ``isolation`` used;
    ``reasons``: per problem, the failure reason of each completion ("" for a pass)."""

    passed: list[int]
    statuses: dict
    isolation: dict
    limits: dict
    reasons: list[list[str]]


def check_predictions(problems: Sequence[dict], completions: Sequence[Sequence[str]], *, timeout: float = 5.0,
                      workers: int | None = None, unsafe_no_isolation: bool = False, progress: bool = False,
                      config: SandboxConfig | None = None) -> Checked:
    """Check ``completions[i]`` (each a string) against the dataset row ``problems[i]`` (keys
    ``prompt``, ``test``, ``entry_point``); the caller has checked the opt-in."""
    config = config or SandboxConfig(timeout=timeout)
    iso = isolation(unsafe_no_isolation)  # refuses (IsolationUnavailable) before running anything
    codes, checks, owners = [], [], []
    for i, (p, cs) in enumerate(zip(problems, completions)):
        for c in cs:
            codes.append(module(p, c))
            checks.append(check_of(p))
            owners.append(i)
    results = run_programs(codes, config, workers=workers, allow_code_execution=True,
                           unsafe_no_isolation=unsafe_no_isolation, progress=progress, checks=checks)
    passed = [0] * len(problems)
    reasons: list[list[str]] = [[] for _ in problems]
    statuses: dict = {}
    for i, r in zip(owners, results):
        passed[i] += int(r.passed)
        reasons[i].append("" if r.passed else r.reason)
        statuses[r.status] = statuses.get(r.status, 0) + 1
    limits = {"timeout_s": config.timeout, "memory_mb": config.memory_mb, "max_processes": config.max_processes,
              "max_disk_mb": config.max_disk_mb}
    return Checked(passed=passed, statuses=statuses, isolation=iso, limits=limits, reasons=reasons)
