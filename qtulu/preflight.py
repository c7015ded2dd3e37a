"""What qtulu checks before it loads a model.

A typo must cost seconds on any base size (issue 19): `qtulu train`, `eval`, `chat` and `merge`
run these checks first; each needs no weights (and most not even torch).
"""

from __future__ import annotations

import os
from pathlib import Path

from qtulu.errors import QtuluError


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
    where = f"{recipe.path or recipe.name}: model.base"
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


# --------------------------------------------------------------------------------------------
# output paths: the one place that decides where a command may write (issue 25)

# What each kind of output leaves behind, so that a later command recognises its own earlier output
# (a glob relative to the output folder; any match is enough).
OUTPUT_MARKERS = {
    "adapter": ("qtulu.json",),
    "model": ("qtulu_merge.json",),
    # names only qtulu writes (a foreign "checkpoints/" folder is not enough: a run cleans stale files there)
    "run": (".qtulu-run.lock", "steps.jsonl", "adapter/qtulu.json", "checkpoints/checkpoint-*/qtulu_checkpoint.json"),
    "eval": ("results.json", "*/*/metrics.json", "*/*/predictions.jsonl", "merge_search.json", "candidates"),
    "study": (".qtulu-study", "log.jsonl", ".qtulu-run.lock"),
}
OUTPUT_WHAT = {"adapter": "adapter", "model": "merged model", "run": "training run", "eval": "eval output",
               "study": "study", "file": "output file"}


class OutputPathError(PreflightError):
    """An output path that would replace or delete something the command did not write."""


def _resolved(p) -> Path:
    return Path(os.path.abspath(os.path.expanduser(os.fspath(p)))).resolve()


def _local_inputs(inputs) -> list[tuple[str, Path]]:
    out = []
    for item in inputs:
        if item is None:
            continue
        label, path = item if isinstance(item, tuple) else ("input", item)
        if path is None:
            continue
        p = Path(os.path.expanduser(os.fspath(path)))
        if p.exists() or p.is_symlink():  # a hub id names no local file: nothing to protect
            out.append((label, _resolved(p)))
    return out


def is_output_of(path, kind: str) -> bool:
    """True when folder ``path`` holds what an earlier qtulu output of ``kind`` leaves behind."""
    p = Path(path)
    return any(next(iter(p.glob(m)), None) is not None for m in OUTPUT_MARKERS[kind])


def check_output(out, *, kind: str, inputs=(), overwrite: bool = False, flag: str = "--out") -> Path:
    """Refuse (`OutputPathError`, one line) an output path ``out`` that would destroy an input or
    something qtulu did not write; return it resolved (symlinks followed).

    - ``inputs``: paths (or ``(label, path)``) the command reads: the base, adapters, data files,
      recipe and predictions files. ``out`` equal to one, inside one, or holding one is refused:
      writing there would replace or delete it.
    - ``kind``: ``adapter``, ``model``, ``run``, ``eval``, ``study`` (a folder) or ``file``. A
      non-empty folder that is not an earlier output of the same kind (`OUTPUT_MARKERS`) is refused
      unless ``overwrite``; an existing non-folder where a folder goes (or the reverse) always is.
    """
    raw = Path(os.path.expanduser(os.fspath(out)))
    o = _resolved(raw)
    what = OUTPUT_WHAT[kind]
    for label, p in _local_inputs(inputs):
        if o == p:
            rel = "is"
        elif p in o.parents:
            rel = "is inside"
        elif o in p.parents:
            rel = "holds"
        else:
            continue
        where = f" ({raw} -> {o})" if raw.is_symlink() else ""
        raise OutputPathError(f"{flag} {raw}{where}: {rel} the {label} {p}; writing the {what} there would "
                              f"replace or delete it. Choose another {flag}")
    if not (o.exists() or raw.is_symlink()):
        return o
    if kind == "file":
        import stat

        if not stat.S_ISREG(os.stat(o).st_mode):
            raise OutputPathError(f"{flag} {raw}: exists and is not a regular file; refusing to write over it")
        return o
    if not o.is_dir():
        raise OutputPathError(f"{flag} {raw}: is a file (a {what} directory is written there); choose another {flag}")
    if not overwrite and next(iter(o.iterdir()), None) is not None and not is_output_of(o, kind):
        raise OutputPathError(
            f"{flag} {raw}: a non-empty folder that is not a qtulu {what}; refusing to write into it "
            f"(choose an empty or new {flag}, or pass --overwrite to let qtulu replace its contents)")
    return o


def recipe_inputs(recipe) -> list[tuple[str, object]]:
    """What a training run reads from disk: its recipe file, base, tokenizer and data sources."""
    items = [("recipe", recipe.path), ("base model", recipe.model.base), ("tokenizer", recipe.data.tokenizer)]
    for s in recipe.sources:
        items += [(f"data source {s.name}", s.path), (f"data source {s.name}", s.release)]
    return items


def check_run_output(recipe, out, overwrite: bool = False) -> Path:
    """`check_output` for ``qtulu train --output-dir`` (a run directory)."""
    return check_output(out, kind="run", inputs=recipe_inputs(recipe), overwrite=overwrite, flag="--output-dir")
