"""The released Tülu mixtures as sources: `tulu_v1_released` trains on the mixture as released, and
any per-source recipe takes its rows from it (``release``), on a parquet fixture written here in the
layout of allenai/tulu-v1-sft-mixture (``dataset``, ``id``, ``messages``)."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest

from qtulu.data.build import build_dataset
from qtulu.data.chat import encode_batch, validate_messages
from qtulu.data.errors import DataError
from qtulu.recipes import load_recipe


@pytest.fixture
def mixture(tmp_path, shared_data, ref):
    """A small mixture parquet: dolly (oracle-converted with templates), oasst1 paths and cot rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    sd = shared_data
    dolly = [json.loads(line) for line in sd("sources", "release_samples", "dolly_sample.jsonl").read_text().splitlines()]
    trees = [json.loads(line) for line in sd("sources", "release_samples", "oasst1_trees_sample.jsonl").read_text().splitlines()]
    rows = [("dolly", m) for m in ref.convert_instruction_rows(dolly, ref.seeded(42), ("instruction", "context", "response"))]
    rows += [("oasst1", m) for m in ref.convert_oasst1(copy.deepcopy(trees[:5]), "2306")]
    rows += [("cot", [{"role": "user", "content": "Q: 2+3?\n"}, {"role": "assistant", "content": "2+3=5. The answer is 5."}])]
    table = pa.table({"dataset": [d for d, _ in rows], "id": [f"{d}_{i}" for i, (d, _) in enumerate(rows)],
                      "messages": [m for _, m in rows]})
    path = tmp_path / "tulu-v1-sft-mixture" / "train-00000-of-00001.parquet"
    path.parent.mkdir()
    pq.write_table(table, path)
    return path, rows


def _build(name, overrides, tok_path):
    return build_dataset(load_recipe(name, ["data.max_seq_len=1024", *overrides]), str(tok_path), progress=False)


def test_tulu_v1_released_trains_on_the_rows_as_released(mixture, llama_tokenizer_path, llama_tok):
    path, rows = mixture
    built = _build("tulu_v1_released", [f"sources.tulu_v1.path={path.parent}"], llama_tokenizer_path)
    m = built.manifest
    assert m["sources"] == {"tulu_v1": len(rows)} and m["dropped"] == {} and m["profile"] == "open_instruct"
    # the ids are those of the released messages, unchanged (no template drawn again)
    ours = sorted(map(tuple, (np.asarray(x) for x in _unpacked(built))))
    expected = sorted(tuple(ids) for ids, _ in encode_batch([validate_messages(mm) for _, mm in rows], llama_tok))
    assert ours == expected


def _unpacked(built):
    out = []
    for row in built.dataset:
        start = 0
        for n in row["seq_lens"]:
            out.append(row["input_ids"][start : start + n])
            start += n
    return out


def test_a_per_source_recipe_takes_its_rows_from_the_release(mixture, llama_tokenizer_path):
    path, rows = mixture
    dolly = _build("dolly", [f"sources.dolly.release={path}"], llama_tokenizer_path)
    assert dolly.manifest["sources"] == {"dolly": 11}
    assert dolly.manifest["inputs"]["dolly"]["release"] == {"release": str(path), "dataset": "dolly"}
    assert str(path) in dolly.manifest["inputs"]["dolly"]["files"]
    cot = _build("cot", [f"sources.cot.release={path}"], llama_tokenizer_path)
    assert cot.manifest["sources"] == {"cot": 1}
    renamed = _build("dolly", [f"sources.dolly.release={path}", "sources.dolly.release_dataset=oasst1"], llama_tokenizer_path)
    assert renamed.manifest["sources"] == {"dolly": sum(1 for d, _ in rows if d == "oasst1")}
    with pytest.raises(DataError, match=r"no row with dataset 'sharegpt' \(datasets present: cot \(1\), dolly \(11\), oasst1"):
        _build("sharegpt", [f"sources.sharegpt.release={path}"], llama_tokenizer_path)
