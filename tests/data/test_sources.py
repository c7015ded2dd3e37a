"""Local sources: json / jsonl / parquet / folders / globs, with bad lines located by file:line."""

from __future__ import annotations

import json

import pytest

from qtulu.data.errors import BadRow, DataError
from qtulu.data.sources import file_sha256, load_source
from qtulu.recipes import SourceSpec


def spec(path, fmt="alpaca"):
    return SourceSpec(name="s", format=fmt, path=str(path))


def test_jsonl_bad_lines_are_located(tmp_path):
    p = tmp_path / "d.jsonl"
    good = json.dumps({"instruction": "a", "output": "b"}).encode()
    p.write_bytes(good + b"\n\n{broken json\n" + b'{"instruction": "caf\xe9", "output": "x"}\n' + good + b"\n")
    loaded = load_source(spec(p))
    wheres = [w for w, _ in loaded.rows]
    assert wheres == [f"{p}:1", f"{p}:3", f"{p}:4", f"{p}:5"]
    kinds = [r.reason if isinstance(r, BadRow) else "ok" for _, r in loaded.rows]
    assert kinds == ["ok", "broken_json", "invalid_utf8", "ok"]
    assert loaded.inputs["files"] == {str(p): file_sha256(p)}


def test_json_list_object_and_broken_file(tmp_path):
    p = tmp_path / "d.json"
    p.write_text(json.dumps([{"instruction": "a", "output": "b"}, {"instruction": "c", "output": "d"}]))
    assert [w for w, _ in load_source(spec(p)).rows] == [f"{p}[0]", f"{p}[1]"]
    task = tmp_path / "task001.json"
    task.write_text(json.dumps({"Definition": ["d"], "Instances": []}))
    assert len(load_source(spec(task, "superni")).rows) == 1
    bad = tmp_path / "bad.json"
    bad.write_text('[\n  {"instruction": "a"},\n  {"instruction": \n]')
    with pytest.raises(DataError, match=r"bad\.json:4:\d+: broken JSON"):
        load_source(spec(bad))
    # invalid bytes inside a .json list: the file still loads; the row carries lone surrogates
    raw = tmp_path / "latin.json"
    raw.write_bytes(b'[{"instruction": "caf\xe9", "output": "x"}]')
    (_, row), = load_source(spec(raw)).rows
    with pytest.raises(UnicodeEncodeError):
        row["instruction"].encode("utf-8")


def test_parquet_folder_glob_and_missing(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    d = tmp_path / "parts"
    d.mkdir()
    pq.write_table(pa.table({"instruction": ["a", "b"], "output": ["1", "2"]}), d / "p0.parquet")
    (d / "p1.jsonl").write_text(json.dumps({"instruction": "c", "output": "3"}) + "\n")
    (d / "README.md").write_text("not data")
    rows = load_source(spec(d)).rows
    assert [r["instruction"] for _, r in rows] == ["a", "b", "c"]
    assert len(load_source(spec(d / "*.parquet")).rows) == 2
    with pytest.raises(DataError, match="file not found"):
        load_source(spec(tmp_path / "nope.jsonl"))
    with pytest.raises(DataError, match="unsupported file type"):
        load_source(spec(d / "README.md"))
    with pytest.raises(DataError, match="no .json/.jsonl/.parquet file matches"):
        load_source(spec(tmp_path / "*.csv"))
