"""`qtulu recipe list|show|presets`: every key of the schema has a meaning (read from the schema's
own comments), and `show` prints every key of a resolved recipe with its value and type."""

from __future__ import annotations

import dataclasses
import json

import pytest


def test_every_schema_key_has_a_meaning():
    from qtulu.recipe_cli import missing_meanings, schema_rows
    from qtulu.recipes import schema_keys

    assert missing_meanings() == [], (
        "recipe keys without a meaning: add a comment on the field's line (or just above it) in qtulu/recipes.py")
    keys = {k for k, _, _ in schema_rows()}
    assert {k for k in schema_keys() if not k.startswith("sources")} <= keys


def test_meanings_come_from_field_comments():
    from qtulu.recipe_cli import field_meanings

    @dataclasses.dataclass
    class Example:
        a: int = 1  # the a
        # the b, said
        # over two lines
        b: int = 2
        c: str = "#not a comment"

    assert field_meanings(Example) == {"a": "the a", "b": "the b, said over two lines"}


def test_show_prints_every_key_resolved(capsys):
    from qtulu.cli import main
    from qtulu.recipe_cli import schema_rows
    from qtulu.recipes import load_recipe

    assert main(["recipe", "show", "dolly", "--preset", "smoke", "-o", "train.learning_rate=3e-4"]) == 0
    out = capsys.readouterr().out
    recipe = load_recipe("dolly")
    for key, tname, meaning in schema_rows():
        shown = key.replace("NAME", recipe.sources[0].name)
        line = next((ln for ln in out.splitlines() if ln.startswith(shown + " = ")), None)
        assert line is not None, shown
        assert f"({tname}) {meaning}" in line, line
    assert "train.learning_rate = 0.0003 " in out and "train.gradient_accumulation_steps = 1 " in out
    assert f"sources.dolly.count = {json.dumps(64)} " in out


def test_list_and_presets(capsys):
    from qtulu.cli import main
    from qtulu.recipes import list_recipes

    assert main(["recipe", "list"]) == 0
    out = capsys.readouterr().out
    assert [ln.split()[0] for ln in out.splitlines()] == list_recipes()
    assert all(len(ln.split(maxsplit=1)) == 2 for ln in out.splitlines())  # each with a description
    assert main(["recipe", "presets"]) == 0
    assert "smoke:" in capsys.readouterr().out
    assert main(["recipe", "show", "dolly", "--preset", "nope"]) == 2
    assert "unknown preset 'nope'" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["data", "build", "dolly", "--set", "x=1", "--out", "o"],
                                  ["data", "preview", "dolly", "--override", "x=1"],
                                  ["train", "dolly", "--set", "x=1"], ["train", "dolly", "-o", "x=1"],
                                  ["recipe", "show", "dolly", "--set", "x=1"],
                                  ["eval", "--set", "gsm8k.x=1"], ["bench", "e2e", "-o", "x=1"]])
def test_one_override_spelling_everywhere(argv):
    from qtulu.cli import build_parser

    args = build_parser().parse_args(argv)
    values = [v for k in ("overrides", "override", "task_option") for v in (getattr(args, k, None) or [])]
    assert values and values[0].endswith("x=1")
