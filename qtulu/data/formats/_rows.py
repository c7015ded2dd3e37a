"""What every converter shares: reading fields of a row, the converter context, and the two kinds
of rows a converter does not turn into a conversation.

- `BadRow` (qtulu.data.errors): the row is malformed (a missing field, an unknown speaker, a task
  file without ``Definition``). The build stops at it (``on_bad_row: error``, naming ``file:line``)
  or counts it by reason (``skip``).
- `Filtered`: the row is well formed, and the reference converter leaves it out on purpose (a
  ShareGPT conversation with a ``system`` turn, a CoT row of a template type open-instruct did not
  use). Always counted by reason in the manifest (``filtered``), never an error.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

from qtulu.data.errors import BadRow

Row = tuple[str, Any]
Messages = list[dict[str, str]]


@dataclass(frozen=True)
class Filtered:
    """A row the reference converter drops on purpose; ``reason`` is counted in the manifest."""

    reason: str
    detail: str = ""


Out = Iterator[tuple[str, "Messages | BadRow | Filtered"]]


@dataclass
class Context:
    """What a conversion may depend on besides the rows and the source's options.

    ``profile``: ``open_instruct`` (open-instruct's June-2023 converter: weighted random instruction
    templates) or ``plain`` (the same selection and filters with one fixed layout: instruction, blank
    line, input). ``seed`` seeds a fresh ``random.Random`` per source, consumed in the order
    open-instruct consumes its global ``random`` (so that one source converted alone equals
    open-instruct's converter run alone after ``random.seed(seed)``). ``tokenizer`` and
    ``max_seq_len`` are needed only where the reference counts tokens (ShareGPT splitting).
    """

    profile: str = "open_instruct"
    seed: int = 42
    tokenizer: Any = None
    max_seq_len: int = 2048
    rng: random.Random = field(init=False, repr=False)

    def __post_init__(self):
        if self.profile not in PROFILES:
            raise ValueError(f"unknown data profile {self.profile!r} (expected one of {', '.join(PROFILES)})")
        self.rng = random.Random(self.seed)

    @property
    def random_templates(self) -> bool:
        return self.profile == "open_instruct"


PROFILES = ("open_instruct", "plain")


def require_dict(row: Any) -> dict:
    if not isinstance(row, dict):
        raise BadRow("bad_row_type", f"expected a JSON object, got {type(row).__name__}")
    return row


def text(row: dict, key: str, *, required: bool = True, default: str = "") -> str:
    """A string field: missing -> ``missing_field``; null -> ``null_content``; non-str -> ``bad_content_type``."""
    if key not in row:
        if required:
            raise BadRow("missing_field", f"no {key!r} field (fields: {', '.join(map(str, row))})")
        return default
    v = row[key]
    if v is None:
        if required:
            raise BadRow("null_content", f"field {key!r} is null")
        return default
    if not isinstance(v, str):
        raise BadRow("bad_content_type", f"field {key!r} is {type(v).__name__}, not str")
    return v


def pair(user: str, assistant: str) -> Messages:
    return [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]


def checked(rows: Iterable[Row], check: Callable[[dict, str], Any]) -> Iterator[tuple[str, Any]]:
    """The loop every converter runs over its rows: ``(where, check(row, where))`` for each row that
    is a JSON object; ``(where, BadRow)``, located at ``where``, for a row read as bad, a row that
    is not an object, or one ``check`` rejects by raising `BadRow`. Lazy: ``check`` sees the state
    the caller built from the rows before."""
    for where, row in rows:
        if isinstance(row, BadRow):
            yield where, row
            continue
        try:
            value = check(require_dict(row), where)
        except BadRow as e:
            value = e.at(where)
        yield where, value


def rowwise(fn: Callable[[dict, dict, Context], "list[Messages | Filtered]"]):
    """Wrap ``fn(row, options, ctx) -> [messages | Filtered, ...]`` into a converter over ``(where, row)``
    pairs that turns a raised `BadRow` into a located item."""

    def convert(rows: Iterable[Row], options: dict, ctx: Context) -> Out:
        for where, convs in checked(rows, lambda row, _: fn(row, options, ctx)):
            if isinstance(convs, BadRow):
                yield where, convs
                continue
            for c in convs:
                yield where, c

    convert.__doc__ = fn.__doc__
    convert.__name__ = fn.__name__
    return convert


_STEM = re.compile(r"([^/\\]+?)(?:\.[A-Za-z0-9]+)?(?::\d+|\[\d+\])?$")


def file_stem(where: str) -> str:
    """``/d/cot_zsopt.jsonl:12`` -> ``cot_zsopt`` (the name of the file a row came from)."""
    m = _STEM.search(where)
    return m.group(1) if m else ""
