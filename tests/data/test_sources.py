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


def test_tsv_lines_are_field_lists_and_every_line_keeps_its_number(tmp_path):
    p = tmp_path / "raw.tsv"
    p.write_bytes(b"q1\ta1\tr1\r\n\nq\xe9\ta\tr\nq4\t\tr4\tx\n")
    rows = load_source(spec(p, "flan_cot_raw")).rows
    assert [w for w, _ in rows] == [f"{p}:{n}" for n in (1, 2, 3, 4)]  # the blank line counts; no row after the final newline
    assert rows[0][1] == ["q1", "a1", "r1"] and rows[1][1] == [""] and rows[3][1] == ["q4", "", "r4", "x"]
    assert isinstance(rows[2][1], BadRow) and rows[2][1].reason == "invalid_utf8"
    assert load_source(spec(tmp_path / "*.tsv", "flan_cot_raw")).inputs["files"] == {str(p): file_sha256(p)}


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
    with pytest.raises(DataError, match="no .json/.jsonl/.tsv/.parquet/.arrow file matches"):
        load_source(spec(tmp_path / "*.csv"))


def test_save_to_disk_folders_and_arrow_files(tmp_path):
    import datasets

    ds = datasets.Dataset.from_list([{"instruction": "a", "output": "1"}, {"instruction": "b", "output": "2"}])
    ds.save_to_disk(str(tmp_path / "saved"))
    loaded = load_source(spec(tmp_path / "saved"))
    assert [r["instruction"] for _, r in loaded.rows] == ["a", "b"]  # not dataset_info.json read as a row
    assert list(loaded.inputs["files"]) == [str(tmp_path / "saved")]
    datasets.DatasetDict({"train": ds, "test": ds.select([1])}).save_to_disk(str(tmp_path / "dd"))
    assert len(load_source(spec(tmp_path / "dd")).rows) == 2
    test_split = SourceSpec(name="s", format="alpaca", path=str(tmp_path / "dd"), split="test")
    assert [r["instruction"] for _, r in load_source(test_split).rows] == ["b"]
    with pytest.raises(DataError, match="no split 'dev'"):
        load_source(SourceSpec(name="s", format="alpaca", path=str(tmp_path / "dd"), split="dev"))
    arrow = next((tmp_path / "saved").glob("*.arrow"))
    assert [r["output"] for _, r in load_source(spec(arrow)).rows] == ["1", "2"]
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("x")
    with pytest.raises(DataError, match="not a `datasets` save_to_disk folder"):
        load_source(spec(tmp_path / "empty"))


@pytest.mark.parametrize("name,content", [("bad.parquet", b"PAR1 not really PAR1"), ("bad.arrow", b"garbage"),
                                          ("trunc.parquet", None)])
def test_corrupt_columnar_files_are_one_line_errors_naming_the_file(tmp_path, name, content):
    import pyarrow as pa
    import pyarrow.parquet as pq

    p = tmp_path / name
    if content is None:  # a real parquet file cut in half
        pq.write_table(pa.table({"instruction": ["a"] * 100, "output": ["b"] * 100}), p)
        p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    else:
        p.write_bytes(content)
    with pytest.raises(DataError) as e:
        load_source(spec(p))
    assert str(p) in str(e.value) and "\n" not in str(e.value)


def test_cli_corrupt_parquet_is_one_line_naming_the_file(tmp_path, capsys, llama_tokenizer_path):
    from qtulu.cli import main

    bad = tmp_path / "part.parquet"
    bad.write_bytes(b"PAR1\x00\x01 definitely not parquet PAR1")
    recipe = tmp_path / "r.yaml"
    recipe.write_text("# Run: qtulu data build r.yaml --out out\nsources:\n  - {name: a, format: alpaca, path: part.parquet}\n")
    rc = main(["data", "build", str(recipe), "--out", str(tmp_path / "out"), "--no-progress", "--tokenizer", str(llama_tokenizer_path)])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and str(bad) in err and "parquet" in err and "Traceback" not in err
