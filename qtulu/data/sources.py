"""Load the rows of a source: a local json / jsonl / tsv / parquet / arrow file (or a folder / glob of
them), a ``datasets`` ``save_to_disk`` folder, or a Hugging Face hub dataset. A .tsv row is the list
of its line's tab-separated fields (FLAN's raw CoT files); the converter names them.

Local JSON is read here rather than with ``datasets.load_dataset("json")`` because the build must
report malformed rows one by one (``file:line`` and a reason) and, under ``on_bad_row: skip``,
keep the good ones; the datasets JSON loader fails the whole file on the first broken line or
invalid byte. Parquet and hub sets are typed columnar data, read by pyarrow / datasets; a
``save_to_disk`` folder (``state.json`` + ``dataset_info.json``, or ``dataset_dict.json`` with one
folder per split) by ``datasets.load_from_disk`` and a lone ``.arrow`` file by ``Dataset.from_file``.
A file that cannot be read (corrupt parquet or arrow) is a `DataError` naming it.

Every file is hashed (sha256 of its bytes) for the manifest.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from qtulu.data.errors import BadRow, DataError
from qtulu.recipes import SourceSpec

LOCAL_SUFFIXES = (".json", ".jsonl", ".tsv", ".parquet", ".arrow")


@dataclass
class LoadedSource:
    """Rows of one source as ``(where, row | BadRow)`` plus what identifies the input for the manifest."""

    rows: list[tuple[str, Any]]
    inputs: dict[str, Any] = field(default_factory=dict)


def _sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


_KINDS = "/".join(LOCAL_SUFFIXES)


def is_saved_dataset(p: Path) -> bool:
    """A folder written by ``Dataset.save_to_disk`` or ``DatasetDict.save_to_disk``."""
    return p.is_dir() and ((p / "state.json").is_file() and (p / "dataset_info.json").is_file()
                           or (p / "dataset_dict.json").is_file())


def local_files(path: str, source: str = "") -> list[Path]:
    """The data files a ``path`` names: a file, a folder (its data files, sorted; or itself when it
    is a ``save_to_disk`` folder) or a glob."""
    from qtulu.files import check_input_tree

    label = f"source {source!r}: " if source else ""
    return [check_input_tree(f, f"{label}data file") for f in _local_files(path, label, source)]


def _local_files(path: str, label: str, source: str) -> list[Path]:
    if any(c in path for c in "*?["):
        files = sorted(Path(p) for p in glob.glob(path) if p.endswith(LOCAL_SUFFIXES))
        if not files:
            raise DataError(f"{label}no {_KINDS} file matches {path}")
        return files
    p = Path(path)
    if is_saved_dataset(p):
        return [p]
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.is_file() and f.name.endswith(LOCAL_SUFFIXES))
        if not files:
            raise DataError(f"{label}{p}: a folder with no {_KINDS} file and not a `datasets` save_to_disk folder "
                            "(no state.json + dataset_info.json, no dataset_dict.json)")
        return files
    if not p.exists():
        raise DataError(f"{label}file not found: {p} (override the path: -o sources.{source or 'NAME'}.path=...)")
    if not p.name.endswith(LOCAL_SUFFIXES):
        raise DataError(f"{label}{p}: unsupported file type (expected {', '.join(LOCAL_SUFFIXES)})")
    return [p]


def _text_lines(path: Path, data: bytes, *, blank: bool) -> Iterator[tuple[str, Any]]:
    """``(file:line, text | BadRow)``: lines as a text-line reader splits them (a final newline ends
    the last line), blank ones only when ``blank``; an undecodable line as `BadRow` (``invalid_utf8``)."""
    lines = data.split(b"\n")
    if lines[-1] == b"":
        lines.pop()
    for lineno, raw in enumerate(lines, 1):
        if not blank and not raw.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            yield where, raw.decode("utf-8")
        except UnicodeDecodeError as e:
            yield where, BadRow("invalid_utf8", f"byte {e.start}: {e.reason}", where)


def read_jsonl(path: Path, data: bytes) -> Iterator[tuple[str, Any]]:
    """``(file:line, row)`` for each non-blank line; broken JSON / invalid UTF-8 lines as `BadRow`."""
    for where, text in _text_lines(path, data, blank=False):
        if isinstance(text, BadRow):
            yield where, text
            continue
        try:
            yield where, json.loads(text)
        except json.JSONDecodeError as e:
            yield where, BadRow("broken_json", f"column {e.colno}: {e.msg}", where)


def read_tsv(path: Path, data: bytes) -> Iterator[tuple[str, Any]]:
    """``(file:line, [field, ...])`` for every line, blank ones too (a line's position can matter: FLAN
    templates its CoT rows by it); a ``\\r`` before the newline is not part of the line."""
    for where, text in _text_lines(path, data, blank=True):
        yield where, text if isinstance(text, BadRow) else text.removesuffix("\r").split("\t")


def read_json(path: Path, data: bytes) -> Iterator[tuple[str, Any]]:
    """A .json file holding a list of rows (``file[index]``) or one object (one row, e.g. a SuperNI task).

    Broken JSON stops the load (no row can be trusted after it); undecodable bytes are kept as
    lone surrogates so that only the rows holding them are reported (``invalid_utf8``) later.
    """
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        text = data.decode("utf-8", errors="surrogateescape")
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}:{e.colno}: broken JSON: {e.msg} (a .json file cannot be read past this; "
                        "fix it or convert it to .jsonl to skip bad lines)") from None
    if isinstance(obj, list):
        for i, row in enumerate(obj):
            yield f"{path}[{i}]", row
    elif isinstance(obj, dict):
        yield str(path), obj
    else:
        raise DataError(f"{path}: expected a JSON list of rows or one object, got {type(obj).__name__}")


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def read_parquet(path: Path) -> Iterator[tuple[str, Any]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError, ValueError) as e:
        raise DataError(f"{path}: not a readable parquet file ({_one_line(e)})") from None
    for i, row in enumerate(table.to_pylist()):
        yield f"{path}[{i}]", row


def read_arrow(path: Path, split: str = "train") -> Iterator[tuple[str, Any]]:
    """Rows of a ``save_to_disk`` folder (``datasets.load_from_disk``; a DatasetDict's ``split``) or
    of one ``.arrow`` file written by ``datasets`` (``Dataset.from_file``)."""
    import datasets
    import pyarrow as pa

    try:
        if path.is_dir():
            ds = datasets.load_from_disk(str(path))
            if isinstance(ds, datasets.DatasetDict):
                if split not in ds:
                    raise DataError(f"{path}: no split {split!r} in this saved DatasetDict (splits: {', '.join(ds)})")
                ds = ds[split]
        else:
            ds = datasets.Dataset.from_file(str(path))
    except DataError:
        raise
    except (pa.ArrowException, OSError, ValueError, KeyError, TypeError) as e:
        raise DataError(f"{path}: not a readable `datasets` arrow {'folder' if path.is_dir() else 'file'} ({_one_line(e)})") from None
    for i, row in enumerate(ds):
        yield f"{path}[{i}]", row


def _hash_path(p: Path) -> str:
    if p.is_file():
        return file_sha256(p)
    h = hashlib.sha256()  # a save_to_disk folder: its files' names and hashes
    for f in sorted(q for q in p.rglob("*") if q.is_file()):
        h.update(f"{f.relative_to(p)}\0{file_sha256(f)}\n".encode())
    return h.hexdigest()


def load_source(spec: SourceSpec, files: list[Path] | None = None) -> LoadedSource:
    """Read every row of ``spec`` (local ``path`` wins over ``hub_id``); ``files``: the files to read
    instead of those ``spec.path`` names (e.g. the SuperNI train tasks of a repository root)."""
    if spec.path:
        rows: list[tuple[str, Any]] = []
        hashes = {}
        for f in files if files is not None else local_files(spec.path, spec.name):
            if f.suffix in (".parquet", ".arrow") or f.is_dir():
                hashes[str(f)] = _hash_path(f)
                rows.extend(read_parquet(f) if f.suffix == ".parquet" else read_arrow(f, spec.split))
                continue
            data = f.read_bytes()
            hashes[str(f)] = _sha256_bytes(data)
            read = {".jsonl": read_jsonl, ".tsv": read_tsv}.get(f.suffix, read_json)
            rows.extend(read(f, data))
        return LoadedSource(rows, {"path": spec.path, "files": hashes})
    if spec.hub_id:
        return _load_hub(spec)
    raise DataError(f"source {spec.name!r}: needs a path or a hub_id")


def _load_hub(spec: SourceSpec) -> LoadedSource:
    import datasets

    from qtulu.hub import cache_only, offline_reason, unreachable

    offline = offline_reason()  # offline: the hub cache only, and a miss fails at once (no retries)
    try:
        with cache_only(offline is not None):
            ds = datasets.load_dataset(spec.hub_id, spec.hub_config, split=spec.split)
    except Exception as e:  # surfaced with the source named; the datasets message says why
        if offline:
            raise unreachable(f"source {spec.name!r}: hub dataset {spec.hub_id!r}", offline) from e
        raise DataError(f"source {spec.name!r}: cannot load hub dataset {spec.hub_id!r}"
                        f"{f' ({spec.hub_config})' if spec.hub_config else ''} split {spec.split!r}: {e}") from e
    rows = [(f"{spec.hub_id}[{i}]", row) for i, row in enumerate(ds)]
    return LoadedSource(rows, {"hub_id": spec.hub_id, "config": spec.hub_config, "split": spec.split,
                               "fingerprint": getattr(ds, "_fingerprint", None)})


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
