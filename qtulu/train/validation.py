"""Held-out validation data (``data.validation``) for the validation loss (``train.eval_steps``).

``data.validation`` is either a fraction in (0, 1) of the built examples or a path to a file in a
source format. A fraction holds out whole examples, drawn with ``data.seed`` (same recipe and data
-> same split), and the training rows are packed from the remaining examples only, so no packed
training row holds a validation example. The split works on the packed build: its rows are cut back
into their examples along ``seq_lens`` (each segment is one whole built example, tokenized, masked,
truncated as the build made it) and both parts are packed anew with the build's packer. Doing it
here rather than inside `qtulu.data.build` keeps the build's output and cache unchanged and gives
the same split to data passed in already packed (``train(data=...)``: the demo, the study, tests).

A file is built as a one-source recipe with the run's tokenizer and data settings, so its examples
go through the same conversion, checks, masking and packing as the training data.

What was held out is recorded in the data manifest under ``"validation"`` (and so in the adapter's
``qtulu.json``).
"""

from __future__ import annotations

import dataclasses
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from qtulu.errors import QtuluError


class ValidationError(QtuluError, ValueError):
    """``data.validation`` cannot be honoured (too few examples, a missing file)."""


def check_validation_source(recipe) -> None:
    """Before anything heavy: a ``data.validation`` path must be a readable file or folder."""
    v = recipe.data.validation
    if isinstance(v, str):
        p = Path(v)
        if not p.exists():
            raise ValidationError(f"{recipe.path or recipe.name}: data.validation: no such file: {p}")


def _examples(dataset) -> tuple[Any, Any, np.ndarray]:
    """The packed rows' examples: flat ``input_ids`` / ``labels`` arrays and per-example lengths (row order)."""
    table = dataset.with_format("arrow")[:]
    lens_col = "seq_lens" if "seq_lens" in table.column_names else "seq_lengths"
    ids = table.column("input_ids").combine_chunks()
    labels = table.column("labels").combine_chunks()
    lens = np.asarray(table.column(lens_col).combine_chunks().flatten(), dtype=np.int64)
    return ids.flatten(), labels.flatten(), lens


def _pack_subset(flat_ids, flat_labels, lens: np.ndarray, starts: np.ndarray, keep: np.ndarray, max_seq_len: int):
    """Pack the examples ``keep`` (indices into ``lens``/``starts``) into rows of ``max_seq_len`` tokens."""
    import datasets
    import pyarrow as pa

    from qtulu.data.packing import pack_examples

    sub_lens = lens[keep]
    ends = np.cumsum(sub_lens)
    # token indices of the kept examples, in order: each example's start in the flat arrays + 0..len-1
    idx = np.repeat(starts[keep] - (ends - sub_lens), sub_lens) + np.arange(int(ends[-1]) if len(ends) else 0)
    big = len(idx) >= 2**31  # 32-bit list offsets up to 2^31 tokens, as the build
    list_cls, off_type = (pa.LargeListArray, pa.int64()) if big else (pa.ListArray, pa.int32())
    offsets = pa.array(np.concatenate([[0], ends]), type=off_type)
    take = pa.array(idx, type=pa.int64())
    table = pa.table({
        "input_ids": list_cls.from_arrays(offsets, flat_ids.take(take)),
        "labels": list_cls.from_arrays(offsets, flat_labels.take(take)),
    })
    return pack_examples(datasets.Dataset(table), max_seq_len)


def _count(dataset) -> dict[str, int]:
    flat_ids, flat_labels, lens = _examples(dataset)
    return {"examples": int(len(lens)), "tokens": int(lens.sum()), "rows": len(dataset),
            "supervised_tokens": int(np.count_nonzero(np.asarray(flat_labels) != -100))}


def split_fraction(dataset, fraction: float, seed: int, max_seq_len: int):
    """``(train_rows, validation_rows, info)``: ``fraction`` of the examples of packed ``dataset`` held out.

    The held-out examples are ``round(fraction * n)`` (at least 1) drawn without replacement with
    ``numpy.random.default_rng([seed, crc32("validation")])``; at least one example must remain for
    training. Both parts are packed anew (BFD) into rows of ``max_seq_len`` tokens.
    """
    flat_ids, flat_labels, lens = _examples(dataset)
    n = len(lens)
    k = max(1, int(round(fraction * n)))
    if k >= n:
        raise ValidationError(f"data.validation={fraction}: {n} example(s) built, holding out {k} leaves none to "
                              "train on; lower the fraction or add data")
    rng = np.random.default_rng([seed, zlib.crc32(b"validation")])
    held = np.zeros(n, dtype=bool)
    held[rng.choice(n, size=k, replace=False)] = True
    starts = np.concatenate([[0], np.cumsum(lens)[:-1]])
    max_seq_len = max(int(max_seq_len), int(lens.max()))
    train_rows = _pack_subset(flat_ids, flat_labels, lens, starts, np.flatnonzero(~held), max_seq_len)
    val_rows = _pack_subset(flat_ids, flat_labels, lens, starts, np.flatnonzero(held), max_seq_len)
    info = {"source": "fraction", "fraction": fraction, "seed": seed,
            "train": _count(train_rows), "validation": _count(val_rows)}
    return train_rows, val_rows, info


def build_validation_file(recipe, tokenizer, *, progress: bool = False):
    """``(validation_rows, manifest)``: the ``data.validation`` file built like a one-source recipe."""
    from qtulu.data.build import build_dataset
    from qtulu.recipes import SourceSpec

    path = recipe.data.validation
    fmt = recipe.data.validation_format or recipe.sources[0].format
    one = dataclasses.replace(
        recipe,
        name=f"{recipe.name}-validation",
        sources=[SourceSpec(name="validation", format=fmt, path=str(path))],
        data=dataclasses.replace(recipe.data, validation=None, validation_format=None),
    )
    built = build_dataset(one, tokenizer, progress=progress)
    return built.dataset, built.manifest


def hold_out(recipe, data, tokenizer, *, progress: bool = False):
    """Apply ``data.validation`` to ``data`` (a `BuiltData` or packed rows).

    Returns ``(train_data, validation_rows, manifest)``: ``train_data`` of the same kind as ``data``
    (a `BuiltData` keeps its manifest, which gains a ``"validation"`` entry), ``validation_rows``
    (packed) or None, and the manifest to record (None when there is none and no validation).
    """
    v = recipe.data.validation
    manifest = getattr(data, "manifest", None)
    rows = data.dataset if hasattr(data, "dataset") else data
    if v is None:
        return data, None, manifest
    if isinstance(v, float):
        packing = (manifest or {}).get("packing") or {}
        max_seq_len = int(packing.get("max_seq_len") or recipe.data.max_seq_len)
        rows, val_rows, info = split_fraction(rows, v, recipe.data.seed, max_seq_len)
    else:
        val_rows, val_manifest = build_validation_file(recipe, tokenizer, progress=progress)
        info = {"source": "file", "path": str(v), "format": recipe.data.validation_format or recipe.sources[0].format,
                "train": _count(rows), "validation": _count(val_rows),
                "dropped": val_manifest.get("dropped", {})}
    manifest = dict(manifest or {})
    manifest["validation"] = info
    if hasattr(data, "dataset"):
        data = dataclasses.replace(data, dataset=rows, manifest=manifest)
    else:
        data = rows
    return data, val_rows, manifest
