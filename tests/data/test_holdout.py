"""Row-level hold-out (qtulu.data.holdout): chosen by content, disjoint from training, one-line errors."""

from __future__ import annotations

import json
import random

import pytest

from qtulu.data.build import build_dataset, held_out_conversations
from qtulu.data.errors import DataError
from qtulu.data.holdout import split_rows, unit_hash
from qtulu.data.sources import load_source
from qtulu.recipes import RecipeError, SourceSpec, load_recipe


def _recipe(tmp_path, sources: list[dict], *overrides: str, name="r"):
    import yaml

    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"name": name, "sources": sources,
                                    "data": {"max_seq_len": 4096, "seed": 42}}), encoding="utf-8")
    return load_recipe(path, list(overrides))


def _train_text(built, tok) -> str:
    """Every training example's text (decoded from the packed rows)."""
    return "\n".join(tok.decode(row["input_ids"]) for row in built.dataset)


def _words(text: str) -> str:
    return " ".join(text.split())


@pytest.mark.parametrize("fmt,file,k,unit", [
    ("dolly", "release_samples/dolly_sample.jsonl", 3, "rows"),
    ("oasst1", "release_samples/oasst1_trees_sample.jsonl", 6, "trees"),
])
def test_held_out_rows_never_reach_training(tmp_path, shared_data, char_tokenizer, fmt, file, k, unit):
    path = shared_data("sources", *file.split("/"))
    recipe = _recipe(tmp_path, [{"name": "s", "format": fmt, "path": str(path), "hold_out": k, "count": 300}])
    built = build_dataset(recipe, char_tokenizer, progress=False)
    info = built.manifest["held_out"]["s"]
    assert (info["hold_out"], info["held_out"], info["unit"]) == (k, k, unit)
    held, about = held_out_conversations(recipe.sources[0], char_tokenizer, max_seq_len=4096)
    assert about["sha256"] == info["sha256"] and about["held_out"] == k
    assert held, "held-out rows convert to conversations"
    train = _words(_train_text(built, char_tokenizer))
    for _, msgs in held:  # the char tokenizer decodes exactly: a held-out reply in training would show
        reply = _words(msgs[-1]["content"])
        if len(reply) >= 40:
            assert reply not in train
    # and the held-out rows are exactly the units with the k smallest hashes
    rows = load_source(recipe.sources[0]).rows
    units = [unit_hash(r) for _, r in rows]
    split = split_rows(fmt, rows, k, "s")
    assert sorted(unit_hash(r) for _, r in split.held) == sorted(units)[:k]
    assert info["of"] == len(units)


def test_superni_holds_out_instances_and_its_task_trains_on_the_others(tmp_path, shared_data, char_tokenizer):
    import re

    path = shared_data("sources", "release_samples", "superni_task1149_item_check_edible.json")
    task = json.loads(path.read_text(encoding="utf-8"))
    n = len(task["Instances"])
    # every instance zero-shot, one fixed layout: each example's input and output can be read back
    recipe = _recipe(tmp_path, [{"name": "s", "format": "superni", "path": str(path), "hold_out": 10,
                                 "options": {"zero_shot_per_task": 1000, "few_shot_per_task": 0}}], "data.profile=plain")
    built = build_dataset(recipe, char_tokenizer, progress=False)
    assert built.manifest["held_out"]["s"]["of"] == n and built.manifest["sources"]["s"] == n - 10
    trained = re.findall(r"\n\n([^\n]*)\n<\|assistant\|>\n([^\n]*?)</s>", _train_text(built, char_tokenizer))
    held, _ = held_out_conversations(recipe.sources[0], char_tokenizer, profile="plain")
    held_pairs = {(m[0]["content"].split("\n\n")[-1], m[1]["content"]) for _, m in held}
    everything = {(i["input"].strip(), i["output"][0].strip()) for i in task["Instances"]}
    assert len(trained) == n - 10 and len(held_pairs) == 10
    assert set(trained) | held_pairs == everything and not set(trained) & held_pairs
    chosen = set(sorted(unit_hash(i) for i in task["Instances"])[:10])
    assert held_pairs == {(i["input"].strip(), i["output"][0].strip()) for i in task["Instances"] if unit_hash(i) in chosen}


def test_same_rows_whatever_the_seed_the_order_or_other_sources(tmp_path, shared_data, char_tokenizer):
    dolly = shared_data("sources", "release_samples", "dolly_sample.jsonl")
    rows = [json.loads(line) for line in dolly.read_text(encoding="utf-8").splitlines() if line.strip()]
    shuffled = rows[:]
    random.Random(1).shuffle(shuffled)
    (tmp_path / "shuffled.jsonl").write_text("".join(json.dumps(r) + "\n" for r in shuffled), encoding="utf-8")
    a = _recipe(tmp_path, [{"name": "d", "format": "dolly", "path": str(dolly), "hold_out": 3}], name="a")
    b = _recipe(tmp_path, [{"name": "d", "format": "dolly", "path": str(tmp_path / "shuffled.jsonl"), "hold_out": 3},
                           {"name": "o", "format": "oasst1", "hold_out": 2,
                            "path": str(shared_data("sources", "release_samples", "oasst1_trees_sample.jsonl"))}],
                "data.seed=7", name="b")
    ma = build_dataset(a, char_tokenizer, progress=False).manifest["held_out"]["d"]
    mb = build_dataset(b, char_tokenizer, progress=False).manifest["held_out"]["d"]
    assert ma == mb
    ha = {json.dumps(r, sort_keys=True) for _, r in split_rows("dolly", load_source(a.sources[0]).rows, 3, "d").held}
    hb = {json.dumps(r, sort_keys=True) for _, r in split_rows("dolly", load_source(b.sources[0]).rows, 3, "d").held}
    assert ha == hb and len(ha) == 3
    # a fraction is a hash bucket: the same rows in any order, nested as the fraction grows
    f1 = {unit_hash(r) for _, r in split_rows("dolly", load_source(a.sources[0]).rows, 0.3, "d").held}
    f2 = {unit_hash(r) for _, r in split_rows("dolly", load_source(b.sources[0]).rows, 0.3, "d").held}
    f3 = {unit_hash(r) for _, r in split_rows("dolly", load_source(a.sources[0]).rows, 0.6, "d").held}
    assert f1 == f2 and f1 <= f3


def test_duplicates_go_together_and_bad_rows_stay_on_the_training_side():
    from qtulu.data.errors import BadRow

    rows = [("f:1", {"a": 1}), ("f:2", {"a": 2}), ("f:3", {"a": 1}), ("f:4", BadRow("broken_json")), ("f:5", [1])]
    k1 = min(unit_hash({"a": 1}), unit_hash({"a": 2}))
    split = split_rows("alpaca", rows, 1, "s")
    held = [w for w, _ in split.held]
    assert held == (["f:1", "f:3"] if k1 == unit_hash({"a": 1}) else ["f:2"])
    assert {"f:4", "f:5"} <= {w for w, _ in split.train}


def test_hold_out_of_every_row_is_a_one_line_error(tmp_path, shared_data, char_tokenizer):
    baize = shared_data("sources", "release_samples", "baize_quora_sample.json")
    recipe = _recipe(tmp_path, [{"name": "baize", "format": "baize", "path": str(baize), "hold_out": 1}])
    with pytest.raises(DataError) as e:
        build_dataset(recipe, char_tokenizer, progress=False)
    msg = str(e.value)
    assert "\n" not in msg and "'baize'" in msg and "hold_out=1" in msg and "sources.baize.hold_out" in msg
    with pytest.raises(DataError, match="no hold_out set"):
        held_out_conversations(SourceSpec(name="x", format="baize", path=str(baize)), char_tokenizer)


@pytest.mark.parametrize("value,why", [(0, ">= 1"), (1.0, "fraction in \\(0, 1\\)"), (True, "got bool")])
def test_bad_hold_out_values_name_the_key(tmp_path, value, why):
    (tmp_path / "d.jsonl").write_text('{"instruction": "a", "context": "", "response": "b"}\n')
    with pytest.raises(RecipeError, match=f"sources.(d|0).hold_out: .*{why}"):
        _recipe(tmp_path, [{"name": "d", "format": "dolly", "path": str(tmp_path / "d.jsonl"), "hold_out": value}])
