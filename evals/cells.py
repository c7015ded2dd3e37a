"""Eval cells: one (model/adapter, task) result, keyed by a hash of everything that produced it.

An interrupted ``qtulu eval`` resumes where it stopped: a cell whose ``metrics.json`` carries the
key the current run would produce is read back instead of recomputed; any other is recomputed.
The key covers:

- the model: the base's identity (`qtulu.model.load.base_info`: weights SHA-256, quantization, prequantized
  format), its compute dtype, and for an adapter label the SHA-256 of that adapter's LoRA tensors as
  loaded plus its peft config (so a retrained adapter under the same name is not mistaken);
- the task: name, version, resolved options (profile included), ``limit``;
- how it ran: chat format, batch size (sampling is seeded per batch), max length, and what scoring
  used (judge endpoint and model, toxicity classifier, code execution allowed);
- the data: SHA-256 of the files under the task's data folder (of the files its options name, for a
  task with ``data_files``, such as reply_loss: those options are keyed by content, not path);
- the code: SHA-256 of the task module, its helpers, ``evals/lm.py`` and ``evals/metrics.py``.

Layout: ``OUT/<label>/<task>/{predictions.jsonl, metrics.json}``; ``metrics.json`` is written last
(atomically) with ``"cell": {"key": ..., ...}``, so a cell is complete exactly when its metrics
carry the key. ``cache_dir`` (optional) adds a content-addressed store, ``CACHE/<key>/``, shared by
runs with other output folders (a study re-evaluating the same adapter on the same task).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

_EVALS = Path(__file__).resolve().parent
CODE_FILES = ("lm.py", "metrics.py", "tasks/_common.py")


def _sha256_bytes(*chunks: bytes) -> str:
    h = hashlib.sha256()
    for c in chunks:
        h.update(hashlib.sha256(c).digest())
    return h.hexdigest()


def files_sha256(root: Path) -> str:
    """SHA-256 over the relative names and bytes of every file under ``root`` (or of ``root`` itself)."""
    h = hashlib.sha256()
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    for p in files:
        h.update(str(p.relative_to(root) if p != root else p.name).encode())
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
    return h.hexdigest()


def _module_files(name: str) -> list[Path]:
    """A module's source file, or every .py file of a package (found without importing it)."""
    import importlib.util

    origin = Path(importlib.util.find_spec(name).origin)
    return sorted(origin.parent.rglob("*.py")) if origin.name == "__init__.py" else [origin]


def code_sha256(task) -> str:
    """The code that turns a model into this task's predictions and scores (with the qtulu modules
    a task names in ``CODE_MODULES``, e.g. the data pipeline that renders reply_loss's rows)."""
    paths = [Path(task.module.__file__)] + [_EVALS / name for name in CODE_FILES]
    paths += [p for name in getattr(task.module, "CODE_MODULES", ()) for p in _module_files(name)]
    return _sha256_bytes(*[p.read_bytes() for p in paths if p.is_file()])


def task_data_files(task, data_dir) -> dict[str, Path] | None:
    """The files a task module names through its options (``data_files``, e.g. reply_loss's source
    file), or None for a task that reads its whole ``DATA_SUBDIR``."""
    fn = getattr(task.module, "data_files", None)
    return None if fn is None else fn(data_dir, **task.opts)


def keyed_options(task) -> dict:
    """The task's options as a key holds them: an option naming a file (the module's
    ``FILE_OPTIONS``) is keyed by the file's contents (`data_sha256`), not by how its path is spelt."""
    skip = set(getattr(task.module, "FILE_OPTIONS", ()))
    return _canonical({k: v for k, v in task.opts.items() if k not in skip})


def data_sha256(task, data_dir) -> str | dict | None:
    files = task_data_files(task, data_dir)
    if files is not None:
        return {k: files_sha256(p) if p.exists() else None for k, p in files.items()}
    root = Path(data_dir) / getattr(task.module, "DATA_SUBDIR", "")
    return files_sha256(root) if root.exists() else None


def model_identity(model, label: str | None) -> dict[str, Any]:
    """What a cell's predictions depend on in ``model`` under ``label`` (an adapter, "base" or None)."""
    from qtulu.adapters.store import BASE_NAME, compute_dtype_of
    from qtulu.model.load import base_info

    info = base_info(model)
    ident: dict[str, Any] = {
        "base": {k: info.get(k) for k in ("weights_sha256", "quantization", "prequantized")},
        "compute_dtype": compute_dtype_of(model),
        "adapter": None,
    }
    if label not in (None, BASE_NAME) and label in (getattr(model, "peft_config", None) or {}):
        import torch
        from peft.utils import get_peft_model_state_dict

        state = get_peft_model_state_dict(model, adapter_name=label)
        h = hashlib.sha256()
        for key in sorted(state):
            t = state[key].detach().to("cpu").contiguous()
            h.update(key.encode())
            h.update(str(t.dtype).encode() + str(tuple(t.shape)).encode())
            h.update(t.view(-1).view(torch.uint8).numpy().tobytes())
        config = model.peft_config[label].to_dict()
        for where in ("base_model_name_or_path", "revision"):  # where it was loaded from: the base identity covers it
            config.pop(where, None)
        ident["adapter"] = {"weights_sha256": h.hexdigest(), "config": _canonical(config)}
    return ident


def _canonical(obj):
    """JSON-able and stable across processes: sets sorted (their order follows hash randomization)."""
    if isinstance(obj, dict):
        return {str(k): _canonical(v) for k, v in obj.items()}
    if isinstance(obj, (set, frozenset)):
        return sorted((_canonical(v) for v in obj), key=lambda v: json.dumps(v, sort_keys=True, default=str))
    if isinstance(obj, (list, tuple)):
        return [_canonical(v) for v in obj]
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return str(obj)


def cell_key(identity: dict, task, *, data_dir, limit, chat_format, batch_size, max_length,
             scoring: dict | None = None) -> tuple[str, dict]:
    """``(sha256, the dict hashed)`` for one cell. ``scoring``: what scores depend on beyond the
    predictions (the judge's endpoint and model, the toxicity classifier, code execution allowed)."""
    what = {
        "model": identity,
        "task": {"name": task.name, "version": task.version, "options": keyed_options(task), "limit": limit},
        "run": {"chat_format": chat_format, "batch_size": batch_size, "max_length": max_length,
                "scoring": _canonical(scoring or {})},
        "data": data_sha256(task, data_dir),
        "code": code_sha256(task),
    }
    text = json.dumps(what, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest(), what


def load_cell(cell_dir: Path, key: str, cache_dir: Path | None = None) -> dict | None:
    """The metrics of a complete cell with ``key`` (from ``cell_dir``, else the cache copied in), or None."""
    found = _complete(cell_dir, key)
    if found is not None:
        return found
    if cache_dir is not None:
        cached = Path(cache_dir) / key
        metrics = _complete(cached, key)
        if metrics is not None:
            _copy_cell(cached, cell_dir)
            return metrics
    return None


def _complete(cell_dir: Path, key: str) -> dict | None:
    try:
        metrics = json.loads((cell_dir / "metrics.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(metrics, dict) or (metrics.get("cell") or {}).get("key") != key:
        return None
    if not (cell_dir / "predictions.jsonl").is_file():
        return None
    return metrics


def seal_cell(cell_dir: Path, key: str, what: dict, metrics: dict, cache_dir: Path | None = None) -> dict:
    """Mark a cell complete: ``metrics.json`` rewritten (atomically, last) with its key; copied to the cache."""
    from qtulu.files import write_json

    metrics = {**metrics, "cell": {"key": key, "model": what["model"], "data_sha256": what["data"],
                                   "code_sha256": what["code"]}}
    write_json(cell_dir / "metrics.json", metrics)
    if cache_dir is not None:
        _copy_cell(cell_dir, Path(cache_dir) / key)
    return metrics


def _copy_cell(src: Path, dst: Path) -> None:
    """Copy a cell's two files to ``dst`` through a staging folder (metrics last, renamed into place)."""
    stage = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir(parents=True)
    for name in ("predictions.jsonl", "metrics.json"):
        shutil.copy2(src / name, stage / name)
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.exists():
        shutil.rmtree(dst)
    os.replace(stage, dst)


# ---- a whole `qtulu eval` request read back without loading anything

REQUEST = "request.json"


def stat_identity(path) -> list | None:
    """A local file or folder as its resolved path and each file's (name, size, mtime_ns); None when
    ``path`` is not local (a hub id). Cheap on any model size: no byte is read. Only the request
    key uses it (a shortcut that skips loading the base); each cell's own key still names the
    weights' SHA-256 whenever a model is loaded."""
    p = Path(os.path.expanduser(str(path)))
    if not p.exists():
        return None
    files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file()
                                           and not any(x.startswith(".") for x in f.relative_to(p).parts))
    return [str(p.resolve()), [[str(f.relative_to(p)) if f != p else f.name, f.stat().st_size, f.stat().st_mtime_ns]
                               for f in files]]


def request_key(request: dict) -> str:
    return hashlib.sha256(json.dumps(_canonical(request), sort_keys=True, default=str).encode()).hexdigest()


def record_request(out_dir, key: str, results: dict) -> None:
    """After a complete run: ``OUT/request.json`` names the request's key and each cell's key."""
    from qtulu.files import write_json

    cells = {label: {task: (m.get("cell") or {}).get("key") for task, m in row.items()}
             for label, row in results["results"].items()}
    write_json(Path(out_dir) / REQUEST, {"key": key, "cells": cells})


def read_back(out_dir, key: str) -> dict | None:
    """``{label: {task: metrics}}`` when ``OUT`` holds a complete run of the request ``key``: its
    record matches and every cell it names is still complete with its key; None otherwise (then
    the model is loaded and `evals.runner.evaluate` checks each cell by its full key)."""
    out = Path(out_dir)
    try:
        record = json.loads((out / REQUEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("key") != key or not isinstance(record.get("cells"), dict):
        return None
    if not all((out / name).is_file() for name in ("results.json", "results.md")):
        return None
    results: dict = {}
    for label, row in record["cells"].items():
        for task, cell in (row or {}).items():
            metrics = _complete(out / label / task, cell) if isinstance(cell, str) else None
            if metrics is None:
                return None
            results.setdefault(label, {})[task] = metrics
    return results or None
