"""The adapter directory's on-disk basics: file names, the error class, hashing, atomic file
helpers and ``qtulu.json`` parsing. `qtulu.adapters.store` (save, verify, load) and `qtulu.adapters.swap` build
on it; it imports nothing of theirs.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from qtulu.errors import AdapterError  # noqa: F401 - part of the adapter format API

FORMAT_VERSION = 1
META_NAME = "qtulu.json"
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
BASE_NAME = "base"  # in adapter_names: this row runs with adapters disabled (peft's "__base__")




AUTO = "auto"  # load_model(quantize=AUTO): the base precision the adapters trained against


# --------------------------------------------------------------------------------------------
# hashing and small file helpers


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            block = f.read(chunk)
            if not block:
                break
            h.update(block)
    return h.hexdigest()


def _json_default(obj: Any):
    # recipes/manifests may carry Paths, tuples, sets or numpy scalars: make them JSON-able
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if isinstance(obj, (set, frozenset)):
        return sorted(obj)
    if hasattr(obj, "item"):
        return obj.item()
    if hasattr(obj, "to_dict"):
        return obj.to_dict()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True, default=_json_default) + "\n")


def _safetensors_layout(path: Path) -> dict[str, dict[str, Any]]:
    """{key: {"shape", "dtype"}} read from a safetensors header (no tensor data loaded)."""
    from safetensors import safe_open

    out: dict[str, dict[str, Any]] = {}
    # "numpy": only the header is read, and "pt" would import torch (5 s) in checks meant to run
    # before it (a re-run of a finished `qtulu eval` loads nothing)
    with safe_open(str(path), framework="numpy") as f:
        for key in f.keys():
            sl = f.get_slice(key)
            out[key] = {"shape": list(sl.get_shape()), "dtype": str(sl.get_dtype())}
    return out


def read_meta(adapter_dir: str | os.PathLike) -> dict:
    """The parsed ``qtulu.json`` of an adapter dir (no checks beyond JSON validity)."""
    path = Path(adapter_dir) / META_NAME
    if not path.is_file():
        raise AdapterError(f"{path}: missing (not a qtulu adapter dir, or saved by plain peft)")
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(meta, dict) or "files" not in meta:
        raise AdapterError(f"{path}: not a qtulu adapter manifest (no 'files' key)")
    return meta


def recorded_compute_dtype(meta: dict) -> str | None:
    """The compute dtype an adapter was trained with (qtulu.json, else its recipe), or None."""
    return meta.get("compute_dtype") or ((meta.get("recipe") or {}).get("model") or {}).get("compute_dtype")
