"""Packing: every example lands whole in exactly one row, positions restart, the budget holds."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

from qtulu.data.packing import collate_packed, cu_seqlens_from_seq_lens, pack_examples, position_ids_from_seq_lens


def _dataset(lengths, seed=0):
    import datasets

    rng = np.random.default_rng(seed)
    ids, labels = [], []
    for k, n in enumerate(lengths):
        x = rng.integers(3, 1000, size=n).tolist()
        x[0] = 1_000_000 + k  # a tag: which example this is
        ids.append(x)
        labels.append([-100] + x[1:])
    return datasets.Dataset.from_dict({"input_ids": ids, "labels": labels})


def _examples_of(packed):
    out = []
    for row in packed:
        assert len(row["input_ids"]) == len(row["labels"]) == len(row["position_ids"]) == sum(row["seq_lens"])
        pos = 0
        for n in row["seq_lens"]:
            assert row["position_ids"][pos:pos + n] == list(range(n))
            out.append((tuple(row["input_ids"][pos:pos + n]), tuple(row["labels"][pos:pos + n])))
            pos += n
    return out


@pytest.mark.parametrize("budget", [17, 64, 129])
def test_bfd_keeps_every_example_whole_once(budget):
    rng = np.random.default_rng(budget)
    lengths = rng.integers(1, budget + 1, size=300).tolist()
    ds = _dataset(lengths, seed=budget)
    packed = pack_examples(ds, budget)
    got = _examples_of(packed)
    want = [(tuple(i), tuple(l)) for i, l in zip(ds["input_ids"], ds["labels"])]
    assert Counter(got) == Counter(want)
    assert max(len(r) for r in packed["input_ids"]) <= budget
    # BFD's guarantee: at most 11/9 OPT + 6/9 rows; OPT >= both lower bounds below
    opt_lower = max(-(-sum(lengths) // budget), sum(n > budget / 2 for n in lengths))
    assert len(packed) <= 11 / 9 * opt_lower + 6 / 9 < len(lengths)


def test_overlong_example_is_refused_not_cut():
    with pytest.raises(ValueError, match="tokens > max_seq_len"):
        pack_examples(_dataset([5, 40]), 32)


def test_positions_and_cu_seqlens():
    assert position_ids_from_seq_lens([3, 1, 2]) == [0, 1, 2, 0, 0, 1]
    cu, m = cu_seqlens_from_seq_lens([3, 1, 2])
    assert cu.dtype == torch.int32 and cu.tolist() == [0, 3, 4, 6] and m == 3


def test_collate_packed_concatenates_rows_and_masks_example_starts():
    rows = [{"input_ids": [5, 6, 7, 8, 9], "labels": [5, 6, -100, 8, 9], "seq_lens": [2, 3]},
            {"input_ids": [10, 11], "labels": [10, 11], "seq_lens": [2]}]
    b = collate_packed(rows)
    assert b["input_ids"].shape == (1, 7) and b["position_ids"].tolist() == [[0, 1, 0, 1, 2, 0, 1]]
    assert b["cu_seqlens"].tolist() == [0, 2, 5, 7] and b["max_seqlen"] == 3
    assert b["labels"].tolist() == [[-100, 6, -100, 8, 9, -100, 11]]
