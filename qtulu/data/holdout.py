"""Row-level hold-out of a source: the native rows no adapter trains on, decided once, here.

A source's ``hold_out`` (`qtulu.recipes.SourceSpec`) sets aside native rows of its file BEFORE
conversion and before ``count`` resampling, so that a held-out row reaches training in no form: an
OASST1 tree is held out whole (every path through it), a Baize transcript or a ShareGPT conversation
whole (every chunk ``split_long`` would cut it into), a SuperNI *instance* whole (a task file is one
row holding all its instances: the unit there is the instance, the task keeps the others).

The choice depends on nothing but the rows' contents: each unit is hashed (sha256 of its canonical
JSON: keys sorted, ASCII, no spaces; a flat OASST1 message row by its ``message_tree_id``, so its
tree goes one way), and

- an int ``k`` holds out the ``k`` units with the smallest hashes (identical units share a hash and
  go together, so a duplicate of a held-out row never trains);
- a float ``f`` in (0, 1) holds out every unit whose hash, read as a number in [0, 1), is below ``f``.

So the same rows are held out whatever the recipe's seed, the rows' order or the other sources; the
training build (`qtulu.data.build`) and the ``reply_loss`` eval task both call `split_rows`.
Rows read as bad (`BadRow`) and rows that are not objects stay on the training side, where the
build's ``on_bad_row`` policy reports them.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from qtulu.data.errors import BadRow, DataError

Row = tuple[str, Any]


def unit_hash(obj: Any) -> str:
    """sha256 of ``obj``'s canonical JSON (keys sorted, ASCII escapes, compact separators)."""
    text = json.dumps(obj, sort_keys=True, ensure_ascii=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode("ascii")).hexdigest()


def _bucket(h: str) -> float:
    """A hash read as a number in [0, 1)."""
    return int(h[:16], 16) / 2.0**64


@dataclass
class Split:
    """The rows to train on, the held-out rows, and what the manifest records (`info`)."""

    train: list[Row]
    held: list[Row]
    info: dict[str, Any] = field(default_factory=dict)


def _unit_name(fmt: str) -> str:
    return {"superni": "instances", "oasst1": "trees"}.get(fmt, "rows")


def _units(fmt: str, row: Any) -> list[str] | str | None:
    """The unit hash(es) of one row: a list for a SuperNI task (one per instance), one hash for any
    other row (an object, or a TSV line's list of fields), None for a row that cannot be held out
    (a bad row, or a scalar)."""
    if isinstance(row, BadRow) or not isinstance(row, (dict, list)):
        return None
    if fmt == "superni" and isinstance(row.get("Instances"), list):
        return [unit_hash(inst) for inst in row["Instances"]]
    if fmt == "oasst1" and "prompt" not in row and row.get("message_tree_id") is not None:
        return unit_hash({"message_tree_id": row["message_tree_id"]})  # a flat message row: its whole tree
    return unit_hash(row)


def _chosen(hashes: set[str], hold_out: int | float) -> set[str]:
    if isinstance(hold_out, float):
        return {h for h in hashes if _bucket(h) < hold_out}
    return set(sorted(hashes)[:hold_out])


def split_rows(fmt: str, rows: list[Row], hold_out: int | float | None, source: str) -> Split:
    """``rows`` (``(where, row)`` as `qtulu.data.sources.load_source` reads them) split into the rows
    to train on and the held-out rows (see the module docstring). ``hold_out`` None: nothing held out."""
    if hold_out is None:
        return Split(list(rows), [], {})
    per_row = [_units(fmt, row) for _, row in rows]
    hashes = {h for u in per_row if u is not None for h in ([u] if isinstance(u, str) else u)}
    chosen = _chosen(hashes, hold_out)
    train: list[Row] = []
    held: list[Row] = []
    n_units = n_held = 0
    for (where, row), units in zip(rows, per_row):
        if units is None:
            train.append((where, row))
        elif isinstance(units, str):
            n_units += 1
            n_held += units in chosen
            (held if units in chosen else train).append((where, row))
        else:  # a SuperNI task: its instances split between the two sides
            keep = [inst for inst, h in zip(row["Instances"], units) if h not in chosen]
            out = [inst for inst, h in zip(row["Instances"], units) if h in chosen]
            n_units += len(units)
            n_held += len(out)
            train.append((where, {**row, "Instances": keep}))
            if out:
                held.append((where, {**row, "Instances": out}))
    unit = _unit_name(fmt)
    if n_held >= n_units:
        raise DataError(f"source {source!r}: hold_out={hold_out!r} holds out all {n_units} {unit} of the source: "
                        f"nothing left to train on (lower sources.{source}.hold_out or remove it)")
    digest = hashlib.sha256("\n".join(sorted(chosen)).encode()).hexdigest()
    return Split(train, held, {"hold_out": hold_out, "unit": unit, "held_out": n_held, "of": n_units,
                               "sha256": digest})

