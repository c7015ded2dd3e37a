"""Recipes: YAML files that say what to train on and how, validated against a typed schema.

A recipe is a frozen dataclass tree (`Recipe`) loaded from ``recipes/<name>.yaml`` (or any path)::

    from qtulu.recipes import load_recipe
    r = load_recipe("dolly", ["train.learning_rate=2e-4", "sources.dolly.count=1000"])
    r.train.learning_rate        # 0.0002
    r.to_dict()                  # JSON-able, fully resolved (references expanded, paths absolute)

The schema is derived from the dataclass fields and their type hints, so adding a field with a
default to `TrainConfig` / `ModelConfig` is all it takes to make a new key valid. An unknown key or
a value of the wrong type raises `RecipeError` naming the file and the dotted key.

Sources and mixtures. ``sources`` is a list; each entry is either a `SourceSpec` (``name``, ``hub_id``
and/or ``path``, ``format``, ``count``, ...) or a reference ``{recipe: NAME_OR_PATH}`` that expands to
the sources of another recipe (only its sources: the referencing recipe's data/model/lora/train
apply). A reference to a single-source recipe may also override that source's fields (``count``,
``name``, ``options`` (merged), ``split``, ``path``, ``hub_id``, ``hub_config``).

Settings. ``settings: NAME`` puts the ``data``/``model``/``lora``/``train`` blocks of
``recipes/settings/NAME.yaml`` (or of a YAML path) under the recipe's own keys: hyperparameter sets
that cite where their numbers come from (``-o settings=tulu_v1_paper`` switches a recipe to another).
A source with ``release: tulu_v1`` reads its rows from that released mixture instead (see
`SourceSpec`).

Paths. A relative ``path`` (and a path-like ``data.tokenizer`` / ``model.base``, i.e. starting with
``./``, ``../``, ``~`` or ending in ``.model``/``.json``) written in a YAML file is relative to that
file's directory; one given as an override is relative to the working directory. ``$VARS`` and
``~`` are expanded.

Overrides are dotted keys: ``train.learning_rate``, ``data.max_seq_len``, ``sources.NAME.count`` or
``sources.INDEX.count``; as a dict ``{"train.learning_rate": 2e-4}`` or as strings
``["train.learning_rate=2e-4"]`` whose values are parsed as YAML (``2e-4`` is a float here, unlike
PyYAML's YAML 1.1 default).
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.resources
import os
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from qtulu.errors import QtuluError
from qtulu.schema import build, schema_fields, type_name
from qtulu.yaml_io import parse_yaml_value, read_mapping  # noqa: F401 - parse_yaml_value is API

# The shipped recipes (the repo's recipes/ folder, packaged as qtulu/builtin_recipes). qtulu is
# never imported from a zip, so the resource is a real directory.
REPO_RECIPES_DIR = Path(str(importlib.resources.files("qtulu") / "builtin_recipes"))
SETTINGS_DIR = REPO_RECIPES_DIR / "settings"
SETTINGS_SECTIONS = ("data", "model", "lora", "train")

# Converter names understood by qtulu.data.formats (kept here, below data/, so that recipes are
# validated without importing the data layer; a test checks both lists agree).
FORMATS = (
    "alpaca",
    "dolly",
    "oasst1",
    "sharegpt",
    "self_instruct",
    "unnatural_instructions",
    "superni",
    "flan_v2",
    "cot",
    "flan_cot_raw",
    "baize",
    "messages",
)


# NF4 block sizes (bitsandbytes'); kept equal to qtulu.kernels.nf4_format.VALID_BLOCKSIZES (a test checks)
NF4_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)


class RecipeError(QtuluError, ValueError):
    """A recipe that cannot be loaded: the message names the file and the dotted key."""


# --------------------------------------------------------------------------------------------
# schema


@dataclass(frozen=True)
class SourceSpec:
    """One data source: where it lives, which converter reads it, and how many examples to take.

    ``count``: an int takes that many examples (sampled with replacement when larger than the
    source, without replacement when smaller); a float in (0, 1] takes that fraction; None takes all.
    ``options`` are passed to the converter (e.g. ``{"shots": "few"}`` for cot/flan_v2).
    """

    name: str  # source name, unique in the recipe (overrides: sources.NAME.KEY)
    format: str  # native schema of the rows: which converter reads them (see FORMATS)
    hub_id: str | None = None  # Hugging Face dataset id (used when no local path is given)
    hub_config: str | None = None  # dataset configuration name on the hub
    path: str | None = None  # local json/jsonl/parquet/arrow file or directory (wins over hub_id)
    split: str = "train"  # hub split to read
    count: int | float | None = None  # examples to take: int n (resampled if larger), fraction in (0, 1], or null = all
    # native rows set aside for evaluation (never trained on, chosen by content: qtulu.data.holdout):
    # int k = k rows (SuperNI: instances, OASST1: trees), float in (0, 1) = that fraction; null = none
    hold_out: int | float | None = None
    options: dict[str, Any] = field(default_factory=dict)  # converter options (qtulu data formats lists them)
    # Take this source's rows from a released mixture instead (rows whose `dataset` column is
    # `release_dataset`, default the source's name): "tulu_v1" / "tulu_v2" (allenai/tulu-v*-sft-mixture),
    # a hub id or a local parquet path. The rows are used as released (format `messages`).
    release: str | None = None
    release_dataset: str | None = None  # the released rows' `dataset` value to keep (default: the source's name)


@dataclass(frozen=True)
class DataConfig:
    """How examples are rendered, checked, tokenized and packed."""

    max_seq_len: int = 2048  # tokens per packed row; a longer example is truncated or dropped (on_overlong)
    # tulu (<|user|>/<|assistant|> turns, as the paper) or the tokenizer's own chat template
    chat_format: Literal["tulu", "tokenizer"] = "tulu"
    # a malformed row: stop the build at its file:line (error) or count it and go on (skip)
    on_bad_row: Literal["error", "skip"] = "error"
    on_overlong: Literal["truncate", "drop"] = "truncate"  # an example over max_seq_len: truncate it or drop it
    tokenizer: str | None = None  # tokenizer (SentencePiece .model, folder or hub id); None = the base's own
    seed: int = 42  # seed of the data sampling (count) and of any random templates
    # How native rows become conversations: "open_instruct" = open-instruct's June-2023 converter
    # (weighted random instruction templates, seeded by `seed`); "plain" = the same selection with
    # one fixed layout (instruction, blank line, input). See qtulu.data.formats.
    profile: Literal["open_instruct", "plain"] = "open_instruct"
    # Held-out examples for the validation loss (train.eval_steps): a fraction in (0, 1) of the built
    # examples (whole examples, drawn with `seed` before the training rows are packed), or a path to
    # a file in a source format (validation_format); null = no validation
    validation: float | str | None = None
    validation_format: str | None = None  # converter of a data.validation file (see FORMATS); null = the first source's


@dataclass(frozen=True)
class ModelConfig:
    """The base model and how it is quantized."""

    base: str | None = None  # base model: a local safetensors directory or a hub id
    revision: str | None = None  # hub revision (branch, tag or commit) of the base
    trust_remote_code: bool = False  # run the checkpoint's own Python code (off unless you trust it)
    quantize: Literal["nf4"] | None = "nf4"  # nf4 = QLoRA on a 4-bit base; null = plain LoRA on a compute_dtype base
    double_quant: bool = True  # quantize the NF4 block scales too (QLoRA's double quantization)
    blocksize: int = 64  # NF4 block size (weights per absmax scale)
    # dtype of the matmuls and of the weights that are not quantized
    compute_dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    attn_implementation: str = "qtulu_varlen"  # attention kernel: qtulu_varlen (packed rows, no mask), sdpa, eager, ...


@dataclass(frozen=True)
class LoraSpec:
    """LoRA adapter shape. Defaults: the QLoRA paper's r 64 / alpha 16 / dropout 0.1, which is also
    open-instruct's first QLoRA script (scripts/finetune_qlora_with_accelerate.sh at 7c5ee77a1)."""

    r: int = 64  # LoRA rank
    alpha: int = 16  # LoRA scale numerator: the update is (alpha / r) * B A
    dropout: float = 0.1  # dropout on the LoRA input
    target_modules: str | list[str] = "all-linear"  # layers that get an adapter: all-linear or a list of module names
    # "recompute": the dropout mask is regenerated in backward instead of keeping a dropped copy of
    # each module's input (same maths; qtulu.train.lora_dropout). "peft": peft's nn.Dropout.
    dropout_impl: Literal["peft", "recompute"] = "peft"


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation hyperparameters. The defaults are qtulu's (lr 1e-4 as open-instruct's QLoRA script
    at 1afa4b6b5, 2 epochs as the paper); the shipped recipes take theirs from `recipes/settings/`.

    ``effective_batch_size`` counts examples per optimizer step, as open-instruct does; the
    trainer converts it to accumulation over packed rows unless ``gradient_accumulation_steps``
    is given.
    """

    learning_rate: float = 1e-4  # peak learning rate
    lr_scheduler: str = "linear"  # learning-rate schedule after warm-up (HF name: linear, cosine, constant, ...)
    warmup_ratio: float = 0.03  # fraction of the steps spent warming the learning rate up from 0
    epochs: float = 2.0  # passes over the data (when max_steps is -1)
    max_steps: int = -1  # optimizer steps to run; -1 = as many as epochs give
    micro_batch_size: int = 1  # packed rows per forward/backward on each device
    effective_batch_size: int = 128  # examples per optimizer step (sets the accumulation, as open-instruct)
    gradient_accumulation_steps: int | None = None  # micro-batches per optimizer step; null = from effective_batch_size
    seed: int = 42  # seed of the LoRA init and of the data order
    optimizer: str = "paged_adamw_8bit"  # HF optimizer name; paged_adamw_8bit needs CUDA (adamw_torch is used off it)
    weight_decay: float = 0.0  # AdamW weight decay
    max_grad_norm: float = 1.0  # gradient clipping norm
    gradient_checkpointing: bool = True  # recompute activations in backward: less memory, ~30% more time
    logging_steps: int = 10  # print the loss every this many steps
    save_steps: int = 200  # write a checkpoint every this many steps (0 = none; resume needs one)
    save_total_limit: int = 3  # checkpoints kept (oldest removed)
    max_nonfinite_in_a_row: int = 10  # stop after this many consecutive NaN/inf steps (each is skipped)
    report_to: str = "none"  # none, tensorboard or wandb (comma-separated); each must be installed
    # evaluate the validation loss (data.validation) every this many optimizer steps; 0 = only at the end
    eval_steps: int = 0
    # keep the checkpoint with the lowest validation loss (never rotated away) and save its weights as
    # OUT/adapter; needs a checkpoint at every evaluation (train.eval_steps a multiple of train.save_steps)
    keep_best_checkpoint: bool = False
    # FSDP2 (fully_shard) across the ranks of a torchrun/accelerate launch; None = DDP. full_shard
    # re-shards parameters after each forward, shard_grad_op keeps them gathered until backward.
    fsdp: Literal["full_shard", "shard_grad_op"] | None = None
    # Memory switches (measured by `qtulu plan` and benchmarks/bench_memory.py; all keep the maths):
    # vocabulary columns per tile of TRL's chunked LM-head loss (None: TRL's 32768; qtulu.train.loss)
    loss_chunk_size: int | None = None
    # checkpointed layer inputs held in pinned host memory between forward and backward (CUDA; qtulu.train.offload)
    activation_offload: bool = False
    # "host": fp32 master LoRA weights, their gradient sums and the optimizer on the host, bf16 copies
    # on the device (qtulu.train.master_weights); "device": peft's fp32 LoRA weights on the device
    master_weights: Literal["device", "host"] = "device"


@dataclass(frozen=True)
class Recipe:
    """A whole recipe. ``path`` is the file it came from (None when built from a dict)."""

    name: str  # the run's name: run directory and adapter name (runs/NAME)
    sources: list[SourceSpec]  # the data: a list of sources, or {recipe: NAME} references to other recipes
    description: str = ""  # one line saying what this recipe trains
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraSpec = field(default_factory=LoraSpec)
    train: TrainConfig = field(default_factory=TrainConfig)
    # A hyperparameter bundle under the recipe's own keys: a name of recipes/settings/NAME.yaml or a
    # path to such a file (its data/model/lora/train blocks; the recipe's keys and overrides win).
    settings: str | None = None
    path: str | None = field(default=None, compare=False, metadata={"schema": False})
    # the keys a `--set KEY=VALUE` gave (so that a later error about one names the command line)
    overridden: tuple[str, ...] = field(default=(), compare=False, metadata={"schema": False})

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict of every schema field (``path`` and ``overridden`` left out, so it loads back
        via `recipe_from_dict`)."""
        out = dataclasses.asdict(self)
        out.pop("path", None)
        out.pop("overridden", None)
        return out

    def where(self, key: str) -> str:
        """Where ``key``'s value came from, for an error message: the command line or the recipe file."""
        if key in self.overridden:
            value = self
            for part in key.split("."):
                value = getattr(value, part, None)
            return f"command line: --set {key}={value}"
        return f"{self.path or self.name}: {key}"

    def source(self, name: str) -> SourceSpec:
        """The source called ``name`` (KeyError listing the names otherwise)."""
        for s in self.sources:
            if s.name == name:
                return s
        raise KeyError(f"recipe {self.name!r} has no source {name!r}; sources: {[s.name for s in self.sources]}")


def _read_yaml(path: Path) -> dict[str, Any]:
    return read_mapping(path, RecipeError, "recipe")


def schema_keys(cls=Recipe, prefix: str = "") -> dict[str, str]:
    """Every valid dotted key of the schema with its type, e.g. ``{"train.learning_rate": "float", ...}``."""
    out: dict[str, str] = {}
    hints = typing.get_type_hints(cls)
    for f in schema_fields(cls):
        tp = hints[f.name]
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(tp):
            out.update(schema_keys(tp, key + "."))
        else:
            out[key] = type_name(tp)
    return out


# --------------------------------------------------------------------------------------------
# loading: references, paths, overrides


_PATH_LIKE_KEYS = (("data", "tokenizer"), ("model", "base"))
_REF_OVERRIDABLE = ("name", "count", "hold_out", "options", "split", "path", "hub_id", "hub_config", "release", "release_dataset")


def resolve_recipe_path(path_or_name: str | os.PathLike, base_dir: Path | None = None) -> Path:
    """``dolly`` -> ``<repo>/recipes/dolly.yaml``; anything path-like is taken relative to ``base_dir`` (or cwd)."""
    s = str(path_or_name)
    looks_like_path = s.endswith((".yaml", ".yml")) or "/" in s or os.sep in s
    if not looks_like_path:
        candidate = REPO_RECIPES_DIR / f"{s}.yaml"
        if not candidate.exists():
            known = sorted(p.stem for p in REPO_RECIPES_DIR.glob("*.yaml"))
            raise RecipeError(f"no recipe named {s!r} in {REPO_RECIPES_DIR} (known: {', '.join(known)})")
        return candidate
    p = Path(os.path.expandvars(os.path.expanduser(s)))
    if not p.is_absolute():
        p = (base_dir or Path.cwd()) / p
    p = p.resolve()
    if not p.exists():
        raise RecipeError(f"recipe file not found: {p}")
    if not p.is_file():
        raise RecipeError(f"recipe path is not a file: {p} (give a recipe YAML file or a name from {REPO_RECIPES_DIR})")
    return p


def _is_path_like(s: str) -> bool:
    return s.startswith(("./", "../", "/", "~", "$")) or s.endswith((".model", ".json"))


def _resolve_local(s: str, base_dir: Path) -> str:
    p = Path(os.path.expandvars(os.path.expanduser(s)))
    if not p.is_absolute():
        p = base_dir / p
    return str(p.resolve())


def _expand_sources(raw: Any, file: Path, stack: tuple[Path, ...]) -> list[dict[str, Any]]:
    """Expand ``{recipe: ...}`` references and make local paths absolute (relative to ``file``)."""

    def err(key: str, msg: str):
        raise RecipeError(f"{file}: {key}: {msg}")

    if raw is None:
        err("sources", "required key is missing")
    if not isinstance(raw, list) or not raw:
        err("sources", f"expected a non-empty list of sources, got {raw!r}")
    out: list[dict[str, Any]] = []
    for i, entry in enumerate(raw):
        where = f"sources.{i}"
        if not isinstance(entry, dict):
            err(where, f"expected a mapping, got {type(entry).__name__} {entry!r}")
        entry = dict(entry)
        if "recipe" in entry:
            ref = entry.pop("recipe")
            if not isinstance(ref, str):
                err(f"{where}.recipe", f"expected str, got {type(ref).__name__}")
            for k in entry:
                if k not in _REF_OVERRIDABLE:
                    err(f"{where}.{k}", f"unknown key for a recipe reference (valid: recipe, {', '.join(_REF_OVERRIDABLE)})")
            try:
                ref_path = resolve_recipe_path(ref, file.parent)
            except RecipeError as e:
                err(f"{where}.recipe", str(e))
            if ref_path in stack or ref_path == file:
                err(f"{where}.recipe", f"circular reference: {' -> '.join(str(p) for p in (*stack, file, ref_path))}")
            ref_raw = _read_yaml(ref_path)
            expanded = _expand_sources(ref_raw.get("sources"), ref_path, (*stack, file))
            if entry:
                if len(expanded) != 1:
                    err(where, f"overrides {sorted(entry)} on a reference to {ref!r} which has {len(expanded)} sources; "
                        "override each source by name instead (sources.NAME.KEY)")
                src = expanded[0]
                for k, v in entry.items():
                    if k == "options":
                        if not isinstance(v, dict):
                            err(f"{where}.options", f"expected mapping, got {type(v).__name__}")
                        src["options"] = {**(src.get("options") or {}), **v}
                    elif k in ("path", "release") and isinstance(v, str) and (k == "path" or _is_local_release(v)):
                        src[k] = _resolve_local(v, file.parent)
                    else:
                        src[k] = v
            out.extend(expanded)
        else:
            if isinstance(entry.get("path"), str):
                entry["path"] = _resolve_local(entry["path"], file.parent)
            if isinstance(entry.get("release"), str) and _is_local_release(entry["release"]):
                entry["release"] = _resolve_local(entry["release"], file.parent)
            out.append(entry)
    return out


def _is_local_release(s: str) -> bool:
    return s.startswith(("./", "../", "/", "~", "$")) or s.endswith((".parquet", ".arrow", ".json", ".jsonl"))


def _normalize_overrides(overrides: dict[str, Any] | list[str] | tuple[str, ...] | None) -> list[tuple[str, Any]]:
    if overrides is None:
        return []
    if isinstance(overrides, dict):
        return list(overrides.items())
    pairs = []
    for item in overrides:
        if not isinstance(item, str) or "=" not in item:
            raise RecipeError(f"override {item!r}: expected KEY=VALUE (e.g. train.learning_rate=2e-4)")
        key, _, text = item.partition("=")
        try:
            value = parse_yaml_value(text) if text.strip() else ""
        except yaml.YAMLError as e:
            raise RecipeError(f"override {key.strip()}: cannot parse value {text!r}: {e}") from None
        pairs.append((key.strip(), value))
    return pairs


def _apply_override(raw: dict[str, Any], key: str, value: Any, file: str) -> None:
    def err(msg: str):
        raise RecipeError(f"{file}: override {key}: {msg}")

    parts = key.split(".")
    if not all(parts):
        err("empty segment in dotted key")
    node: Any = raw
    for depth, part in enumerate(parts[:-1]):
        if isinstance(node, list):
            node = _list_item(node, part, err)
        elif isinstance(node, dict):
            if part not in node or node[part] is None:
                node[part] = {}
            node = node[part]
        else:
            err(f"{'.'.join(parts[: depth + 1])} is not a mapping or list")
    last = parts[-1]
    if isinstance(node, list):
        idx = _list_index(node, last, err)
        node[idx] = value
    elif isinstance(node, dict):
        if parts[0] == "sources" and last == "path" and isinstance(value, str):
            value = _resolve_local(value, Path.cwd())
        if parts[0] == "sources" and last == "release" and isinstance(value, str) and _is_local_release(value):
            value = _resolve_local(value, Path.cwd())
        if (parts[0], last) in _PATH_LIKE_KEYS and len(parts) == 2 and isinstance(value, str) and _is_path_like(value):
            value = _resolve_local(value, Path.cwd())
        if (parts[0], last) == ("data", "validation") and len(parts) == 2 and isinstance(value, str) and value.strip():
            value = _resolve_local(value, Path.cwd())
        node[last] = value
    else:
        err(f"{'.'.join(parts[:-1])} is not a mapping")


def _list_index(items: list, part: str, err) -> int:
    if part.lstrip("-").isdigit():
        idx = int(part)
        if not -len(items) <= idx < len(items):
            err(f"index {idx} out of range ({len(items)} items)")
        return idx
    names = [it.get("name") if isinstance(it, dict) else None for it in items]
    if part not in names:
        err(f"no source named {part!r} (sources: {', '.join(str(n) for n in names)})")
    return names.index(part)


def _list_item(items: list, part: str, err):
    return items[_list_index(items, part, err)]


def _validate(raw: dict[str, Any], file: str) -> Recipe:
    def err(key: str, msg: str):
        raise RecipeError(f"{file}: {key}: {msg}")

    recipe = build(Recipe, raw, "", err)
    names = set()
    for i, s in enumerate(recipe.sources):
        where = f"sources.{s.name}"
        if s.name in names:
            err(where, f"duplicate source name {s.name!r} (give each source its own name)")
        names.add(s.name)
        if s.format not in FORMATS:
            err(f"{where}.format", f"unknown format {s.format!r} (known: {', '.join(FORMATS)})")
        if not s.hub_id and not s.path and not s.release:
            err(where, "needs a hub_id or a path (or a release)")
        if isinstance(s.count, bool):
            err(f"{where}.count", "expected int, float or null")
        if isinstance(s.count, int) and s.count < 1:
            err(f"{where}.count", f"an int count must be >= 1, got {s.count}")
        if isinstance(s.count, float) and not 0.0 < s.count <= 1.0:
            err(f"{where}.count", f"a float count is a fraction in (0, 1], got {s.count}")
        if isinstance(s.hold_out, int) and s.hold_out < 1:
            err(f"{where}.hold_out", f"an int hold_out is a number of rows >= 1, got {s.hold_out}")
        if isinstance(s.hold_out, float) and not 0.0 < s.hold_out < 1.0:
            err(f"{where}.hold_out", f"a float hold_out is a fraction in (0, 1), got {s.hold_out}")
    d = recipe.data
    if d.max_seq_len < 8:
        err("data.max_seq_len", f"must be >= 8, got {d.max_seq_len}")
    if recipe.lora.r < 1:
        err("lora.r", f"must be >= 1, got {recipe.lora.r}")
    if not 0.0 <= recipe.lora.dropout < 1.0:
        err("lora.dropout", f"must be in [0, 1), got {recipe.lora.dropout}")
    _check_ranges(recipe, err)
    t = recipe.train
    if t.learning_rate <= 0:
        err("train.learning_rate", f"must be > 0, got {t.learning_rate}")
    if not 0.0 <= t.warmup_ratio < 1.0:
        err("train.warmup_ratio", f"must be in [0, 1), got {t.warmup_ratio}")
    if t.micro_batch_size < 1 or t.effective_batch_size < 1:
        err("train.micro_batch_size", "micro_batch_size and effective_batch_size must be >= 1")
    if t.gradient_accumulation_steps is not None and t.gradient_accumulation_steps < 1:
        err("train.gradient_accumulation_steps", f"must be >= 1, got {t.gradient_accumulation_steps}")
    return recipe


def _with_settings(raw: dict[str, Any], file: Path, pairs: list[tuple[str, Any]], label: str) -> dict[str, Any]:
    """``raw`` over the blocks of its ``settings`` file (an override ``settings=...`` chooses it)."""
    name, base_dir = raw.get("settings"), file.parent
    for key, value in pairs:
        if key == "settings":
            name, base_dir = value, Path.cwd()
    if name is None:
        return raw
    if not isinstance(name, str):
        raise RecipeError(f"{label}: settings: expected str (a name in {SETTINGS_DIR} or a path), got {name!r}")
    if "/" in name or os.sep in name or name.endswith((".yaml", ".yml")):
        sfile = Path(_resolve_local(name, base_dir))
    else:
        sfile = SETTINGS_DIR / f"{name}.yaml"
    if not sfile.is_file():
        known = ", ".join(sorted(p.stem for p in SETTINGS_DIR.glob("*.yaml")))
        raise RecipeError(f"{label}: settings: no settings file {sfile} (known: {known})")
    base = _read_yaml(sfile)
    for k, v in base.items():
        if k not in SETTINGS_SECTIONS or not isinstance(v, dict):
            raise RecipeError(f"{sfile}: {k}: a settings file holds only the mappings {', '.join(SETTINGS_SECTIONS)}")
    merged = {k: dict(v) for k, v in base.items()}
    for k, v in raw.items():
        merged[k] = {**merged[k], **v} if k in merged and isinstance(v, dict) else v
    merged["settings"] = name
    return merged


def _check_ranges(recipe: Recipe, err) -> None:
    """Numbers in range (the schema already refused NaN/inf); a run must take at least one optimizer step."""
    t, m, lora = recipe.train, recipe.model, recipe.lora
    if t.max_steps == 0 or t.max_steps < -1:
        err("train.max_steps", f"must be -1 (train for train.epochs) or >= 1, got {t.max_steps}")
    if t.epochs < 0 or (t.epochs == 0 and t.max_steps <= 0):
        err("train.epochs", f"must be > 0 (or set train.max_steps >= 1), got {t.epochs}: "
            "the run would take no optimizer step")
    for key, value, low in (("train.weight_decay", t.weight_decay, 0), ("train.max_grad_norm", t.max_grad_norm, 0),
                            ("train.save_steps", t.save_steps, 0), ("train.save_total_limit", t.save_total_limit, 0),
                            ("train.seed", t.seed, 0), ("data.seed", recipe.data.seed, 0),
                            ("train.logging_steps", t.logging_steps, 1),
                            ("train.max_nonfinite_in_a_row", t.max_nonfinite_in_a_row, 1)):
        if value < low:
            err(key, f"must be >= {low}, got {value}")
    if lora.alpha <= 0:
        err("lora.alpha", f"must be > 0, got {lora.alpha}")
    _check_validation(recipe, err)
    if m.blocksize not in NF4_BLOCKSIZES:
        err("model.blocksize", f"must be one of {', '.join(map(str, NF4_BLOCKSIZES))}, got {m.blocksize}")
    _check_names(recipe, err)


# The names the trainer accepts for the string-valued recipe keys, checked when the recipe loads (an
# unknown optimizer used to be a traceback after the base had loaded). HF's own names
# (transformers' OptimizerNames / SchedulerType; tests/test_recipes.py checks they still are),
# limited to those that need no extra arguments or packages beyond torch and bitsandbytes.
OPTIMIZERS = ("adamw_torch", "adamw_torch_fused", "adafactor", "sgd", "adagrad", "rmsprop",
              "adamw_bnb_8bit", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit", "ademamix", "ademamix_8bit",
              "paged_ademamix_8bit", "paged_ademamix_32bit", "lion_8bit", "lion_32bit", "paged_lion_8bit",
              "paged_lion_32bit", "rmsprop_bnb", "rmsprop_bnb_8bit", "rmsprop_bnb_32bit")
LR_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
                 "inverse_sqrt")
REPORT_TO = ("none", "tensorboard", "wandb")
ATTN_IMPLEMENTATIONS = ("qtulu_varlen", "sdpa", "eager", "flash_attention_2", "flash_attention_3", "flex_attention")
_MODULE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]*")


def _check_names(recipe: Recipe, err) -> None:
    t, m, lora = recipe.train, recipe.model, recipe.lora
    for key, value, known in (("train.optimizer", t.optimizer, OPTIMIZERS),
                              ("train.lr_scheduler", t.lr_scheduler, LR_SCHEDULERS),
                              ("model.attn_implementation", m.attn_implementation, ATTN_IMPLEMENTATIONS)):
        if value not in known:
            err(key, f"unknown value {value!r} (known: {', '.join(known)})")
    for r in str(t.report_to).split(","):
        if r.strip() not in REPORT_TO:
            err("train.report_to", f"unknown logger {r.strip()!r} (known: {', '.join(REPORT_TO)}, comma-separated)")
    targets = [lora.target_modules] if isinstance(lora.target_modules, str) else list(lora.target_modules)
    if not targets:
        err("lora.target_modules", "empty: give all-linear or a list of module names")
    for name in targets:
        if name != "all-linear" and (not _MODULE_NAME.fullmatch(name) or ".." in name):
            err("lora.target_modules", f"{name!r} is not a module name (e.g. q_proj; or all-linear)")


def _check_validation(recipe: Recipe, err) -> None:
    """data.validation / validation_format, train.eval_steps / keep_best_checkpoint / report_to."""
    d, t = recipe.data, recipe.train
    v = d.validation
    if isinstance(v, float) and not 0.0 < v < 1.0:
        err("data.validation", f"a fraction of the examples must be in (0, 1), got {v}")
    if isinstance(v, str) and not v.strip():
        err("data.validation", "expected a fraction in (0, 1) or a file path, got an empty string")
    if d.validation_format is not None:
        if d.validation_format not in FORMATS:
            err("data.validation_format", f"unknown format {d.validation_format!r} (known: {', '.join(FORMATS)})")
        if not isinstance(v, str):
            err("data.validation_format", "applies to a data.validation file; data.validation is not a path")
    if t.eval_steps < 0:
        err("train.eval_steps", f"must be >= 0 (0 = evaluate only at the end), got {t.eval_steps}")
    if t.eval_steps > 0 and v is None:
        err("train.eval_steps", "needs held-out data: set data.validation (a fraction such as 0.05, or a file)")
    if t.keep_best_checkpoint:
        if v is None:
            err("train.keep_best_checkpoint", "needs held-out data: set data.validation")
        if t.save_steps <= 0 or t.eval_steps <= 0 or t.eval_steps % t.save_steps:
            err("train.keep_best_checkpoint", "needs a checkpoint at every evaluation: train.eval_steps >= 1 and a "
                f"multiple of train.save_steps (got eval_steps={t.eval_steps}, save_steps={t.save_steps})")


def _load_raw(raw: dict[str, Any], file: Path, overrides, label: str | None = None) -> Recipe:
    label = label or str(file)
    raw = copy.deepcopy(raw)
    raw.setdefault("name", file.stem)
    raw = _with_settings(raw, file, _normalize_overrides(overrides), label)
    raw["sources"] = _expand_sources(raw.get("sources"), file, ())
    for section, key in _PATH_LIKE_KEYS:
        sec = raw.get(section)
        if isinstance(sec, dict) and isinstance(sec.get(key), str) and _is_path_like(sec[key]):
            sec[key] = _resolve_local(sec[key], file.parent)
    if isinstance(raw.get("data"), dict) and isinstance(raw["data"].get("validation"), str) \
            and raw["data"]["validation"].strip():  # a string is always a path
        raw["data"]["validation"] = _resolve_local(raw["data"]["validation"], file.parent)
    pairs = _normalize_overrides(overrides)
    try:
        for key, value in pairs:
            _apply_override(raw, key, value, label)
        recipe = _validate(raw, label)
    except RecipeError as e:
        raise _blame_override(e, label, pairs) from None
    object.__setattr__(recipe, "path", str(file))
    object.__setattr__(recipe, "overridden", tuple(k for k, _ in pairs))
    return recipe


def _blame_override(e: RecipeError, label: str, pairs: list[tuple[str, Any]]) -> RecipeError:
    """An error about a key that a ``--set KEY=VALUE`` gave names that, not the recipe file (whose
    text the user would search in vain), with the key it most likely meant."""
    import difflib
    import json
    import re

    msg = str(e)
    rest = msg[len(label) + 2:] if msg.startswith(f"{label}: ") else msg
    bad = rest[len("override "):] if rest.startswith("override ") else rest
    bad = bad.split(":", 1)[0]
    for key, value in pairs:
        if bad == key or bad.startswith(key + ".") or key.startswith(bad + "."):
            hint = ""
            valid = re.search(r"\(valid keys: ([^)]*)\)", rest)
            if valid:
                leaf = key.rsplit(".", 1)[-1]
                match = difflib.get_close_matches(leaf, [k.strip() for k in valid.group(1).split(",")], n=1)
                hint = f" (did you mean {key.rsplit('.', 1)[0] + '.' if '.' in key else ''}{match[0]}?)" if match else ""
            shown = value if isinstance(value, str) else json.dumps(value)
            return RecipeError(f"command line: --set {key}={shown}: {rest}{hint}")
    return e


def load_recipe(
    path_or_name: str | os.PathLike,
    overrides: dict[str, Any] | list[str] | None = None,
) -> Recipe:
    """Load, expand and validate a recipe.

    ``path_or_name``: a YAML path, or a bare name resolved to ``recipes/<name>.yaml`` in the repo.
    ``overrides``: dotted keys, ``{"train.learning_rate": 2e-4}`` or ``["train.learning_rate=2e-4"]``.
    Raises `RecipeError` (naming the file and the dotted key) on unknown keys or wrong types.
    """
    file = resolve_recipe_path(path_or_name)
    return _load_raw(_read_yaml(file), file, overrides)


def recipe_from_dict(
    data: dict[str, Any],
    overrides: dict[str, Any] | list[str] | None = None,
    *,
    base_dir: str | os.PathLike | None = None,
    source: str = "<dict>",
) -> Recipe:
    """Validate a recipe given as a dict (e.g. a saved ``Recipe.to_dict()`` or one built in code).

    Relative paths and references resolve against ``base_dir`` (default: cwd); ``source`` names the
    origin in error messages. The result's ``path`` is None.
    """
    if not isinstance(data, dict):
        raise RecipeError(f"{source}: a recipe must be a mapping, got {type(data).__name__}")
    base = Path(base_dir) if base_dir is not None else Path.cwd()
    pseudo = base / source
    recipe = _load_raw(dict(data), pseudo, overrides, label=source)
    object.__setattr__(recipe, "path", None)
    return recipe


def list_recipes() -> list[str]:
    """Names of the recipes shipped in ``recipes/``."""
    return sorted(p.stem for p in REPO_RECIPES_DIR.glob("*.yaml"))
