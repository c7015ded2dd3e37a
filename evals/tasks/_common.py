"""Small helpers shared by the task modules (file checks, limits)."""

from __future__ import annotations

from pathlib import Path

from qtulu.errors import QtuluError


class TaskDataError(QtuluError, FileNotFoundError):
    """Missing or malformed benchmark data; the message names the file."""


def require(path: Path, what: str) -> Path:
    if not path.exists():
        raise TaskDataError(f"{what} not found: {path} (point --data-dir at the eval data root)")
    return path


def head(items: list, limit: int | None) -> list:
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    return items if limit is None else items[:limit]


def answer_after(lm, prefix: str) -> str:
    """What follows the user turn: open-instruct adds the prefix after a space unless the chat
    prompt already ends in whitespace; plain prompts get it on a new line."""
    if lm.chat_format is None:
        return "\n" + prefix
    return prefix
