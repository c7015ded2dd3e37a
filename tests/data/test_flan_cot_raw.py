"""Format flan_cot_raw: FLAN's raw CoT TSV rendered as FLAN's zero-shot CoT submix renders it, then
converted by the `cot` converter. On the real GSM8K-train rows of ../shared/data (skipped, naming it,
when absent) and on small files the tests write (bad lines, FLAN's dropped remainder)."""

from __future__ import annotations

import json

import pytest

from qtulu.data.build import build_dataset
from qtulu.data.errors import BadRow
from qtulu.data.formats import Context, Filtered, convert
from qtulu.data.formats.flan_cot_raw import GSM8K_TEMPLATES, zsopt_rows
from qtulu.data.sources import load_source
from qtulu.recipes import SourceSpec, load_recipe

RAW = ("sources", "release_samples", "flan_cot_gsm8k_train_raw.tsv")

# Three of PATTERNS["cot_gsm8k"] as FLAN's source writes them, index -> (inputs, targets), from
# https://github.com/google-research/FLAN/blob/e9e4ec6e2701182c7a91af176f705310da541277/flan/v2/templates.py
# (the list was last changed in 2c79a31)
FLAN_GSM8K = {
    0: ("{question} Let's think first. Chain of thought:",
        "{chain_of_thought}\nTherefore, the answer is {answer}."),
    4: (("Lizzy: {question}.\nMe: Hmmm, let me think. I think this is the "
         "detailed solution:"), "{chain_of_thought} Final answer: {answer}."),
    7: ("{question}\nThoughts? Step-by-step reasoning:",
        "{chain_of_thought}\nThus, the answer is {answer}."),
}


def _by_hand(template: str, question: str, answer: str, rationale: str) -> str:
    return template.replace("{question}", question).replace("{answer}", answer).replace("{chain_of_thought}", rationale)


def _spec(path, fmt="flan_cot_raw") -> SourceSpec:
    return SourceSpec(name="cot", format=fmt, path=str(path))


def _messages(out) -> list:
    return [(w, m) for w, m in out if isinstance(m, list)]


def test_real_rows_take_flans_template_of_their_position(shared_data):
    path = shared_data(*RAW)
    lines = [line.split("\t") for line in path.read_text(encoding="utf-8").splitlines()]
    rendered = list(zsopt_rows(load_source(_spec(path)).rows))
    assert len(rendered) == len(lines) == 200 and len(lines) % 10 == 0  # no remainder to drop
    assert all(GSM8K_TEMPLATES[k] == FLAN_GSM8K[k] for k in FLAN_GSM8K) and len(set(GSM8K_TEMPLATES)) == 10
    for i, ((where, row), (question, answer, rationale)) in enumerate(zip(rendered, lines)):
        assert where.endswith(f":{i + 1}") and row["template_type"] == "zs_opt" and row["template_idx"] == i % 10
        assert question in row["inputs"] and row["targets"].startswith(rationale) and row["targets"].endswith(f"{answer}.")
        inputs, targets = GSM8K_TEMPLATES[i % 10]
        assert (row["inputs"], row["targets"]) == (_by_hand(inputs, question, answer, rationale),
                                                   _by_hand(targets, question, answer, rationale))
        if i % 10 in FLAN_GSM8K:
            inputs, targets = FLAN_GSM8K[i % 10]
            assert row["inputs"] == _by_hand(inputs, question, answer, rationale)
            assert row["targets"] == _by_hand(targets, question, answer, rationale)


@pytest.mark.parametrize("zero_shot", [None, 64])
def test_conversations_equal_the_cot_converters_on_the_same_zsopt_rows(shared_data, tmp_path, zero_shot):
    path = shared_data(*RAW)
    rows = load_source(_spec(path)).rows
    zsopt = tmp_path / "cot_zsopt.jsonl"  # the rows as a cot_zsopt.jsonl file of open-instruct's layout
    zsopt.write_text("".join(json.dumps({"inputs": r["inputs"], "targets": r["targets"]}) + "\n"
                             for _, r in zsopt_rows(rows)))
    ours = _messages(convert("flan_cot_raw", rows, {"zero_shot": zero_shot}, Context(seed=7)))
    theirs = _messages(convert("cot", load_source(_spec(zsopt, "cot")).rows, {"zero_shot": zero_shot}, Context(seed=7)))
    assert [m for _, m in ours] == [m for _, m in theirs] and len(ours) == (zero_shot or 200)
    assert [w.rsplit(":", 1)[1] for w, _ in ours] == [w.rsplit(":", 1)[1] for w, _ in theirs]
    by_line = {int(w.rsplit(":", 1)[1]): m for w, m in ours}
    if 1 in by_line:  # template 0 ends with ":": no newline added (open-instruct's rule)
        assert by_line[1][0]["content"].endswith("Chain of thought:")
    if 3 in by_line:  # template 2 ends with ".": a newline added
        assert by_line[3][0]["content"].endswith("Let's be accurate as possible.\n")


def test_the_seed_draws_rows_and_never_changes_a_rows_template(shared_data):
    rows = load_source(_spec(shared_data(*RAW))).rows

    def drawn(seed):
        return _messages(convert("flan_cot_raw", rows, {"zero_shot": 20}, Context(seed=seed)))

    a, again, b = drawn(1), drawn(1), drawn(2)
    assert a == again and [w for w, _ in a] != [w for w, _ in b]
    for where, msgs in a + b:  # FLAN's choice is by position: line n takes template (n - 1) % 10
        inputs = GSM8K_TEMPLATES[(int(where.rsplit(":", 1)[1]) - 1) % 10][0]
        head, _, tail = inputs.partition("{question}")
        assert msgs[0]["content"].startswith(head) and msgs[0]["content"].rstrip("\n").endswith(tail)


def _write_tsv(tmp_path, lines):
    path = tmp_path / "t.tsv"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_bad_lines_escapes_and_flans_dropped_remainder(tmp_path):
    lines = [f"What is {i} + {i}?\t{2 * i}\t{i} + {i} = {2 * i}." for i in range(12)]
    lines[0] = "Line one\\nline two?\tA\\nB\tStep one.\\nStep two."
    lines[2] = "only a question\tand an answer"
    path = _write_tsv(tmp_path, lines)
    out = list(zsopt_rows(load_source(_spec(path)).rows))
    first = out[0][1]
    assert first["inputs"] == "Line one\nline two? Let's think first. Chain of thought:"  # FLAN unescapes question and rationale,
    assert first["targets"] == "Step one.\nStep two.\nTherefore, the answer is A\\nB."  # not the answer
    bad = [(w, r) for w, r in out if isinstance(r, BadRow)]
    assert [(w.rsplit("/", 1)[1], r.reason) for w, r in bad] == [("t.tsv:3", "bad_field_count")]
    assert "expected 3 tab-separated fields" in bad[0][1].detail and "got 2" in bad[0][1].detail
    assert out[3][1]["template_idx"] == 3  # a bad line keeps its position
    assert [(w.rsplit(":", 1)[1], r.reason) for w, r in out if isinstance(r, Filtered)] == \
        [("11", "flan_batch_remainder"), ("12", "flan_batch_remainder")]  # 12 lines: FLAN's batches of 10 drop 2


def test_bad_line_stops_the_build_at_file_line_or_is_counted(tmp_path, capsys, llama_tokenizer_path):
    from qtulu.cli import main

    lines = [f"What is {i} + {i}?\t{2 * i}\t{i} + {i} = {2 * i}." for i in range(13)]
    lines[4] = "no tabs at all"
    _write_tsv(tmp_path, lines)
    recipe = tmp_path / "r.yaml"
    recipe.write_text("# Run: qtulu data build r.yaml --out out\n"
                      "sources:\n  - {name: cot, format: flan_cot_raw, path: t.tsv}\ndata:\n  max_seq_len: 256\n")
    rc = main(["data", "build", str(recipe), "--out", str(tmp_path / "out"), "--no-progress",
               "--tokenizer", str(llama_tokenizer_path)])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "t.tsv:5" in err and "bad_field_count" in err and "Traceback" not in err
    m = build_dataset(load_recipe(recipe, ["data.on_bad_row=skip"]), str(llama_tokenizer_path), progress=False).manifest
    assert m["sources"] == {"cot": 9} and m["dropped_by_source"] == {"cot": {"bad_field_count": 1}}
    assert m["filtered_by_source"] == {"cot": {"flan_batch_remainder": 3}}


def test_the_cot_recipe_builds_64_examples_from_the_raw_file(shared_data, tmp_path, capsys, llama_tokenizer_path):
    """The study's row: recipe cot with the raw TSV as its source (format flan_cot_raw, no options)."""
    from qtulu.cli import main

    path = shared_data(*RAW)
    overrides = ["-o", "sources.cot.format=flan_cot_raw", "-o", f"sources.cot.path={path}", "-o", "sources.cot.options={}"]
    assert main(["data", "build", "cot", "--out", str(tmp_path / "out"), "--tokenizer", str(llama_tokenizer_path),
                 "--max-seq-len", "256", "--no-progress", *overrides, "-o", "sources.cot.count=64"]) == 0
    capsys.readouterr()
    m = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert m["sources"] == {"cot": 64} and m["examples"] == 64 and m["max_example_len"] <= 256
    assert m["dropped"] == {} and m["filtered_by_source"] == {} and m["inputs"]["cot"]["path"] == str(path)
    assert 0 < m["supervised_tokens"] < m["tokens"] and m["packing"]["max_seq_len"] == 256


def test_data_formats_lists_every_format_with_its_options(capsys):
    from qtulu.cli import main
    from qtulu.recipes import FORMATS

    assert main(["data", "formats"]) == 0
    out = capsys.readouterr().out
    listed = [line.split(":", 1)[0] for line in out.splitlines() if not line.startswith(" ")]
    assert listed == list(FORMATS) and "flan_cot_raw" in listed
    assert "flan_cot_raw: FLAN's raw GSM8K CoT TSV" in out and "    zero_shot (default null): rendered zs_opt rows" in out


def test_positions_count_per_file_of_a_folder(tmp_path):
    for name, n in (("a.tsv", 10), ("b.tsv", 11)):
        (tmp_path / name).write_text("".join(f"Q{i}?\t{i}\tR{i}.\n" for i in range(n)))
    out = list(zsopt_rows(load_source(_spec(tmp_path)).rows))
    idx = [(w.rsplit("/", 1)[1], r["template_idx"] if isinstance(r, dict) else r.reason) for w, r in out]
    assert idx == [(f"a.tsv:{i + 1}", i) for i in range(10)] + [(f"b.tsv:{i + 1}", i) for i in range(10)] + \
        [("b.tsv:11", "flan_batch_remainder")]


def test_held_out_rows_leave_the_others_their_flan_template(shared_data, tmp_path):
    """sources.cot.hold_out removes rows before conversion: each remaining line keeps the template of
    its place in the file (FLAN batches by file position), not of its place among the rows left."""
    from qtulu.data.holdout import split_rows
    from qtulu.data.formats.flan_cot_raw import zsopt_rows
    from qtulu.data.sources import read_tsv

    path = shared_data(*RAW)
    rows = list(read_tsv(path, path.read_bytes()))
    whole = {w: r["template_idx"] for w, r in zsopt_rows(rows)}
    split = split_rows("flan_cot_raw", rows, 7, "cot")
    assert len(split.held) == 7
    kept = {w: r["template_idx"] for w, r in zsopt_rows(split.train)}
    assert len(kept) == len(rows) - 7 and all(whole[w] == idx for w, idx in kept.items())
