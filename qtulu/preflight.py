"""What qtulu checks before it loads a model.

A typo must cost seconds on any base size (issue 19): `qtulu train`, `eval`, `chat` and `merge`
run these checks first; each needs no weights (and most not even torch).
"""

from __future__ import annotations

import os
from pathlib import Path

from qtulu.errors import QtuluError
from qtulu.files import check_output


class PreflightError(QtuluError, ValueError):
    """A request refused before any model is loaded (the message names what is wrong)."""


def check_run_name(name: str) -> str:
    """``name`` if it can name the adapter in chat/eval/merge; `PreflightError` otherwise."""
    from qtulu.adapters.store import adapter_name_problem

    problem = adapter_name_problem(name)
    if problem:
        raise PreflightError(f"run name: {problem}; choose another with --name (or -o name=...)")
    return name


def check_base_dir(model, revision: str | None = None, what: str = "--model") -> None:
    """A base that cannot load fails now: a local path must be a model directory (config.json,
    *.safetensors, no pickles only; no weights are read); a hub id, offline, must be in the cache."""
    from qtulu.model.load import resolve_checkpoint

    from qtulu.files import check_input_tree

    p = Path(os.path.expanduser(str(model)))
    if p.exists():
        if p.is_dir():
            check_input_tree(p, f"{what}: base model file")  # a FIFO among its files would hang the load
        resolve_checkpoint(p, revision)
    elif str(model).startswith(("/", "./", "../", "~")) or demo_hint(p):
        raise PreflightError(f"{what}: {p}: not found (no such directory){demo_hint(p)}")
    else:
        from qtulu.hub import offline_reason

        if offline_reason():  # only the cache can serve it: a miss fails now, in one line
            resolve_checkpoint(str(model), revision)


def demo_hint(path) -> str:
    """``"; run `qtulu demo` first ..."`` when a missing ``path`` is one of the demo's artefacts
    (``demo_out/base``, ``demo_out/runs/NAME/adapter``, ``demo_out/data``: the README's tour run
    elsewhere than where `qtulu demo` wrote them), else "". Without it, ``demo_out/base`` reads as a
    hub id and the user gets a network error."""
    parts = Path(os.path.expanduser(str(path))).parts
    demo_like = (len(parts) >= 2 and (parts[-1] in ("base", "data") or parts[-1] == "adapter" and "runs" in parts))
    if not demo_like or not parts or "demo_out" not in parts or Path(*parts[:parts.index("demo_out") + 1]).is_dir():
        return ""
    return f"; `qtulu demo` writes it: run `qtulu demo` first, in {os.getcwd()} (or cd to where it ran)"


def check_base_source(recipe) -> None:
    """`check_base_dir` for a recipe's ``model.base`` (which must be set)."""
    where = recipe.where("model.base")
    if recipe.model.base is None:
        raise PreflightError(f"{where}: no base model given (set model.base or pass a model)")
    check_base_dir(recipe.model.base, recipe.model.revision, where)


def _n_layers(model) -> int | None:
    """The layer count a local base's config.json records (None for a hub id or an unreadable one)."""
    import json

    path = Path(os.path.expanduser(str(model))) / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
    except (OSError, ValueError):
        return None
    if not isinstance(config, dict):
        return None
    n = config.get("num_hidden_layers", (config.get("text_config") or {}).get("num_hidden_layers"))
    return n if isinstance(n, int) and not isinstance(n, bool) else None


def check_before_load(model: str, adapters, trained_on: str | None = None) -> None:
    """What chat/eval/merge can check before loading the base: each adapter's files and manifest
    (checksums; the base match needs the base), what a plain PEFT adapter was trained against
    (``--trained-on``), unique usable names, the base directory's files."""
    from qtulu.adapters.integrity import check_layers_to_transform
    from qtulu.adapters.trained_on import adapter_record

    from qtulu.adapters.store import AdapterError, adapter_name_problem, parse_adapter_spec, verify_adapter

    specs = [parse_adapter_spec(a) for a in adapters]
    for name, path in specs:
        problem = adapter_name_problem(name)
        if problem:
            raise AdapterError(f"{path}: {problem} (rename it: --adapter NAME=DIR)")
        if not Path(path).is_dir():
            raise AdapterError(f"{path}: adapter directory not found{demo_hint(path)}")
        adapter_record(path, trained_on)  # a plain PEFT adapter needs --trained-on; a contradiction is refused
        verify_adapter(path, trained_on=trained_on)
        check_layers_to_transform(path, _n_layers(model))  # a layer the base lacks, before the base loads
    names = [n for n, _ in specs]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise AdapterError(f"two adapters are named {dup}; name them: --adapter NAME=DIR")
    check_base_dir(model)


# output paths: the rules live in qtulu.files (the shared ground, so that every command may use them)


def recipe_inputs(recipe) -> list[tuple[str, object]]:
    """What a training run reads from disk: its recipe file, base, tokenizer and data sources."""
    items = [("recipe", recipe.path), ("base model", recipe.model.base), ("tokenizer", recipe.data.tokenizer)]
    for s in recipe.sources:
        items += [(f"data source {s.name}", s.path), (f"data source {s.name}", s.release)]
    return items


def check_run_output(recipe, out, overwrite: bool = False) -> Path:
    """`check_output` for ``qtulu train --output-dir`` (a run directory)."""
    return check_output(out, kind="run", inputs=recipe_inputs(recipe), overwrite=overwrite, flag="--output-dir")
