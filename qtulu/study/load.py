"""Load a STUDY.yaml: schema check, then every recipe and task resolved, with nothing loaded or written.

`load_study(path, out_dir)` reads the file, substitutes ``${out}``, checks it against the schema
(`qtulu.study.schema`), loads every recipe with its preset and overrides (the base's model settings
forced into each: one loaded base serves them all), resolves every task with its options (an
unknown option is refused, naming the valid ones), and checks names and the merge-search block.
It touches no model, no data file and no output folder (`qtulu.study.preflight` does the rest).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qtulu.errors import QtuluError
from qtulu.study.schema import (
    BaseSpec,
    EvalSpec,
    MergeSearchSpec,
    Study,
    StudyError,
    StudyRecipe,
    StudyTask,
    SyntheticSpec,
)

OUT_VAR = "${out}"
BASE_ROW = "base"
# recipe keys set from the study's `base` block in every recipe (a recipe may not override them)
MODEL_KEYS = ("base", "revision", "quantize", "double_quant", "blocksize", "compute_dtype", "attn_implementation",
              "trust_remote_code")
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


@dataclass(frozen=True)
class Row:
    """A trained row: its name (run directory, adapter name) and its resolved recipe."""

    name: str
    recipe: Any  # qtulu.recipes.Recipe
    where: str  # "recipes.N" in the study file


@dataclass(frozen=True)
class Column:
    """An eval task as a column: its label (``name``: the task's ``column``, default the task's
    name; it keys the table, the records, the eval folders and the merge search), the task variant
    (``task``), options (as written, quick mode's applied; eval.profile applies unless they name
    one), data folder."""

    name: str
    options: dict[str, Any]
    data_dir: Path
    where: str
    judge: Any = None  # JudgeSpec: the task's own, else eval.judge
    task: str = ""  # the task variant (default: ``name``)

    def __post_init__(self):
        if not self.task:
            object.__setattr__(self, "task", self.name)


@dataclass(frozen=True)
class MergePlan:
    name: str
    adapters: list[str]
    tasks: list[str]
    spec: MergeSearchSpec
    data_dir: Path


@dataclass
class LoadedStudy:
    """A study file resolved against an output folder (see `load_study`)."""

    file: Path
    out: Path
    spec: Study
    base: BaseSpec
    base_path: str  # what every recipe's model.base is: the path/hub id, or OUT/base for the demo base
    rows: list[Row]
    columns: list[Column]
    eval: EvalSpec
    limit: int | None  # eval.limit, or quick mode's
    synthetic: SyntheticSpec | None
    merge: MergePlan | None = None
    average: list[str] = field(default_factory=list)  # the tasks the table's average is over
    raw: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def labels(self) -> list[str]:
        """The table's rows in order: base (if included), each recipe, the merge (if any)."""
        return ([BASE_ROW] if self.eval.include_base else []) + [r.name for r in self.rows] + \
            ([self.merge.name] if self.merge else [])


def _read(path: Path) -> dict:
    from qtulu.yaml_io import read_mapping  # recipes' YAML: duplicate keys refused, 1e-4 is a float

    return read_mapping(path, StudyError, "study")


def _substitute(value, out: str):
    """``${out}`` -> the output folder, in every string of the parsed file."""
    if isinstance(value, str):
        return value.replace(OUT_VAR, out)
    if isinstance(value, list):
        return [_substitute(v, out) for v in value]
    if isinstance(value, dict):
        return {k: _substitute(v, out) for k, v in value.items()}
    return value


def _local(value: str, base_dir: Path) -> str:
    p = Path(os.path.expandvars(os.path.expanduser(value)))
    return str((p if p.is_absolute() else base_dir / p).resolve())


def _path_like(s: str) -> bool:
    return s.startswith(("./", "../", "/", "~", "$"))


def resolve_study_path(path: str | os.PathLike) -> Path:
    """A study file path, or a bare name of ``recipes/studies/NAME.yaml``."""
    from qtulu.recipes import REPO_RECIPES_DIR

    s = str(path)
    p = Path(os.path.expanduser(s))
    if not p.exists() and "/" not in s and not s.endswith((".yaml", ".yml")):
        candidate = REPO_RECIPES_DIR / "studies" / f"{s}.yaml"
        if candidate.is_file():
            return candidate
        known = ", ".join(sorted(q.stem for q in (REPO_RECIPES_DIR / "studies").glob("*.yaml")))
        raise StudyError(f"no study file {s!r} (and no recipes/studies/{s}.yaml; known: {known})")
    if not p.is_file():
        raise StudyError(f"study file not found: {p}" + (" (a directory)" if p.is_dir() else ""))
    return p.resolve()


def default_out(path: str | os.PathLike) -> Path:
    """``studies/NAME`` (NAME: the study's ``name``, else the file's stem)."""
    file = resolve_study_path(path)
    try:
        name = _read(file).get("name")
    except StudyError:
        name = None
    return Path("studies") / (name if isinstance(name, str) and _NAME_RE.fullmatch(name) else file.stem)


def load_study(path: str | os.PathLike, out_dir: str | os.PathLike) -> LoadedStudy:
    """Read, check and resolve the study at ``path`` for the output folder ``out_dir`` (nothing is written)."""
    from qtulu.schema import build

    file = resolve_study_path(path)
    out = Path(out_dir).expanduser().resolve()
    raw = _substitute(_read(file), str(out))
    where_file = str(file)

    def err(key: str, msg: str):
        raise StudyError(f"{where_file}: {key}: {msg}")

    spec: Study = build(Study, raw, "", err)
    if not _NAME_RE.fullmatch(spec.name):
        err("name", f"{spec.name!r}: use letters, digits, '.', '_' or '-' (it names the output folder)")
    here = file.parent
    base = _check_base(spec.base, here, err)
    base_path = str(out / "base") if base.demo is not None else base.path
    synthetic = _check_synthetic(spec.synthetic, err)
    ev = _check_eval(spec.eval, here, err)
    rows = _load_rows(spec, base, base_path, here, err)
    _check_prompt_formats(rows, ev, err)
    columns, limit = _load_columns(spec, ev, here, err)
    study = LoadedStudy(file=file, out=out, spec=spec, base=base, base_path=base_path, rows=rows, columns=columns,
                        eval=ev, limit=limit, synthetic=synthetic, raw=raw)
    if spec.merge_search is not None:
        study.merge = _check_merge(spec.merge_search, rows, columns, err)
    study.average = [c.name for c in columns]
    if spec.average is not None:
        for i, t in enumerate(spec.average):
            if t not in study.average:
                err(f"average.{i}", f"{t!r} is not a task of the study (tasks: {', '.join(study.average)})")
        if not spec.average:
            err("average", "list at least one task (or leave it out: every task)")
        study.average = [t for t in study.average if t in spec.average]
    names = [r.name for r in rows]
    if study.merge and study.merge.name in names + [BASE_ROW]:
        err("merge_search.name", f"{study.merge.name!r} is already a row's name; choose another")
    return study


# --------------------------------------------------------------------------------------------
# sections


def _check_prompt_formats(rows: list[Row], ev: EvalSpec, err) -> None:
    """Every adapter row is evaluated with the prompt format its training rendered its rows in."""
    if ev.chat_format is None:  # plain prompts for the adapters: the user's explicit choice
        return
    for r in rows:
        if r.recipe.data.chat_format != ev.chat_format:
            err(f"{r.where}", f"row {r.name!r} trains with data.chat_format={r.recipe.data.chat_format!r} but "
                              f"eval.chat_format is {ev.chat_format!r}: set one of them so that both agree")


def _check_base(b: BaseSpec, here: Path, err) -> BaseSpec:
    from dataclasses import replace

    from qtulu.recipes import NF4_BLOCKSIZES

    if (b.path is None) == (b.demo is None):
        err("base", "give exactly one of base.path (a model directory or hub id) and base.demo (the tiny "
                    "in-process base)")
    if b.blocksize not in NF4_BLOCKSIZES:
        err("base.blocksize", f"must be one of {', '.join(map(str, NF4_BLOCKSIZES))}, got {b.blocksize}")
    if b.demo is not None:
        d = b.demo
        for key in ("warmup_steps", "warmup_batch", "warmup_examples", "hidden_size", "intermediate_size",
                    "num_hidden_layers", "num_attention_heads", "num_key_value_heads"):
            if getattr(d, key) < 1:
                err(f"base.demo.{key}", f"must be >= 1, got {getattr(d, key)}")
        if d.hidden_size % d.num_attention_heads or d.num_attention_heads % d.num_key_value_heads:
            err("base.demo", "hidden_size must be a multiple of num_attention_heads, and num_attention_heads of "
                             "num_key_value_heads")
        if d.warmup_lr <= 0 or d.initializer_range <= 0:
            err("base.demo", "warmup_lr and initializer_range must be > 0")
        return b
    path = b.path
    if _path_like(path) or (here / path).exists():
        path = _local(path, here)
    return replace(b, path=path)


def _check_synthetic(s: SyntheticSpec | None, err) -> SyntheticSpec | None:
    if s is None:
        return None
    from qtulu.demo.synthetic import TASKS

    for i, skill in enumerate(s.skills):
        if skill not in TASKS:
            err(f"synthetic.skills.{i}", f"unknown skill {skill!r} (known: {', '.join(TASKS)})")
    if len(set(s.skills)) != len(s.skills):
        err("synthetic.skills", "a skill is listed twice")
    for key in ("train_examples", "test_examples"):
        if getattr(s, key) < 1:
            err(f"synthetic.{key}", f"must be >= 1, got {getattr(s, key)}")
    return s


def _check_eval(e: EvalSpec, here: Path, err) -> EvalSpec:
    from dataclasses import replace

    if e.batch_size < 1:
        err("eval.batch_size", f"must be >= 1, got {e.batch_size}")
    if e.limit is not None and e.limit < 1:
        err("eval.limit", f"must be >= 1 or null, got {e.limit}")
    if e.workers is not None and e.workers < 1:
        err("eval.workers", f"must be >= 1 or null, got {e.workers}")
    if e.max_length is not None and e.max_length < 8:
        err("eval.max_length", f"must be >= 8 or null, got {e.max_length}")
    changes = {}
    for key in ("data_dir", "cache_dir"):
        if getattr(e, key) is not None:
            changes[key] = _local(getattr(e, key), here)
    if e.toxigen_classifier and _path_like(e.toxigen_classifier):
        changes["toxigen_classifier"] = _local(e.toxigen_classifier, here)
    return replace(e, **changes)


def _overrides_dict(items: dict, where: str, here: Path, err) -> dict:
    """Study-written recipe overrides: keys checked, local paths made absolute (relative to the study file)."""
    out = {}
    for key, value in items.items():
        parts = key.split(".")
        if parts[0] == "model" and len(parts) == 2 and parts[1] in MODEL_KEYS:
            err(f"{where}.{key}", f"every recipe shares the study's base: set base.{parts[1]} instead"
                if parts[1] != "base" else "every recipe trains on the study's base: set base.path instead")
        if isinstance(value, str) and parts[0] == "sources" and parts[-1] == "path":
            value = _local(value, here)
        elif isinstance(value, str) and parts[0] == "sources" and parts[-1] == "release" and _path_like(value):
            value = _local(value, here)
        elif isinstance(value, str) and key == "data.tokenizer" and _path_like(value):
            value = _local(value, here)
        elif key == "sources" and isinstance(value, list):  # a whole source list (a mixture): its paths too
            value = [{**v, "path": _local(v["path"], here)} if isinstance(v, dict) and isinstance(v.get("path"), str)
                     else v for v in value]
        out[key] = value
    return out


def _load_rows(spec: Study, base: BaseSpec, base_path: str, here: Path, err) -> list[Row]:
    from qtulu.adapters.store import adapter_name_problem
    from qtulu.presets import preset_overrides
    from qtulu.recipes import parse_yaml_value, resolve_recipe_path

    if not spec.recipes:
        err("recipes", "list at least one recipe")
    forced = {f"model.{k}": (base_path if k == "base" else getattr(base, k)) for k in MODEL_KEYS}
    common = _overrides_dict(spec.overrides, "overrides", here, err)
    rows, seen = [], {}
    for i, entry in enumerate(spec.recipes):
        where = f"recipes.{i}"
        entry = StudyRecipe(recipe=entry) if isinstance(entry, str) else entry
        try:
            path = resolve_recipe_path(entry.recipe, here)
            preset = entry.preset or spec.preset
            pairs = {}
            for item in preset_overrides(preset, path):
                k, _, v = item.partition("=")
                pairs[k] = parse_yaml_value(v)
            pairs.update(common)
            pairs.update(_overrides_dict(entry.overrides, f"{where}.overrides", here, err))
            pairs.update(forced)
            from qtulu.recipes import load_recipe

            recipe = load_recipe(path, pairs)
        except StudyError:
            raise
        except QtuluError as e:
            err(f"{where} ({entry.recipe})", str(e))
        name = entry.name or recipe.name
        problem = adapter_name_problem(name)
        if problem or name == BASE_ROW:
            err(f"{where}.name", problem or f"{name!r} is the base's row; name the recipe's row otherwise")
        if name in seen:
            err(f"{where}.name", f"row {name!r} is already {seen[name]}: give each row its own name (recipes.N.name)")
        seen[name] = where
        rows.append(Row(name=name, recipe=recipe, where=where))
    return rows


def _load_columns(spec: Study, ev: EvalSpec, here: Path, err) -> tuple[list[Column], int | None]:
    from qtulu.evals.quick import apply_quick
    from qtulu.evals.runner import resolve_task

    if not spec.tasks:
        err("tasks", "list at least one task")
    entries = [StudyTask(name=t) if isinstance(t, str) else t for t in spec.tasks]
    labels = _column_labels(entries, err)
    options = {lab: _task_paths(t, here) for lab, t in zip(labels, entries)}
    limit = ev.limit
    if ev.quick:
        from qtulu.evals.tasks import TASKS

        _, limit = apply_quick([], None, ev.limit)
        for lab, t in zip(labels, entries):
            if t.name in TASKS:
                options[lab] = apply_quick([t.name], {t.name: options[lab]}, ev.limit)[0][t.name]
    cols = []
    for i, (lab, t) in enumerate(zip(labels, entries)):
        where = f"tasks.{i}"
        try:
            resolve_task(t.name, options[lab], ev.profile)  # an unknown task or option is refused here
        except QtuluError as e:
            err(f"{where} ({t.name})", str(e))
        data_dir = _local(t.data_dir, here) if t.data_dir else ev.data_dir
        if data_dir is None:
            err(f"{where}.data_dir", "no eval data folder: set eval.data_dir (every task) or this task's data_dir")
        cols.append(Column(name=lab, options=options[lab], data_dir=Path(data_dir), where=where,
                           judge=t.judge or ev.judge, task=t.name))
    return cols, limit


def _column_labels(entries: list[StudyTask], err) -> list[str]:
    """Each task's column label (``column``, default its name); a label used twice is refused."""
    labels = [t.column or t.name for t in entries]
    for i, (lab, t) in enumerate(zip(labels, entries)):
        if t.column is not None and (not _NAME_RE.fullmatch(t.column) or t.column == BASE_ROW):
            err(f"tasks.{i}.column", f"{t.column!r}: use letters, digits, '.', '_' or '-' (it names a folder)")
        if labels.index(lab) != i:
            j = labels.index(lab)
            err(f"tasks.{i}", f"column {lab!r} is already tasks.{j} ({entries[j].name}): give each column of a task "
                              "its own label (tasks.N.column)")
    return labels


def _task_paths(t: StudyTask, here: Path) -> dict:
    """The task's options, with a file option (the module's ``FILE_OPTIONS``, e.g. reply_loss's path)
    written ``./...`` or ``../...`` made absolute against the study file, as recipes' source paths are;
    other relative paths stay relative to the task's data folder."""
    from qtulu.evals.tasks import TASKS

    opts = dict(t.options)
    if t.name in TASKS:
        import importlib

        module = importlib.import_module(f"qtulu.evals.tasks.{TASKS[t.name][0]}")
        for key in getattr(module, "FILE_OPTIONS", ()):
            if isinstance(opts.get(key), str) and _path_like(opts[key]):
                opts[key] = _local(opts[key], here)
    return opts


def _check_merge(m: MergeSearchSpec, rows: list[Row], cols: list[Column], err) -> MergePlan:
    from qtulu.adapters.store import adapter_name_problem
    from qtulu.adapters.merge import METHODS

    names = [r.name for r in rows]
    adapters = list(m.adapters) if m.adapters is not None else names
    for i, a in enumerate(adapters):
        if a not in names:
            err(f"merge_search.adapters.{i}", f"{a!r} is not a row of the study (rows: {', '.join(names)})")
    if len(set(adapters)) != len(adapters) or len(adapters) < 2:
        err("merge_search.adapters", f"needs at least two different rows, got {adapters}")
    col_names = [c.name for c in cols]
    tasks = list(m.tasks) if m.tasks is not None else col_names
    for i, t in enumerate(tasks):
        if t not in col_names:
            err(f"merge_search.tasks.{i}", f"{t!r} is not a task of the study (tasks: {', '.join(col_names)})")
    if not tasks or len(set(tasks)) != len(tasks):
        err("merge_search.tasks", f"needs one or more different tasks, got {tasks}")
    for i, method in enumerate(m.methods):
        if method not in METHODS:
            err(f"merge_search.methods.{i}", f"unknown merge method {method!r} (known: {', '.join(METHODS)})")
    if not m.methods:
        err("merge_search.methods", "list at least one method")
    for i, w in enumerate(m.weights or []):
        if len(w) != len(adapters):
            err(f"merge_search.weights.{i}", f"{len(w)} weights for the {len(adapters)} adapters {adapters}")
    for i, d in enumerate(m.densities):
        if not 0.0 < d <= 1.0:
            err(f"merge_search.densities.{i}", f"a density is in (0, 1], got {d}")
    if m.limit is not None and m.limit < 1:
        err("merge_search.limit", f"must be >= 1 or null, got {m.limit}")
    problem = adapter_name_problem(m.name)
    if problem:
        err("merge_search.name", problem)
    judges = {None if c.judge is None else (c.judge.url, c.judge.model, c.judge.api_key_env)
              for c in cols if c.name in tasks}
    if len(judges) > 1:  # `merge_search` scores every task with one judge
        err("merge_search.tasks", "the merge's tasks have different judges; the merge search uses one")
    dirs = {c.data_dir for c in cols if c.name in tasks}
    if len(dirs) > 1:  # `merge_search` reads every task from one data root
        err("merge_search.tasks", f"the merge's tasks read {len(dirs)} data folders ({', '.join(map(str, sorted(dirs)))}); "
                                  "the merge search reads one: give them one eval.data_dir")
    return MergePlan(name=m.name, adapters=adapters, tasks=tasks, spec=m, data_dir=dirs.pop())


def describe(study: LoadedStudy) -> str:
    """One paragraph: what the study will build."""
    base = f"the demo's tiny base (built in {study.out / 'base'})" if study.base.demo else study.base_path
    parts = [f"study {study.name!r}: {len(study.rows)} recipe(s) on {base} "
             f"({'NF4' if study.base.quantize else study.base.compute_dtype}), {len(study.columns)} task(s)"]
    if study.merge:
        parts.append(f"a merge search over {', '.join(study.merge.adapters)} ({', '.join(study.merge.spec.methods)})")
    return "; ".join(parts)


def to_json(study: LoadedStudy) -> str:
    """The resolved study (for OUT/study.json)."""
    from dataclasses import asdict

    return json.dumps({
        "file": str(study.file), "name": study.name, "description": study.spec.description,
        "base": asdict(study.base), "base_path": study.base_path,
        "rows": {r.name: r.recipe.to_dict() for r in study.rows},
        "columns": {c.name: {"task": c.task, "options": c.options, "data_dir": str(c.data_dir)} for c in study.columns},
        "eval": asdict(study.eval), "limit": study.limit,
        "synthetic": asdict(study.synthetic) if study.synthetic else None,
        "merge_search": ({"name": study.merge.name, "adapters": study.merge.adapters, "tasks": study.merge.tasks,
                          **asdict(study.merge.spec)} if study.merge else None),
    }, indent=2, default=str)
