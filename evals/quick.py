"""``qtulu eval --quick``: a smoke run of the suite in minutes, not hours (numbers not comparable).

Quick mode changes only how much is run, never how it is scored: a few subtasks/subjects, short
generations, one sample per problem, and ``QUICK_LIMIT`` examples per subtask unless ``--limit``
says otherwise. The user's own ``-o/--set TASK.KEY=VALUE`` options win over these. results.md
and results.json say that a run was quick (`evals.report`).

Kept in one place, keyed by task module, rather than in each task module: a quick run is a
property of the command, and each value must be an option the module declares in its
``OPTIONS`` (tests/evals/test_resume.py checks it).
"""

from __future__ import annotations

from typing import Any

QUICK_LIMIT = 5  # examples per subject / subtask / group when --limit is not given

QUICK_OPTIONS: dict[str, dict[str, Any]] = {
    "mmlu": {"subjects": ["abstract_algebra", "anatomy", "college_computer_science"]},
    "bbh": {"subtasks": ["boolean_expressions", "date_understanding", "word_sorting"], "max_new_tokens": 128},
    "gsm8k": {"max_new_tokens": 128},
    "tydiqa": {"max_new_tokens": 20},
    # one sample: pass@1 only, so the headline follows
    "codex_humaneval": {"num_samples": 1, "headline_k": 1, "max_new_tokens": 128},
    "alpaca_eval": {"max_new_tokens": 128},
    "toxigen": {"max_prompts_per_group": 5, "max_new_tokens": 32},
    "truthfulqa": {"max_new_tokens": 20},
    "synthetic": {},
    "reply_loss": {},  # one forward pass over the held-out rows: --limit caps the rows
}


def quick_options(task_name: str) -> dict[str, Any]:
    """The quick-mode options of task variant ``task_name`` (each one an option its module declares:
    tests/evals/test_resume.py)."""
    from .tasks import TASKS

    return dict(QUICK_OPTIONS.get(TASKS[task_name][0], {}))


def apply_quick(task_names, task_options: dict[str, dict] | None, limit: int | None):
    """``(task_options, limit)`` for a quick run: quick defaults under the user's options."""
    merged = {name: {**quick_options(name), **(task_options or {}).get(name, {})} for name in task_names}
    return merged, (QUICK_LIMIT if limit is None else limit)
