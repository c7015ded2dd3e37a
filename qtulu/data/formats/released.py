"""Conversations as released: ``{"messages": [{"role", "content"}, ...]}`` rows, and the Tülu mixtures.

Reference: the released SFT mixtures ``allenai/tulu-v1-sft-mixture`` and ``allenai/tulu-v2-sft-mixture``
(parquet with ``dataset``, ``id`` and ``messages``), which are open-instruct's converter output
(``open_instruct/reformat_datasets.py``: each row names its source in ``dataset``; the V1 mixture
concatenates flan_v2, cot, dolly, oasst1, gpt4_alpaca, code_alpaca and sharegpt, as
``scripts/prepare_train_data.sh`` at 94055552c builds it). Training on them reproduces the paper's
exact data, random template choices included, without reconverting.

Option ``dataset`` keeps the rows whose ``dataset`` column is that name (or one of a list); a name
also matches its dotted sub-datasets (``science`` matches ``science.qasper``). A source with
``release: tulu_v1`` reads its rows from the released mixture this way (see `release_source`).
"""

from __future__ import annotations

import dataclasses
from typing import Iterable

from qtulu.data.errors import BadRow, DataError
from qtulu.data.formats._rows import Context, Out, Row, checked

RELEASES = {"tulu_v1": "allenai/tulu-v1-sft-mixture", "tulu_v2": "allenai/tulu-v2-sft-mixture"}


def _wanted(options: dict) -> tuple[str, ...] | None:
    d = options.get("dataset")
    if d is None:
        return None
    names = (d,) if isinstance(d, str) else tuple(d)
    if not names or not all(isinstance(n, str) and n for n in names):
        raise DataError(f"messages option dataset={d!r}: expected a name or a list of names")
    return names


def _matches(value, names: tuple[str, ...]) -> bool:
    return isinstance(value, str) and any(value == n or value.startswith(n + ".") for n in names)


def messages(rows: Iterable[Row], options: dict, ctx: Context) -> Out:
    """``{"messages": [...]}`` rows (roles system / user / assistant), optionally only those of one
    ``dataset`` of a released mixture."""
    names = _wanted(options)
    seen: dict[str, int] = {}
    kept = 0
    other = object()  # a row of another dataset of the mixture: counted, not kept

    def check(row: dict, _where: str):
        if names is not None:
            value = row.get("dataset")
            if not _matches(value, names):
                seen[str(value)] = seen.get(str(value), 0) + 1
                return other
        if "messages" not in row:
            raise BadRow("missing_field", "no 'messages' field")
        return row["messages"]

    for where, msgs in checked(rows, check):
        if msgs is other:
            continue
        if not isinstance(msgs, BadRow):
            kept += 1
        yield where, msgs
    if names is not None and not kept:
        present = ", ".join(f"{k} ({v})" for k, v in sorted(seen.items())) or "no rows at all"
        raise DataError(f"no row with dataset {' or '.join(names)!r} (datasets present: {present})")


def release_source(spec):
    """The `SourceSpec` that reads ``spec``'s rows from the released mixture ``spec.release``: a name
    of `RELEASES`, a hub id, or a local parquet file / folder; rows filtered on ``dataset`` =
    ``spec.release_dataset`` (default: the source's name). ``count`` and ``name`` are kept."""
    rel = spec.release
    hub_id, path = None, None
    if rel in RELEASES:
        hub_id = RELEASES[rel]
    elif rel.startswith(("/", "./", "../", "~")) or rel.endswith((".parquet", ".arrow", ".json", ".jsonl")):
        path = rel
    else:
        hub_id = rel
    dataset = spec.release_dataset or spec.name
    return dataclasses.replace(spec, format="messages", hub_id=hub_id, hub_config=None, path=path, split="train",
                               options={"dataset": dataset}, release=None)
