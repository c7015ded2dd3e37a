"""The build: policies for bad rows and over-long examples, sampling, manifest, save/load, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from qtulu.data.build import build_dataset, load_built
from qtulu.data.chat import IGNORE_INDEX
from qtulu.data.errors import DataError
from qtulu.recipes import load_recipe

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "shared_sources.yaml"


def _alpaca(i, n_out=1):
    return {"instruction": f"Echo {i}", "input": "", "output": "x" * n_out + str(i)}


def _write_sources(tmp_path: Path, bad: bool = False) -> Path:
    rows = [json.dumps(_alpaca(i, 1 + i % 7)) for i in range(40)]
    if bad:
        rows.insert(3, "{not json")
        rows.insert(10, json.dumps({"instruction": "no output"}))
        rows.insert(20, json.dumps({"instruction": "q", "output": None}))
        rows.insert(25, json.dumps({"instruction": "q", "output": "  "}))
    (tmp_path / "a.jsonl").write_text("\n".join(rows) + "\n")
    (tmp_path / "b.json").write_text(json.dumps([
        {"id": str(i), "conversations": [{"from": "human", "value": f"turn {k}"} if k % 2 == 0 else {"from": "gpt", "value": f"reply {i}.{k}"}
                                         for k in range(2 + 2 * (i % 3))]} for i in range(12)]))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "# Run: qtulu data build r.yaml --out out\n"
        "name: tiny\n"
        "sources:\n"
        "  - {name: a, format: alpaca, path: a.jsonl}\n"
        "  - {name: b, format: sharegpt, path: b.json, options: {split_long: true}}\n"
        "data:\n  max_seq_len: 128\n")
    return recipe


def test_build_with_char_tokenizer_manifest_and_invariants(tmp_path, char_tokenizer):
    recipe = load_recipe(_write_sources(tmp_path))
    built = build_dataset(recipe, char_tokenizer, progress=False)
    m = built.manifest
    assert m["sources"] == {"a": 40, "b": 12} and m["examples"] == 52 and m["dropped"] == {}
    assert m["packing"]["sequences"] == len(built.dataset) and 0 < m["packing"]["utilization"] <= 1
    assert set(m["inputs"]["a"]["files"]) == {str(tmp_path / "a.jsonl")}
    assert m["tokens"] == sum(sum(r) for r in built.dataset["seq_lens"])
    for row in built.dataset:
        assert len(row["input_ids"]) <= 128 and len(row["input_ids"]) == sum(row["seq_lens"])
        pos = np.asarray(row["position_ids"])
        assert (np.flatnonzero(pos == 0) == np.cumsum([0] + row["seq_lens"][:-1])).all()
        labelled = [t for t, lab in zip(row["input_ids"], row["labels"]) if lab != IGNORE_INDEX]
        text = char_tokenizer.decode(labelled)
        assert "<|user|>" not in text and "Echo" not in text and "turn" not in text
    # deterministic
    again = build_dataset(recipe, char_tokenizer, progress=False)
    assert again.dataset["input_ids"] == built.dataset["input_ids"] and again.manifest == m


def test_bad_rows_error_names_file_line_and_reason(tmp_path, char_tokenizer):
    recipe = load_recipe(_write_sources(tmp_path, bad=True))
    with pytest.raises(DataError) as e:
        build_dataset(recipe, char_tokenizer, progress=False)
    assert f"{tmp_path / 'a.jsonl'}:4" in str(e.value) and "broken_json" in str(e.value) and "on_bad_row=skip" in str(e.value)


def test_bad_rows_skip_counts_by_reason(tmp_path, char_tokenizer):
    recipe = load_recipe(_write_sources(tmp_path, bad=True), ["data.on_bad_row=skip"])
    m = build_dataset(recipe, char_tokenizer, progress=False).manifest
    # the empty reply is kept as open-instruct keeps it, and dropped as its finetune.py drops an
    # example with no label (tests/data/test_empty_replies.py); `plain` refuses it as a bad row
    assert m["dropped"] == {"broken_json": 1, "missing_field": 1, "null_content": 1, "empty_reply": 1}
    assert m["dropped_by_source"] == {"a": m["dropped"]} and m["sources"]["a"] == 40
    assert m["empty_replies_by_source"] == {"a": 1, "b": 0}
    plain = load_recipe(_write_sources(tmp_path, bad=True), ["data.on_bad_row=skip", "data.profile=plain"])
    m = build_dataset(plain, char_tokenizer, progress=False).manifest
    assert m["dropped"] == {"broken_json": 1, "missing_field": 1, "null_content": 1, "empty_assistant_turn": 1}


def test_overlong_truncate_drop_and_split(tmp_path, char_tokenizer):
    long_rows = [{"instruction": "q" * 100, "output": "a" * 10},  # prompt eats the budget: no label left
                 {"instruction": "q", "output": "a" * 200}]  # reply truncated
    (tmp_path / "long.json").write_text(json.dumps(long_rows))
    turns = [{"role": "user" if k % 2 == 0 else "assistant", "content": str(k) * 30} for k in range(8)]
    (tmp_path / "conv.json").write_text(json.dumps([{"messages": turns}]))
    (tmp_path / "r.yaml").write_text(
        "sources:\n  - {name: long, format: alpaca, path: long.json}\n"
        "  - {name: conv, format: messages, path: conv.json, options: {split_long: true}}\n"
        "data:\n  max_seq_len: 80\n  profile: plain\n")
    r = load_recipe(tmp_path / "r.yaml")
    m = build_dataset(r, char_tokenizer, progress=False).manifest
    assert m["dropped"] == {"no_supervised_tokens": 1} and m["truncated"] == 1 and m["profile"] == "plain"
    assert m["sources"] == {"long": 1, "conv": 4} and m["split_conversations_extra_chunks"] == 3
    m = build_dataset(load_recipe(tmp_path / "r.yaml", ["data.on_overlong=drop"]), char_tokenizer, progress=False).manifest
    assert m["dropped"] == {"overlong": 2} and m["truncated"] == 0
    m = build_dataset(load_recipe(tmp_path / "r.yaml", ["sources.conv.options={split_long: false}"]), char_tokenizer,
                      progress=False).manifest
    assert m["sources"]["conv"] == 1 and m["truncated"] == 2


def test_sharegpt_splits_in_its_converter_as_open_instruct(tmp_path, char_tokenizer):
    """ShareGPT's split_long is open-instruct's (scripts/split_sharegpt_conversations.py): turn costs
    from the tokenizer + 6, whole (human, gpt) pairs; what it leaves out is counted under `filtered`."""
    conv = [{"from": "human" if k % 2 == 0 else "gpt", "value": str(k) * 30} for k in range(8)]
    (tmp_path / "sg.json").write_text(json.dumps([{"id": "a", "conversations": conv},
                                                  {"id": "b", "conversations": [{"from": "system", "value": "x"}] + conv[:2]}]))
    (tmp_path / "r.yaml").write_text("sources:\n  - {name: sg, format: sharegpt, path: sg.json, options: {split_long: true}}\n"
                                     "data:\n  max_seq_len: 128\n")
    m = build_dataset(load_recipe(tmp_path / "r.yaml"), char_tokenizer, progress=False).manifest
    # each pair costs 2 * (30 + 1 + 6) = 74 tokens: one pair per chunk, and the last pair is lost
    assert m["sources"] == {"sg": 3} and m["split_conversations_extra_chunks"] == 0
    assert m["filtered_by_source"] == {"sg": {"not_alternating": 1, "split_dropped_turn_pair": 1}}
    assert m["dropped"] == {}


def test_counts_fraction_and_resampling_are_seeded(tmp_path, char_tokenizer):
    recipe_path = _write_sources(tmp_path)
    m = build_dataset(load_recipe(recipe_path, ["sources.a.count=100", "sources.b.count=0.5"]), char_tokenizer,
                      progress=False).manifest
    assert m["sources"] == {"a": 100, "b": 6}
    d1 = build_dataset(load_recipe(recipe_path, ["sources.a.count=10"]), char_tokenizer, progress=False).dataset
    d2 = build_dataset(load_recipe(recipe_path, ["sources.a.count=10", "data.seed=7"]), char_tokenizer, progress=False).dataset
    d3 = build_dataset(load_recipe(recipe_path, ["sources.a.count=10"]), char_tokenizer, progress=False).dataset
    assert d1["input_ids"] == d3["input_ids"] and d1["input_ids"] != d2["input_ids"]


def test_save_load_round_trip_and_refuse_foreign_dir(tmp_path, char_tokenizer):
    built = build_dataset(load_recipe(_write_sources(tmp_path)), char_tokenizer, progress=False)
    out = built.save(tmp_path / "out")
    assert sorted(p.name for p in out.iterdir()) == ["dataset", "manifest.json", "recipe.json"]
    back = load_built(out)
    assert back.manifest == json.loads(json.dumps(built.manifest)) and back.dataset["input_ids"] == built.dataset["input_ids"]
    assert back.recipe["name"] == "tiny"
    built.save(out)  # replacing an earlier build is fine, and leaves no staging folders behind
    assert sorted(p.name for p in (tmp_path).iterdir() if p.name.startswith(".")) == []
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("x")
    with pytest.raises(DataError, match="not a qtulu data build"):
        built.save(foreign)


def test_shared_sources_build_utilization(shared_data, llama_tokenizer_path):
    """The acceptance check of issue 2: the real sources, LLaMA tokenizer, 2048 tokens, >= 0.98."""
    shared_data("sources")
    recipe = load_recipe(FIXTURE)
    built = build_dataset(recipe, llama_tokenizer_path, progress=False)
    m = built.manifest
    assert m["packing"]["utilization"] >= 0.98, m["packing"]
    assert m["sources"]["lima"] == 1029 and m["sources"]["sharegpt_sample"] == 500
    assert m["dropped"] == {"empty_reply": 2}  # the two code-alpaca rows with an empty output (as open-instruct)
    assert max(len(r) for r in built.dataset["input_ids"]) <= 2048
    row = built.dataset[0]
    assert row["input_ids"][0] == 1 and row["position_ids"][0] == 0  # starts with BOS at position 0


def test_cli_build_and_preview(tmp_path, capsys, shared_data, llama_tokenizer_path):
    from qtulu.cli import main

    recipe = _write_sources(tmp_path)
    tok = str(llama_tokenizer_path)
    assert main(["data", "build", str(recipe), "--out", str(tmp_path / "out"), "--tokenizer", tok, "--no-progress",
                 "-o", "sources.a.count=5"]) == 0
    printed = capsys.readouterr().out
    assert '"utilization"' in printed and (tmp_path / "out" / "manifest.json").exists()
    m = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert m["sources"]["a"] == 5 and m["tokenizer"]["vocab_size"] == 32000
    assert main(["data", "preview", str(recipe), "-n", "1", "--tokenizer", tok]) == 0
    out = capsys.readouterr().out
    assert "── a ·" in out and "⟦x0</s>⟧" in out and "── b ·" in out
    assert main(["data", "build", str(recipe), "--out", str(tmp_path / "o2"), "--tokenizer", tok, "-o", "train.nope=1"]) == 2
    assert "train.nope: unknown key" in capsys.readouterr().err


def test_bad_inputs_of_the_paper_sources_are_counted_or_located(tmp_path, capsys, llama_tokenizer_path):
    """An unknown speaker, an empty reply, a tree with no assistant reply, a SuperNI task without
    Definition: counted by reason under `skip`, one line naming file:line under `error` (CLI exit 2)."""
    from qtulu.cli import main

    (tmp_path / "sg.json").write_text(json.dumps([
        {"id": "ok", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]},
        {"id": "bard", "conversations": [{"from": "human", "value": "Hi"}, {"from": "bard", "value": "Hello"}]}]))
    (tmp_path / "baize.json").write_text(json.dumps([{"input": "[|Human|] Hi\n[|AI|] Hello\n[|Human|] "},
                                                     {"input": "[|Human|] Hi\n[|AI|] \n[|Human|] "}]))
    tree = {"message_tree_id": "t", "tree_state": "ready_for_export",
            "prompt": {"message_id": "m", "role": "prompter", "text": "Anyone?", "replies": []}}
    ok_tree = {**tree, "prompt": {**tree["prompt"], "replies": [{"message_id": "r", "role": "assistant", "text": "Yes.", "replies": []}]}}
    (tmp_path / "trees.jsonl").write_text(json.dumps(ok_tree) + "\n" + json.dumps(tree) + "\n")
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "task1_ok.json").write_text(json.dumps(
        {"Definition": ["Echo."], "Positive Examples": [], "Instances": [{"id": "1", "input": "a", "output": ["a"]}]}))
    (tmp_path / "tasks" / "task2_nodef.json").write_text(json.dumps({"Instances": [{"id": "1", "input": "a", "output": ["a"]}]}))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "# Run: qtulu data build r.yaml --out out\n"
        "sources:\n"
        "  - {name: sharegpt, format: sharegpt, path: sg.json}\n"
        "  - {name: baize, format: baize, path: baize.json}\n"
        "  - {name: oasst1, format: oasst1, path: trees.jsonl}\n"
        "  - {name: superni, format: superni, path: tasks}\n"
        "data:\n  max_seq_len: 256\n  on_bad_row: skip\n")
    m = build_dataset(load_recipe(recipe), str(llama_tokenizer_path), progress=False).manifest
    assert m["sources"] == {"sharegpt": 1, "baize": 1, "oasst1": 1, "superni": 1}
    assert m["dropped_by_source"] == {"sharegpt": {"unknown_speaker": 1}, "baize": {"empty_reply": 1},
                                      "oasst1": {"no_assistant_reply": 1}, "superni": {"missing_field": 1}}
    for name, fmt, path, where in [("sharegpt", "sharegpt", "sg.json", "sg.json[1]"), ("baize", "baize", "baize.json", "baize.json[1]"),
                                   ("oasst1", "oasst1", "trees.jsonl", "trees.jsonl:2"), ("superni", "superni", "tasks", "task2_nodef.json")]:
        one = tmp_path / f"{name}.yaml"
        one.write_text(f"# Run: qtulu data build {name}.yaml --out out\nsources:\n  - {{name: {name}, format: {fmt}, path: {path}}}\n"
                       + ("data:\n  profile: plain\n" if name == "baize" else ""))  # open_instruct keeps empty replies
        rc = main(["data", "build", str(one), "--out", str(tmp_path / "out"), "--no-progress", "--tokenizer", str(llama_tokenizer_path)])
        err = capsys.readouterr().err
        assert rc == 2 and err.count("\n") == 1 and where in err and "Traceback" not in err, (name, err)


def test_console_says_when_a_count_repeats_rows_and_what_was_dropped(tmp_path, capsys, llama_tokenizer_path):
    """Issue 27: the smoke preset's `count: 64` on an 11-row file repeats rows and drops the ones whose
    prompt eats the 512-token budget; both are said on the console, with reasons and counts."""
    from qtulu.cli import main

    rows = [{"instruction": f"Echo {i}", "input": "", "output": f"x{i}"} for i in range(9)]
    rows += [{"instruction": "word " * 600, "input": "", "output": "late"}, {"instruction": "q", "input": "", "output": ""}]
    (tmp_path / "a.json").write_text(json.dumps(rows))
    recipe = tmp_path / "r.yaml"
    recipe.write_text("# Run: qtulu data build r.yaml --out out\nname: tiny\nsources:\n  - {name: a, format: alpaca, path: a.json}\n")
    assert main(["data", "build", str(recipe), "--preset", "smoke", "--out", str(tmp_path / "out"), "--no-progress",
                 "--tokenizer", str(llama_tokenizer_path)]) == 0
    err = capsys.readouterr().err
    m = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert m["sampling"] == {"a": {"rows": 11, "count": 64, "drawn": 64}}
    reps, rest = divmod(64, 11)
    assert f"source 'a': count 64 > its 11 rows: every row repeated {reps}x plus {rest} drawn again (64 examples)" in err
    dropped = m["dropped_by_source"]["a"]
    assert set(dropped) == {"empty_reply", "no_supervised_tokens"} and sum(dropped.values()) == 64 - m["examples"]
    assert (f"source 'a': dropped {64 - m['examples']} example(s): {dropped['empty_reply']} empty_reply, "
            f"{dropped['no_supervised_tokens']} no_supervised_tokens") in err
    assert f"{m['examples']} examples" in err and f"{m['packing']['sequences']} packed rows" in err
    # within its rows, a count draws without repetition and says nothing about it
    notes = []
    build_dataset(load_recipe(recipe, ["sources.a.count=5"]), str(llama_tokenizer_path), progress=False, say=notes.append)
    assert not any("repeated" in n for n in notes) and notes[-1].startswith("data: ")
