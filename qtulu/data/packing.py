"""Pack tokenized examples into rows of at most ``max_seq_len`` tokens, best-fit decreasing.

Packing uses TRL's ``pack_dataset(strategy="bfd")`` (pyarrow + a segment tree) over the whole
dataset at once (one map batch: BFD quality drops when each 1,000-example batch is packed on its
own) and then adds ``position_ids`` restarting at 0 per example. No padding goes inside a row;
rows differ in length and the collator concatenates them.

Worked example (``max_seq_len=8``; examples of lengths 5, 3, 4, 2 tokens)::

    BFD sorts by length (5, 4, 3, 2) and puts each into the fullest row it still fits:
      row 0: ex0 (5) + ex2 (3)          seq_lens [5, 3]   position_ids [0 1 2 3 4 0 1 2]
      row 1: ex1 (4) + ex3 (2)          seq_lens [4, 2]   position_ids [0 1 2 3 0 1]
    utilization = 14 / (2 * 8) = 0.875

    For the attention kernel, a row (or several concatenated by `collate_packed`) is
    cu_seqlens = [0, 5, 8] (int32, (n_examples + 1,)), max_seqlen = 5.
"""

from __future__ import annotations

import uuid
from typing import Any, Sequence

import numpy as np


def pack_examples(dataset, max_seq_len: int):
    """Pack a `datasets.Dataset` with list columns ``input_ids`` and ``labels`` (each example at most
    ``max_seq_len`` long) into rows with ``input_ids``, ``labels``, ``position_ids``, ``seq_lens``."""
    from trl.data_utils import pack_dataset

    if len(dataset) == 0:
        return dataset.add_column("position_ids", []).add_column("seq_lens", [])
    lens = np.asarray(dataset.with_format("arrow")["input_ids"].combine_chunks().value_lengths())
    if lens.max() > max_seq_len:
        raise ValueError(f"pack_examples: an example has {int(lens.max())} tokens > max_seq_len {max_seq_len}; "
                         "truncate or drop it first (TRL's bfd would silently cut it)")
    import datasets
    import pyarrow as pa

    bars = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()  # our caller shows one bar for the whole build
    try:
        # a fresh fingerprint: hashing the map's arguments (datasets' default) costs more than packing
        packed = pack_dataset(dataset.select_columns(["input_ids", "labels"]), max_seq_len, strategy="bfd",
                              map_kwargs={"batch_size": len(dataset), "new_fingerprint": uuid.uuid4().hex})
    finally:
        if bars:
            datasets.enable_progress_bars()
    table = packed.with_format("arrow")[:]
    ids = table.column("input_ids").combine_chunks()
    seq_lens = table.column("seq_lengths").combine_chunks()
    # position_ids for all rows at once: a running index that restarts at each example start
    flat_lens = np.asarray(seq_lens.flatten(), dtype=np.int64)  # (n_examples,)
    total = int(flat_lens.sum())
    pos = (np.arange(total, dtype=np.int64) - np.repeat(np.cumsum(flat_lens) - flat_lens, flat_lens)).astype(np.int32)
    offsets = np.asarray(ids.offsets) - ids.offsets[0].as_py()
    position_ids = type(ids).from_arrays(pa.array(offsets, type=ids.offsets.type), pa.array(pos, type=pa.int32()))
    out = pa.table({
        "input_ids": ids,
        "labels": table.column("labels").combine_chunks(),
        "position_ids": position_ids,
        "seq_lens": seq_lens,
    })
    return datasets.Dataset(out)


def position_ids_from_seq_lens(seq_lens: Sequence[int]) -> list[int]:
    """``[3, 2] -> [0, 1, 2, 0, 1]``: positions restart at 0 for each example in a row."""
    seq_lens = np.asarray(seq_lens, dtype=np.int64)
    total = int(seq_lens.sum())
    starts = np.repeat(np.cumsum(seq_lens) - seq_lens, seq_lens)  # (total,)
    return (np.arange(total, dtype=np.int64) - starts).tolist()


def cu_seqlens_from_seq_lens(seq_lens: Sequence[int]):
    """``(cu_seqlens int32 (n+1,), max_seqlen)`` for the varlen attention kernel, from example lengths."""
    import torch

    lens = torch.as_tensor(list(seq_lens), dtype=torch.int32)  # (n,)
    cu = torch.zeros(len(lens) + 1, dtype=torch.int32)  # (n + 1,)
    cu[1:] = torch.cumsum(lens, 0)
    return cu, int(lens.max()) if len(lens) else 0


def utilization(seq_lens_per_row: Sequence[Sequence[int]], max_seq_len: int) -> float:
    """Real tokens / (rows * max_seq_len): the share of a fixed-budget batch that is not padding."""
    rows = len(seq_lens_per_row)
    if rows == 0:
        return 0.0
    return float(sum(sum(s) for s in seq_lens_per_row)) / (rows * max_seq_len)


def collate_packed(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Concatenate packed rows into one ``(1, total)`` batch for the varlen attention path.

    Returns ``input_ids``, ``labels``, ``position_ids`` (long, (1, total)), ``cu_seqlens`` (int32,
    (n+1,)) and ``max_seqlen``. The label of each example's first token is forced to -100 so that
    the last token of one example is never trained to predict the start of the next.
    """
    import torch

    ids = [t for r in rows for t in r["input_ids"]]
    labels = [t for r in rows for t in r["labels"]]
    seq_lens = [n for r in rows for n in r["seq_lens"]]
    pos = position_ids_from_seq_lens(seq_lens)
    labels_t = torch.tensor(labels, dtype=torch.long)  # (total,)
    cu, max_len = cu_seqlens_from_seq_lens(seq_lens)
    labels_t[cu[:-1].long()] = -100
    return {
        "input_ids": torch.tensor(ids, dtype=torch.long)[None],  # (1, total)
        "labels": labels_t[None],  # (1, total)
        "position_ids": torch.tensor(pos, dtype=torch.long)[None],  # (1, total)
        "cu_seqlens": cu,  # (n + 1,)
        "max_seqlen": max_len,
    }
