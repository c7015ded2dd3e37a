"""HumanEval programs and their pass check, in the sandbox.

``program`` assembles what openai/human-eval executes (human_eval/execution.py at 6d43fb9,
``check_program``): the prompt, the completion, the problem's test code, and the ``check`` call.
``check_predictions`` runs every completion of every problem in the sandbox and counts passes.
A pass is the harness reaching its end (see ``qtulu.evals.sandbox``): human-eval records
"passed" only when ``exec`` of that program returns, "failed: ..." on any exception (SystemExit
included) and "timed out" when the process dies without a result (``os._exit``); here the last
one counts as failed, with its reason, and a timeout as "timeout".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from . import SandboxConfig, isolation, run_programs


def program(example: dict, completion: str) -> str:
    """The program the sandbox runs for one completion (human-eval's ``check_program``)."""
    return (example["prompt"] + completion + "\n" + example["test"] + "\n"
            + f"check({example['entry_point']})\n")


@dataclass
class Checked:
    """Per problem: ``passed[i]`` passing completions; ``statuses`` counts; ``isolation`` used;
    ``reasons``: per problem, the failure reason of each completion ("" for a pass)."""

    passed: list[int]
    statuses: dict
    isolation: dict
    limits: dict
    reasons: list[list[str]]


def check_predictions(predictions: Sequence[dict], *, timeout: float = 5.0, workers: int | None = None,
                      unsafe_no_isolation: bool = False, progress: bool = False,
                      config: SandboxConfig | None = None) -> Checked:
    """Run ``program(p, c)`` for every completion ``c`` of every prediction ``p`` (keys ``prompt``,
    ``test``, ``entry_point``, ``completions``); the caller has checked the opt-in."""
    config = config or SandboxConfig(timeout=timeout)
    iso = isolation(unsafe_no_isolation)  # refuses (IsolationUnavailable) before running anything
    codes, owners = [], []
    for i, p in enumerate(predictions):
        for c in p["completions"]:
            codes.append(program(p, c))
            owners.append(i)
    results = run_programs(codes, config, workers=workers, allow_code_execution=True,
                           unsafe_no_isolation=unsafe_no_isolation, progress=progress)
    passed = [0] * len(predictions)
    reasons: list[list[str]] = [[] for _ in predictions]
    statuses: dict = {}
    for i, r in zip(owners, results):
        passed[i] += int(r.passed)
        reasons[i].append("" if r.passed else r.reason)
        statuses[r.status] = statuses.get(r.status, 0) + 1
    limits = {"timeout_s": config.timeout, "memory_mb": config.memory_mb, "max_processes": config.max_processes,
              "max_disk_mb": config.max_disk_mb}
    return Checked(passed=passed, statuses=statuses, isolation=iso, limits=limits, reasons=reasons)
