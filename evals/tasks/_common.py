"""Small helpers shared by the task modules: profiles, file checks, limits, the comparability note."""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any, Iterator

from qtulu.errors import QtuluError

# Every task takes a ``profile`` option.
PROFILES = {
    "open_instruct": "open-instruct's Tulu-1 evaluation (eval/*/run_eval.py at 171c3f163) reproduced, "
                     "quirks included: prompts, subsets, stops, extraction and metrics of the paper's table",
    "corrected": "the same benchmarks with open-instruct's mistakes fixed (each task module lists what "
                 "changes); its numbers are not comparable to the paper's",
}
DEFAULT_PROFILE = "open_instruct"
PROFILE_OPTION = (DEFAULT_PROFILE, "open_instruct (reproduces the paper's evaluation) or corrected "
                                   "(open-instruct's mistakes fixed; see the task's docstring)")


class TaskDataError(QtuluError, FileNotFoundError):
    """Missing or malformed benchmark data; the message names the file."""


class TaskConfigError(QtuluError, ValueError):
    """A task option with a value the task cannot use; the message names the option."""


def check_profile(profile: str) -> str:
    if profile not in PROFILES:
        raise TaskConfigError(f"unknown profile {profile!r}; profiles: {', '.join(PROFILES)}")
    return profile


def require(path: Path, what: str) -> Path:
    if not path.exists():
        raise TaskDataError(f"{what} not found: {path} (point --data-dir at the eval data root)")
    return path


def jsonl_rows(path: Path, bad: str) -> Iterator[tuple[int, Any]]:
    """``(line number, parsed line)`` for each non-blank line of a JSON-lines file (``.gz`` too); a
    line that is not JSON is a `TaskDataError` ``"PATH:LINE: {bad} (why)"``."""
    with (gzip.open if Path(path).suffix == ".gz" else open)(path, "rt", encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                try:
                    yield lineno, json.loads(line)
                except json.JSONDecodeError as e:
                    raise TaskDataError(f"{path}:{lineno}: {bad} ({e})") from e


def head(items: list, limit: int | None) -> list:
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    return items if limit is None else items[:limit]


def comparability(profile: str, limit, deviations: list[str]) -> tuple[bool, str]:
    """(comparable to the paper's table, why): only the open_instruct profile, with no ``limit`` and
    none of ``deviations`` (the task's own list of settings that differ from the paper's)."""
    why = []
    if profile != DEFAULT_PROFILE:
        why.append(f"profile {profile}")
    if limit is not None:
        why.append(f"limit {limit}")
    why += deviations
    return (not why, "as the paper" if not why else "not comparable: " + "; ".join(why))
