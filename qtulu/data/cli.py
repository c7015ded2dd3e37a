"""``qtulu data build`` and ``qtulu data preview``: thin wrappers over `qtulu.data.build`;
``qtulu data formats``: the source formats a recipe may name and their options."""

from __future__ import annotations

import json


def register(subparsers) -> None:
    """Add the ``data`` command (sub-commands ``build`` and ``preview``)."""
    p = subparsers.add_parser("data", help="build tokenized, packed training data from a recipe; preview it",
                              description="Build tokenized, label-masked, packed training data from a recipe.")
    sub = p.add_subparsers(dest="data_command", metavar="SUBCOMMAND")
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])

    def common(sp):
        sp.add_argument("recipe", help="recipe name (recipes/NAME.yaml) or path to a YAML file")
        sp.add_argument("--tokenizer", help="tokenizer: a SentencePiece .model, a folder or a hub id "
                        "(default: the recipe's data.tokenizer, else model.base)")
        sp.add_argument("--max-seq-len", type=int, help="token budget per packed row (default: data.max_seq_len)")
        sp.add_argument("-o", "--set", "--override", dest="override", action="append", default=[], metavar="KEY=VALUE",
                        help="override a recipe key, e.g. -o data.on_bad_row=skip -o sources.dolly.count=1000")
        sp.add_argument("--preset", default=None, metavar="NAME",
                        help="apply a preset before the overrides, e.g. smoke (`qtulu recipe presets`)")

    b = sub.add_parser("build", help="build the dataset and write DIR/{dataset,manifest.json,recipe.json}")
    common(b)
    b.add_argument("--out", required=True, help="output folder (an earlier build there is replaced)")
    b.add_argument("--overwrite", action="store_true", help="write into a non-empty --out that is not a data build")
    b.add_argument("--no-progress", action="store_true", help="no progress bar")
    b.set_defaults(func=_build)

    v = sub.add_parser("preview", help="print a few rendered examples with the supervised spans marked ⟦...⟧")
    common(v)
    v.add_argument("-n", type=int, default=2, help="examples per source (default 2)")
    v.add_argument("--color", action="store_true", help="mark supervised spans in green instead of ⟦...⟧")
    v.set_defaults(func=_preview)

    f = sub.add_parser("formats", help="list the source formats (sources[].format) and their options")
    f.set_defaults(func=_formats)


def _load(args):
    from qtulu.recipes import load_recipe

    from qtulu.presets import preset_overrides

    overrides = preset_overrides(args.preset, args.recipe) + list(args.override)
    if args.max_seq_len is not None:
        overrides.append(f"data.max_seq_len={args.max_seq_len}")
    return load_recipe(args.recipe, overrides)


def _build(args) -> int:
    from qtulu.data.build import build_dataset

    from qtulu.files import check_output

    recipe = _load(args)  # RecipeError / DataError: one line, exit 2 (qtulu.cli)
    inputs = [("recipe", recipe.path), ("tokenizer", args.tokenizer or recipe.data.tokenizer)]
    inputs += [(f"data source {s.name}", s.path) for s in recipe.sources]
    check_output(args.out, kind="data", inputs=inputs, overwrite=args.overwrite)  # before the build, not after
    import sys

    # what the row count does not say (rows repeated by sampling, rows dropped and why) goes to the
    # console whether or not the progress bar is shown
    built = build_dataset(recipe, args.tokenizer, progress=not args.no_progress,
                          say=lambda line: print(line, file=sys.stderr, flush=True))
    out = built.save(args.out)
    m = built.manifest
    summary = {k: m[k] for k in ("examples", "tokens", "supervised_tokens", "dropped", "truncated", "sources", "packing")}
    print(json.dumps(summary, indent=2))
    print(f"wrote {out}/dataset, {out}/manifest.json, {out}/recipe.json")
    return 0


def _formats(args) -> int:
    from qtulu.data.formats import CONVERTERS, OPTIONS

    for name, fn in CONVERTERS.items():
        summary = " ".join((fn.__doc__ or "").strip().split("\n\n")[0].split())
        print(f"{name}: {summary.split('. ')[0].removesuffix('.')}")
        for key, (default, _, meaning) in OPTIONS[name].items():
            print(f"    {key} (default {json.dumps(default)}): {meaning}")
    return 0


def _preview(args) -> int:
    from qtulu.data.build import preview_examples, resolve_tokenizer
    from qtulu.data.chat import IGNORE_INDEX, format_supervised

    recipe = _load(args)  # RecipeError / DataError / BadRow: one line, exit 2 (qtulu.cli)
    tok = resolve_tokenizer(recipe, args.tokenizer)
    items = preview_examples(recipe, tok, n=args.n)
    for it in items:
        sup = sum(1 for x in it["labels"] if x != IGNORE_INDEX)
        flag = f"  (over max_seq_len {recipe.data.max_seq_len}: truncated or dropped in the build)" if it["overlong"] else ""
        print(f"── {it['source']} · {it['where']} · {len(it['input_ids'])} tokens, {sup} supervised{flag}")
        print(format_supervised(it["input_ids"], it["labels"], tok, color=args.color).rstrip("\n"))
        print()
    skipped = items[-1].get("skipped") if items else None
    if skipped:
        print(f"(bad rows passed over while previewing: {skipped})")
    return 0
