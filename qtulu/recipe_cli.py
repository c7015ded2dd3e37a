"""``qtulu recipe list|show|presets``: what the shipped recipes are, and every key of one, resolved.

    qtulu recipe show dolly --preset smoke -o train.learning_rate=2e-4

prints each key of the resolved recipe with its value, its type and a one-line meaning. The
meanings are read from the schema itself (`qtulu.recipes`): the comment on a field's line, or the
comment block just above it. A field without one is an error (tests/test_recipe_cli.py), so the
listing can never fall behind the schema.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import io
import textwrap
import tokenize
import typing
from functools import lru_cache
from typing import Any


@lru_cache(maxsize=None)
def field_meanings(cls) -> dict[str, str]:
    """``{field: meaning}`` for the fields of dataclass ``cls`` that carry a comment.

    The meaning is the comment on the field's own line, else the contiguous comment lines right
    above it, joined into one line.
    """
    source = textwrap.dedent(inspect.getsource(cls))
    comments: dict[int, str] = {}  # line -> comment text
    code_lines: set[int] = set()
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = tok.string.lstrip("#").strip()
        elif tok.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT, tokenize.ENDMARKER):
            code_lines.add(tok.start[0])
    tree = ast.parse(source)
    body = tree.body[0].body  # the ClassDef's statements
    out: dict[str, str] = {}
    for node in body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        line = node.lineno
        if line in comments and line in code_lines:
            text = comments[line]
        else:
            above = []
            i = line - 1
            while i in comments and i not in code_lines:
                above.append(comments[i])
                i -= 1
            text = " ".join(reversed(above))
        if text:
            out[node.target.id] = text
    return out


def class_meaning(cls) -> str:
    """The first line of a dataclass's docstring."""
    return (inspect.getdoc(cls) or "").strip().splitlines()[0] if inspect.getdoc(cls) else ""


def schema_rows(cls=None, prefix: str = "") -> list[tuple[str, str, str]]:
    """``(dotted key, type, meaning)`` for every key of the recipe schema (sources as ``sources.NAME.KEY``)."""
    from qtulu.recipes import Recipe, SourceSpec
    from qtulu.schema import schema_fields, type_name

    cls = cls or Recipe
    hints = typing.get_type_hints(cls)
    meanings = field_meanings(cls)
    rows = []
    for f in schema_fields(cls):
        tp = hints[f.name]
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(tp):
            rows.extend(schema_rows(tp, key + "."))
        elif f.name == "sources" and cls is Recipe:
            rows.extend(schema_rows(SourceSpec, "sources.NAME."))
        else:
            rows.append((key, type_name(tp), meanings.get(f.name, "")))
    return rows


def missing_meanings() -> list[str]:
    """Schema keys without a meaning (a test keeps this empty)."""
    return [key for key, _, meaning in schema_rows() if not meaning]


def _value(v: Any) -> str:
    import json

    return json.dumps(v, default=str)


def render(recipe) -> str:
    """The resolved ``recipe`` as ``key = value  (type) meaning`` lines, one per schema key."""
    rows = schema_rows()
    flat = recipe.to_dict()
    lines = [f"# recipe {recipe.name!r}" + (f" ({recipe.path})" if recipe.path else "")]
    if recipe.description:
        lines.append(f"# {recipe.description}")
    width = max(len(k) for k, _, _ in rows) + 16
    for key, tname, meaning in rows:
        if key.startswith("sources.NAME."):
            continue
        node: Any = flat
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        lines.append(f"{(key + ' = ' + _value(node)):<{width}}  ({tname}) {meaning}")
    source_rows = [r for r in rows if r[0].startswith("sources.NAME.")]
    for src in flat["sources"]:
        lines.append(f"# source {src['name']!r}")
        for key, tname, meaning in source_rows:
            field_name = key.rsplit(".", 1)[1]
            k = f"sources.{src['name']}.{field_name}"
            lines.append(f"{(k + ' = ' + _value(src.get(field_name))):<{width}}  ({tname}) {meaning}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# CLI


def register(subparsers) -> None:
    p = subparsers.add_parser("recipe", help="list recipes, show one resolved with every key explained, list presets",
                              description="Inspect recipes: `list`, `show NAME` (every key: value, type, meaning), "
                                          "`presets`.")
    sub = p.add_subparsers(dest="recipe_command", metavar="{list,show,presets}")
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])

    ls = sub.add_parser("list", help="the recipes shipped in recipes/ with their descriptions")
    ls.set_defaults(func=_list)

    show = sub.add_parser("show", help="print a recipe resolved (references, settings, preset, overrides)")
    show.add_argument("recipe", help="recipe name (recipes/NAME.yaml) or path")
    show.add_argument("--preset", default=None, help="apply a preset first (see `qtulu recipe presets`)")
    show.add_argument("--set", "-o", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                      help="override a recipe key (repeatable)")
    show.set_defaults(func=_show)

    pr = sub.add_parser("presets", help="the presets and what each sets")
    pr.set_defaults(func=_presets)


def _list(args: argparse.Namespace) -> int:
    from qtulu.recipes import list_recipes, load_recipe

    for name in list_recipes():
        try:
            recipe = load_recipe(name)
            desc = recipe.description or _header_line(recipe.path)
        except Exception as e:  # noqa: BLE001 - a broken recipe is listed with its error, not hidden
            desc = f"(does not load: {e})"
        print(f"{name:<24} {desc}")
    return 0


def _header_line(path) -> str:
    """The first line of a recipe file's header comment that is not its launch command."""
    from pathlib import Path

    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if not line.startswith("#"):
            break
        text = line.lstrip("#").strip()
        if text and not text.startswith(("Run:", "Data only:")):
            return text
    return ""


def _show(args: argparse.Namespace) -> int:
    from qtulu.presets import preset_overrides
    from qtulu.recipes import load_recipe

    recipe = load_recipe(args.recipe, preset_overrides(args.preset, args.recipe) + list(args.overrides))
    print(render(recipe))
    return 0


def _presets(args: argparse.Namespace) -> int:
    from qtulu.presets import PRESETS

    for name, preset in PRESETS.items():
        print(f"{name}: {preset.meaning}")
        for k, v in preset.settings.items():
            print(f"  {k} = {_value(v)}")
        for k, v in preset.per_source.items():
            print(f"  sources.*.{k} = {_value(v)}")
    return 0
