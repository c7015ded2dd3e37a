"""Recipe schema: every shipped recipe loads, bad keys/types name the file and key, overrides, references."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qtulu.recipes import (
    FORMATS,
    REPO_RECIPES_DIR,
    Recipe,
    RecipeError,
    TrainConfig,
    load_recipe,
    list_recipes,
    parse_yaml_value,
    recipe_from_dict,
    schema_keys,
)

PAPER_SOURCES = [
    "superni", "cot", "flan_v2", "dolly", "oasst1", "self_instruct", "unnatural_instructions",
    "stanford_alpaca", "code_alpaca", "gpt4_alpaca", "baize", "sharegpt",
]
ALL_YAML = sorted(REPO_RECIPES_DIR.glob("*.yaml")) + sorted((Path(__file__).parent / "fixtures").glob("*.yaml"))


@pytest.mark.parametrize("path", ALL_YAML, ids=lambda p: p.name)
def test_every_recipe_loads_and_starts_with_its_command(path):
    recipe = load_recipe(path)
    assert isinstance(recipe, Recipe) and recipe.sources
    first = path.read_text().splitlines()[0]
    assert first.startswith("#") and "qtulu " in first, f"{path.name}: first line must be a comment with the command"
    if path.stem in PAPER_SOURCES or path.stem.startswith("tulu_"):
        assert f"recipes/{path.name}" in first
    json.dumps(recipe.to_dict())  # JSON-able


def test_all_paper_recipes_and_mixtures_exist():
    names = set(list_recipes())
    assert set(PAPER_SOURCES) <= names
    assert {"tulu_v1_human_mix", "tulu_v1_mix"} <= names


@pytest.mark.parametrize("name", PAPER_SOURCES)
def test_paper_recipes_carry_open_instruct_qlora_settings(name):
    """The hyperparameters open-instruct shipped for QLoRA (finetune_qlora_with_accelerate.sh at
    7c5ee77a1), from recipes/settings/; the paper's own numbers with -o settings=tulu_v1_paper."""
    r = load_recipe(name)
    assert r.settings == "open_instruct_qlora_2308"
    assert r.model.quantize == "nf4" and r.model.double_quant and r.model.compute_dtype == "bfloat16"
    assert (r.lora.r, r.lora.alpha, r.lora.dropout, r.lora.target_modules) == (64, 16, 0.1, "all-linear")
    t = r.train
    assert (t.learning_rate, t.lr_scheduler, t.warmup_ratio, t.epochs, t.effective_batch_size, t.weight_decay) == \
        (2e-4, "linear", 0.03, 3.0, 128, 0.0)
    assert r.data.max_seq_len == 2048 and r.data.chat_format == "tulu" and r.data.profile == "open_instruct"
    for s in r.sources:
        assert s.format in FORMATS and (s.hub_id or s.path)
    paper = load_recipe(name, ["settings=tulu_v1_paper"])
    assert (paper.train.learning_rate, paper.train.epochs, paper.train.effective_batch_size, paper.lora.r,
            paper.lora.alpha, paper.model.quantize) == (2e-5, 2.0, 128, 256, 256, None)
    later = load_recipe(name, ["settings=open_instruct_qlora_2309", "train.epochs=1"])
    assert (later.lora.r, later.lora.alpha, later.train.learning_rate, later.train.epochs) == (256, 256, 1e-4, 1.0)
    first = REPO_RECIPES_DIR.joinpath(f"{name}.yaml").read_text()
    assert "7c5ee77a1" in first and "e44fcf588" in first  # where the numbers and the conversion come from


def test_settings_files_name_their_sources_and_bad_settings(tmp_path):
    for f in sorted((REPO_RECIPES_DIR / "settings").glob("*.yaml")):
        text = f.read_text()
        assert "open-instruct" in text and "scripts/finetune" in text, f.name
    p = _write(tmp_path, "r.yaml", BASE + "settings: nope\n")
    with pytest.raises(RecipeError, match="settings: no settings file .*nope.yaml"):
        load_recipe(p)
    _write(tmp_path, "s.yaml", "sources: []\n")
    with pytest.raises(RecipeError, match="s.yaml: sources: a settings file holds only"):
        load_recipe(p, ["settings=" + str(tmp_path / "s.yaml")])
    _write(tmp_path, "mine.yaml", "train:\n  learning_rate: 3e-4\n  epochs: 4\n")
    r = load_recipe(_write(tmp_path, "r2.yaml", BASE + "settings: ./mine.yaml\ntrain:\n  epochs: 1\n"))
    assert (r.train.learning_rate, r.train.epochs) == (3e-4, 1.0)  # the recipe's own keys win


def test_tulu_mixtures_expand_references_with_counts():
    human = load_recipe("tulu_v1_human_mix")
    assert [s.name for s in human.sources] == ["flan_v2", "cot", "dolly", "oasst1"]
    assert all(s.count is None for s in human.sources)  # each source whole, as prepare_train_data.sh concatenates
    assert human.source("cot").options == {"zero_shot": 50000, "few_shot": 50000}
    mix = load_recipe("tulu_v1_mix")
    assert [s.name for s in mix.sources] == [s.name for s in human.sources] + ["gpt4_alpaca", "code_alpaca", "sharegpt"]
    text = REPO_RECIPES_DIR.joinpath("tulu_v1_mix.yaml").read_text()
    for count in ("100,000", "15,011", "34,795", "52,002", "20,022", "168,864", "490,694"):
        assert count in text
    released = load_recipe("tulu_v1_released")
    assert released.sources[0].hub_id == "allenai/tulu-v1-sft-mixture" and released.sources[0].format == "messages"
    dolly = load_recipe("dolly", ["sources.dolly.release=tulu_v1"])
    assert dolly.source("dolly").release == "tulu_v1"


def _write(tmp_path: Path, name: str, text: str) -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


BASE = """\
name: t
sources:
  - name: a
    format: alpaca
    path: data/a.jsonl
"""


def test_unknown_key_names_file_and_dotted_key(tmp_path):
    p = _write(tmp_path, "bad.yaml", BASE + "train:\n  learning_rat: 1e-4\n")
    with pytest.raises(RecipeError) as e:
        load_recipe(p)
    assert str(p) in str(e.value) and "train.learning_rat" in str(e.value) and "unknown key" in str(e.value)
    p = _write(tmp_path, "bad2.yaml", BASE.replace("    format: alpaca", "    format: alpaca\n    colour: red"))
    with pytest.raises(RecipeError, match=r"bad2\.yaml: sources\.0\.colour: unknown key"):
        load_recipe(p)
    p = _write(tmp_path, "bad3.yaml", BASE + "extra: 1\n")
    with pytest.raises(RecipeError, match=r"bad3\.yaml: extra: unknown key"):
        load_recipe(p)


@pytest.mark.parametrize("section,key,value,expect", [
    ("train", "learning_rate", "fast", "expected float"),
    ("train", "epochs", "true", "expected float"),
    ("train", "max_steps", "1.5", "expected int"),
    ("data", "chat_format", "chatml", "'tulu' | 'tokenizer'"),
    ("data", "on_bad_row", "ignore", "'error' | 'skip'"),
    ("model", "double_quant", "1", "expected bool"),
    ("lora", "target_modules", "3", "str | list of str"),
])
def test_wrong_type_names_file_and_key(tmp_path, section, key, value, expect):
    p = _write(tmp_path, "r.yaml", BASE + f"{section}:\n  {key}: {value}\n")
    with pytest.raises(RecipeError) as e:
        load_recipe(p)
    msg = str(e.value)
    assert str(p) in msg and f"{section}.{key}" in msg and expect in msg


def test_yaml12_floats_and_int_promotion(tmp_path):
    assert parse_yaml_value("2e-4") == 2e-4 and isinstance(parse_yaml_value("1e-4"), float)
    assert parse_yaml_value("3") == 3 and isinstance(parse_yaml_value("3"), int)
    p = _write(tmp_path, "r.yaml", BASE + "train:\n  learning_rate: 1e-4\n  max_grad_norm: 2\n")
    r = load_recipe(p)
    assert r.train.learning_rate == 1e-4 and r.train.max_grad_norm == 2.0 and isinstance(r.train.max_grad_norm, float)


def test_duplicate_yaml_key_is_an_error(tmp_path):
    p = _write(tmp_path, "dup.yaml", BASE + "train:\n  seed: 1\n  seed: 2\n")
    with pytest.raises(RecipeError, match="duplicate key 'seed'"):
        load_recipe(p)


def test_overrides_list_and_dict_and_by_source_name(tmp_path):
    p = _write(tmp_path, "r.yaml", BASE)
    r = load_recipe(p, ["train.learning_rate=2e-4", "sources.a.count=10", "data.max_seq_len=512",
                        "sources.0.options={shots: few}", "lora.target_modules=[q_proj, v_proj]"])
    assert r.train.learning_rate == 2e-4 and r.source("a").count == 10 and r.data.max_seq_len == 512
    assert r.source("a").options == {"shots": "few"} and r.lora.target_modules == ["q_proj", "v_proj"]
    r2 = load_recipe(p, {"train.epochs": 3, "sources.a.count": 0.5})
    assert r2.train.epochs == 3.0 and r2.source("a").count == 0.5
    with pytest.raises(RecipeError, match="override train.nope: .*unknown key|train.nope: unknown key"):
        load_recipe(p, ["train.nope=1"])
    with pytest.raises(RecipeError, match="no source named 'zz'"):
        load_recipe(p, ["sources.zz.count=1"])
    with pytest.raises(RecipeError, match="expected KEY=VALUE"):
        load_recipe(p, ["train.learning_rate"])


def test_count_validation(tmp_path):
    p = _write(tmp_path, "r.yaml", BASE)
    for bad, msg in [("1.5", "fraction in \\(0, 1\\]"), ("0", ">= 1"), ("-3", ">= 1"), ("0.0", "fraction"), ("many", "expected int | float | null")]:
        with pytest.raises(RecipeError, match=msg):
            load_recipe(p, [f"sources.a.count={bad}"])
    assert load_recipe(p, ["sources.a.count=1.0"]).source("a").count == 1.0


def test_paths_resolve_relative_to_the_recipe_file(tmp_path):
    sub = tmp_path / "sub"
    sub.mkdir()
    p = _write(sub, "r.yaml", BASE + "data:\n  tokenizer: ../tok/tokenizer.model\n")
    r = load_recipe(p)
    assert r.source("a").path == str(sub / "data" / "a.jsonl")
    assert r.data.tokenizer == str(tmp_path / "tok" / "tokenizer.model")
    assert load_recipe(p, ["data.tokenizer=huggyllama/llama-7b"]).data.tokenizer == "huggyllama/llama-7b"


def test_references_expand_override_and_detect_cycles(tmp_path):
    _write(tmp_path, "one.yaml", BASE)
    _write(tmp_path, "two.yaml", BASE.replace("name: a", "name: b") + "  - name: c\n    format: dolly\n    hub_id: x/y\n")
    p = _write(tmp_path, "mix.yaml", "sources:\n  - recipe: ./one.yaml\n    count: 5\n    name: a5\n  - recipe: ./two.yaml\n")
    r = load_recipe(p)
    assert [s.name for s in r.sources] == ["a5", "b", "c"] and r.source("a5").count == 5
    assert r.source("a5").path == str(tmp_path / "data" / "a.jsonl")  # relative to one.yaml
    bad = _write(tmp_path, "bad.yaml", "sources:\n  - recipe: ./two.yaml\n    count: 5\n")
    with pytest.raises(RecipeError, match="has 2 sources"):
        load_recipe(bad)
    _write(tmp_path, "c1.yaml", "sources:\n  - recipe: ./c2.yaml\n")
    _write(tmp_path, "c2.yaml", "sources:\n  - recipe: ./c1.yaml\n")
    with pytest.raises(RecipeError, match="circular reference"):
        load_recipe(tmp_path / "c1.yaml")
    dup = _write(tmp_path, "dup.yaml", "sources:\n  - recipe: ./one.yaml\n  - recipe: ./one.yaml\n")
    with pytest.raises(RecipeError, match="duplicate source name 'a'"):
        load_recipe(dup)


def test_source_needs_location_and_known_format(tmp_path):
    p = _write(tmp_path, "r.yaml", "sources:\n  - name: a\n    format: alpaca\n")
    with pytest.raises(RecipeError, match="needs a hub_id or a path"):
        load_recipe(p)
    p = _write(tmp_path, "r2.yaml", BASE.replace("format: alpaca", "format: csv"))
    with pytest.raises(RecipeError, match="unknown format 'csv'"):
        load_recipe(p)


def test_to_dict_round_trips_and_unknown_name_is_clear(tmp_path):
    r = load_recipe("tulu_v1_mix")
    again = recipe_from_dict(json.loads(json.dumps(r.to_dict())))
    assert again == r and again.path is None and r.path.endswith("tulu_v1_mix.yaml")
    with pytest.raises(RecipeError, match="no recipe named 'nope'"):
        load_recipe("nope")


def test_schema_is_derived_from_dataclasses():
    keys = schema_keys()
    assert keys["train.learning_rate"] == "float" and keys["data.on_overlong"] == "'truncate' | 'drop'"
    assert set(f"train.{f}" for f in TrainConfig.__dataclass_fields__) <= set(keys)
