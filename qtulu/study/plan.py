"""The cells of a study and their keys, computed from files alone (no model, no torch).

Cells, in the order they run::

    base                  the demo's tiny base, built in-process (only with base.demo)
    data/NAME             a recipe's packed training data (tokenizer only: every row checked before any model load)
    train/NAME            a recipe's adapter
    eval/LABEL/TASK       one score: a row (base, an adapter, the merge) on a task
    merge                 the merge search (its winner is the row merge_search.name)

A cell's key is the SHA-256 of what produced it:

- base: the demo base settings, the code that builds it (qtulu/demo/run.py, tiny.py, synthetic.py) and
  the torch and transformers versions;
- the base identity every other key uses: the SHA-256 of the base folder's files (config, weights,
  tokenizer) and how it is loaded (quantization, block size, compute dtype, attention);
- data: the recipe's ``data`` block, its sources (a local file by its content, a hub dataset by
  id, config and split), the tokenizer (the base's files, or data.tokenizer's);
- train: the whole resolved recipe (paths replaced by contents), its data key and the base identity.
  Library and qtulu code versions are recorded, not keyed: a code change does not retrain (delete
  OUT/runs/NAME to retrain one);
- eval: what `qtulu.evals.cells` keys an eval cell on (model, task version and options, limit,
  chat format, batch size, max length, scoring, the task's data files and code), with the model
  named by the base identity and the adapter (its weights file and its peft config, see `adapter_sha`);
- merge: the input adapters' files, the base identity, the search settings and its tasks' keys,
  and the merge code (qtulu/adapters/merge.py, evals/merge_search.py).

Keys hold no absolute path: a study folder moved or copied elsewhere is still complete.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

from qtulu.study.load import BASE_ROW, Column, LoadedStudy, Row
from qtulu.study.store import Hasher, Records, digest

ADAPTER_FILES = ["adapter_model.safetensors", "adapter_config.json"]
BASE_PATTERNS = (".json", ".safetensors", ".model", ".txt", ".tiktoken")  # what load_base reads (model._HF_FILE_PATTERNS)


def _versions(*names: str) -> dict[str, str | None]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for n in names:
        try:
            out[n] = version(n)
        except PackageNotFoundError:
            out[n] = None
    return out


def _code(*paths: Path) -> str:
    import hashlib

    return digest([[p.name, hashlib.sha256(p.read_bytes()).hexdigest()] for p in paths])


class Plan:
    """Keys and completeness of every cell of ``study`` in its output folder."""

    def __init__(self, study: LoadedStudy, hasher: Hasher | None = None, records: Records | None = None):
        self.study = study
        self.out = study.out
        self.hasher = hasher or Hasher(study.out)
        self.records = records or Records(study.out)
        self._base_id: dict | None = None

    # ---- names and folders

    def run_dir(self, row: Row) -> Path:
        return self.out / "runs" / row.name

    def adapter_dir(self, label: str) -> Path:
        if self.study.merge and label == self.study.merge.name:
            return self.out / "merge" / "best"
        return self.out / "runs" / label / "adapter"

    def eval_dir(self) -> Path:
        return self.out / "eval"

    def cells(self) -> list[str]:
        """Every cell of the study, in the order they run."""
        s = self.study
        out = ["base"] if s.base.demo is not None else []
        out += [f"data/{r.name}" for r in s.rows] + [f"train/{r.name}" for r in s.rows]
        labels = s.labels
        if s.merge:
            labels = [x for x in labels if x != s.merge.name]
        out += [f"eval/{lab}/{c.name}" for lab in labels for c in s.columns]
        if s.merge:
            out += ["merge"] + [f"eval/{s.merge.name}/{c.name}" for c in s.columns]
        return out

    # ---- the base

    def base_key(self) -> str:
        d = self.study.base.demo
        return digest({"demo": asdict(d), "code": _code(*map(_module_file, ("qtulu.demo.run", "qtulu.model.tiny", "qtulu.demo.synthetic"))),
                       "versions": _versions("torch", "transformers")})

    def base_dir(self) -> Path | None:
        """The base's local folder (None: a hub id not in the local cache yet)."""
        s = self.study
        if s.base.demo is not None:
            return self.out / "base"
        p = Path(s.base_path)
        if p.is_dir():
            return p
        if p.is_file() and p.suffix.lower() == ".gguf":
            from qtulu.model.gguf import materialize  # its dequantized folder, converted once

            return materialize(p)[0]
        return None if p.is_absolute() else _hub_cached(s.base_path, s.base.revision)

    def base_complete(self) -> bool:
        if self.study.base.demo is None:
            return True
        rec = self.records.matching("base", self.base_key())
        d = self.out / "base"
        return bool(rec and d.is_dir() and self._base_files_sha(d) == rec["result"].get("base_sha256"))

    def _base_files_sha(self, d: Path) -> str:
        names = sorted(p.name for p in d.iterdir() if p.is_file() and p.name.endswith(BASE_PATTERNS)
                       and not p.name.startswith("."))
        return self.hasher.tree(d, names)

    def base_identity(self) -> dict:
        """The base as every other key names it: its files' SHA-256 and how it is loaded."""
        if self._base_id is None:
            d = self.base_dir()
            if d is None:
                raise RuntimeError("the base is not local yet")
            b = self.study.base
            self._base_id = {"files_sha256": self._base_files_sha(d),
                             "load": {"quantize": b.quantize, "double_quant": b.double_quant, "blocksize": b.blocksize,
                                      "compute_dtype": b.compute_dtype, "attn_implementation": b.attn_implementation}}
        return self._base_id

    def forget_base(self) -> None:
        self._base_id = None

    # ---- data and train

    def _sources(self, row: Row) -> list[dict]:
        from qtulu.data.sources import local_files

        out = []
        for s in row.recipe.sources:
            d = asdict(s)
            if s.path:
                d["path"] = [self.hasher.tree(f) for f in local_files(s.path, s.name)]
            if s.release and Path(s.release).exists():
                d["release"] = self.hasher.tree(Path(s.release))
            out.append(d)
        return out

    def _tokenizer_id(self, row: Row) -> Any:
        tok = row.recipe.data.tokenizer
        if tok is None:
            return {"base": self.base_identity()["files_sha256"]}
        p = Path(tok)
        return self.hasher.tree(p) if p.exists() else tok

    def data_key(self, row: Row) -> str:
        data = asdict(row.recipe.data)
        data["tokenizer"] = self._tokenizer_id(row)
        return digest({"data": data, "sources": self._sources(row)})

    def train_key(self, row: Row) -> str:
        recipe = row.recipe.to_dict()
        recipe["model"]["base"] = None  # named by the base identity
        recipe["data"]["tokenizer"] = None  # named by the data key
        recipe["sources"] = None  # idem
        return digest({"name": row.name, "recipe": recipe, "data": self.data_key(row), "base": self.base_identity()})

    def data_complete(self, row: Row) -> bool:
        rec = self.records.matching(f"data/{row.name}", self.data_key(row))
        return bool(rec and (self.run_dir(row) / "data" / "manifest.json").is_file())

    def adapter_sha(self, label: str) -> str | None:
        """The adapter's identity: its weights file's SHA-256 and its peft config, less where the base
        was loaded from (a path) and with set-valued lists sorted (peft writes target_modules, a set,
        in hash-randomized order): a retrained adapter with the same weights is the same adapter."""
        import json

        d = self.adapter_dir(label)
        if not all((d / n).is_file() for n in ADAPTER_FILES):
            return None
        try:
            config = json.loads((d / "adapter_config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        if not isinstance(config, dict):
            return None
        for where in ("base_model_name_or_path", "revision"):
            config.pop(where, None)
        for k, v in config.items():
            if isinstance(v, list) and all(isinstance(x, str) for x in v):
                config[k] = sorted(v)
        return digest({"weights": self.hasher.file(d / "adapter_model.safetensors"), "config": config})

    def train_complete(self, row: Row) -> bool:
        rec = self.records.matching(f"train/{row.name}", self.train_key(row))
        return bool(rec and self.adapter_sha(row.name) == rec["result"].get("adapter_sha256"))

    # ---- eval

    def scoring(self, col: Column) -> dict:
        """What scores depend on beyond the predictions (as `qtulu.evals.runner.evaluate` keys it)."""
        ev = self.study.eval
        return {"judge": None if col.judge is None else {"url": col.judge.url, "model": col.judge.model},
                "classifier": ev.toxigen_classifier, "allow_code_execution": ev.allow_code_execution}

    def chat_format(self, label: str) -> str | None:
        ev = self.study.eval
        return ev.base_chat_format if label == BASE_ROW else ev.chat_format

    def task_id(self, col: Column, limit: int | None) -> dict:
        """What `qtulu.evals.cells.cell_key` hashes of a task: name, version, options, limit, data, code."""
        from qtulu.evals.cells import code_sha256, keyed_options, task_data_files
        from qtulu.evals.runner import resolve_task

        task = resolve_task(col.task, col.options, self.study.eval.profile)
        files = task_data_files(task, col.data_dir)
        if files is not None:  # a task reading the files its options name (reply_loss): those, by content
            data = {k: self.hasher.tree(p) if p.exists() else None for k, p in files.items()}
        else:
            root = col.data_dir / getattr(task.module, "DATA_SUBDIR", "")
            data = self.hasher.tree(root) if root.exists() else None
        return {"task": {"name": task.name, "version": task.version, "options": keyed_options(task), "limit": limit},
                "data": data, "code": code_sha256(task)}

    def eval_key(self, label: str, col: Column, adapter_sha: str | None) -> str:
        ev = self.study.eval
        return digest({"model": {"base": self.base_identity(), "adapter": adapter_sha},
                       **self.task_id(col, self.study.limit),
                       "run": {"chat_format": self.chat_format(label), "batch_size": ev.batch_size,
                               "max_length": ev.max_length, "scoring": self.scoring(col)}})

    def eval_cell_key(self, label: str, col: Column) -> str | None:
        """None when the row's adapter does not exist yet."""
        sha = None
        if label != BASE_ROW:
            sha = self.adapter_sha(label)
            if sha is None:
                return None
        return self.eval_key(label, col, sha)

    def eval_complete(self, label: str, col: Column) -> dict | None:
        """The eval cell's metrics when it is complete (record key and the metrics' own cell key agree)."""
        import json

        rec = self.records.matching(f"eval/{label}/{col.name}", self.eval_cell_key(label, col))
        if rec is None:
            return None
        cell = self.eval_dir() / label / col.name
        try:
            metrics = json.loads((cell / "metrics.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        if (metrics.get("cell") or {}).get("key") != rec["result"].get("eval_key") or \
                not (cell / "predictions.jsonl").is_file():
            return None
        return metrics

    # ---- merge

    def merge_key(self) -> str | None:
        m = self.study.merge
        shas = [self.adapter_sha(a) for a in m.adapters]
        if any(s is None for s in shas):
            return None
        cols = {c.name: c for c in self.study.columns}
        spec = asdict(m.spec)
        spec.pop("name")
        ev = self.study.eval
        return digest({"adapters": list(zip(m.adapters, shas)), "base": self.base_identity(), "spec": spec,
                       "tasks": [self.task_id(cols[t], m.spec.limit) for t in m.tasks],
                       "run": {"chat_format": ev.chat_format, "batch_size": ev.batch_size,
                               "scoring": [self.scoring(cols[t]) for t in m.tasks]},
                       "code": _code(_module_file("qtulu.adapters.merge"), _module_file("qtulu.evals.merge_search"))})

    def merge_complete(self) -> bool:
        rec = self.records.matching("merge", self.merge_key())
        return bool(rec and self.adapter_sha(self.study.merge.name) == rec["result"].get("adapter_sha256"))

    # ---- all of it

    def status(self) -> dict[str, bool]:
        """``{cell: complete}`` for every cell, from the files (a later cell of a missing one is missing)."""
        s = self.study
        done: dict[str, bool] = {}
        if s.base.demo is not None:
            done["base"] = self.base_complete()
        base_ready = done.get("base", True) and self.base_dir() is not None
        for r in s.rows:
            t = base_ready and self.train_complete(r)
            done[f"train/{r.name}"] = t
            done[f"data/{r.name}"] = t or (base_ready and self.data_complete(r))
        labels = [lab for lab in s.labels if not (s.merge and lab == s.merge.name)]
        for lab in labels:
            for c in s.columns:
                done[f"eval/{lab}/{c.name}"] = base_ready and (lab == BASE_ROW or done[f"train/{lab}"]) and \
                    self.eval_complete(lab, c) is not None
        if s.merge:
            m = base_ready and all(done[f"train/{a}"] for a in s.merge.adapters) and self.merge_complete()
            done["merge"] = m
            for c in s.columns:
                done[f"eval/{s.merge.name}/{c.name}"] = m and self.eval_complete(s.merge.name, c) is not None
        return {c: done[c] for c in self.cells()}


def _module_file(name: str) -> Path:
    """A module's source file, without importing it (its imports may be heavy)."""
    import importlib.util

    return Path(importlib.util.find_spec(name).origin)


def _hub_cached(repo_id: str, revision: str | None) -> Path | None:
    """The local snapshot of a hub model, if the cache holds one (no network)."""
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=[f"*{x}" for x in BASE_PATTERNS],
                                      local_files_only=True))
    except Exception:  # noqa: BLE001 - not cached (or not a hub id): the run resolves it, naming the problem
        return None
