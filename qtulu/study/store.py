"""What a study folder remembers: cell records, a log of what ran, and content hashes.

Layout (``OUT`` = ``qtulu study --out``)::

    OUT/cells/base.json                  the demo base (when built in-process)
    OUT/cells/data/NAME.json             a recipe's packed data (OUT/runs/NAME/data, removed once trained on)
    OUT/cells/train/NAME.json            a recipe's adapter (OUT/runs/NAME/adapter)
    OUT/cells/eval/LABEL/TASK.json       one (row, task) score (OUT/eval/LABEL/TASK/metrics.json)
    OUT/cells/merge.json                 the merge search (OUT/merge/best: the chosen merge)
    OUT/log.jsonl                        one line per cell run or reused, per study start and end
    OUT/.qtulu-study/hashes.json         SHA-256 of files by (path, size, mtime): a finished study
                                         re-run hashes nothing twice

A record is ``{"key": ..., "what": {...}, "result": {...}, "seconds": ..., "finished": ..., "pid": ...}``,
written atomically once its cell's outputs are complete, so a cell is complete exactly when its record
carries the key the current study computes for it (and its outputs still hash as recorded).

Order of writes, so that a kill between any two leaves a consistent store: a cell's outputs, then
its record (the commit point), then its "done" log line. A run killed between the last two leaves a
record whose "done" line is missing; the next run's :meth:`Records.recover` appends it from the
record (same pid, key and seconds, ``"recovered": true``) before it starts. A line torn by a kill
mid-append is skipped by :func:`read_log` and never glued to the next line.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

from qtulu.files import atomic_write_text

MEMO = ".qtulu-study/hashes.json"


def digest(obj: Any) -> str:
    """SHA-256 of ``obj`` as canonical JSON."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def write_json_atomic(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, default=str))


class Hasher:
    """SHA-256 of files and folders, remembered by (resolved path, size, mtime_ns) in ``OUT/MEMO``.

    A changed file (size or mtime) is hashed again; a moved or copied study folder re-hashes its
    files once and finds the same contents, hence the same keys.
    """

    def __init__(self, out: Path):
        self.path = out / MEMO
        try:
            self.memo: dict[str, list] = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            self.memo = {}
        self.dirty = False

    def file(self, path: Path) -> str:
        real = Path(path).resolve()
        st = real.stat()
        stamp = [st.st_size, st.st_mtime_ns]
        hit = self.memo.get(str(real))
        if hit and hit[:2] == stamp:
            return hit[2]
        h = hashlib.sha256()
        with open(real, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
        self.memo[str(real)] = [*stamp, h.hexdigest()]
        self.dirty = True
        return h.hexdigest()

    def tree(self, root: Path, names: list[str] | None = None) -> str:
        """Over the relative names and contents of ``root``'s files (hidden ones left out), or of
        ``names`` in it; a file ``root`` is hashed as itself."""
        root = Path(root)
        if root.is_file():
            return self.file(root)
        if names is not None:
            files = [root / n for n in names]
        else:
            files = sorted(p for p in root.rglob("*") if p.is_file()
                           and not any(part.startswith(".") for part in p.relative_to(root).parts))
        return digest([[str(p.relative_to(root)), self.file(p)] for p in files])

    def save(self) -> None:
        if self.dirty:
            write_json_atomic(self.path, self.memo)
            self.dirty = False


class Records:
    """Cell records under ``OUT/cells`` and the log ``OUT/log.jsonl``."""

    def __init__(self, out: Path):
        self.out = out
        self.root = out / "cells"

    def path(self, cell: str) -> Path:
        return self.root / f"{cell}.json"

    def read(self, cell: str) -> dict | None:
        try:
            rec = json.loads(self.path(cell).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return rec if isinstance(rec, dict) else None

    def matching(self, cell: str, key: str | None) -> dict | None:
        """The record of ``cell`` if it carries ``key``."""
        rec = self.read(cell)
        return rec if key is not None and rec is not None and rec.get("key") == key else None

    def write(self, cell: str, key: str, what: dict, result: dict, seconds: float) -> dict:
        rec = {"cell": cell, "key": key, "what": what, "result": result, "seconds": round(seconds, 2),
               "finished": time.strftime("%Y-%m-%dT%H:%M:%S"), "pid": os.getpid()}
        write_json_atomic(self.path(cell), rec)
        return rec

    def recover(self) -> int:
        """Append the "done" line of each record whose run was killed between writing the record and
        logging it (see the module docstring); returns how many were appended."""
        lines = [x for x in read_log(self.out) if x.get("event") == "done"]
        logged = {(x.get("cell"), x.get("key")) for x in lines}
        unkeyed = {x.get("cell") for x in lines if "key" not in x}  # logs written before keys were logged
        n = 0
        for path in sorted(self.root.rglob("*.json")) if self.root.is_dir() else []:
            cell = path.relative_to(self.root).with_suffix("").as_posix()
            rec = self.read(cell)
            if rec is None or (cell, rec.get("key")) in logged or cell in unkeyed:
                continue
            self.log("done", cell, pid=rec.get("pid"), key=rec.get("key"), seconds=rec.get("seconds"),
                     recovered=True)
            n += 1
        return n

    def log(self, event: str, cell: str | None = None, **extra) -> None:
        """Append one line: ``{"t", "pid", "event", "cell", ...}`` (run, done, reused, start, end, ...)."""
        self.out.mkdir(parents=True, exist_ok=True)
        line = {"t": round(time.time(), 3), "pid": os.getpid(), "event": event, **({"cell": cell} if cell else {}),
                **extra}
        data = (json.dumps(line, default=str) + "\n").encode("utf-8")
        from qtulu.files import disk_full_is_one_line

        with disk_full_is_one_line(self.out, "appending to the study log"), open(self.out / "log.jsonl", "a+b") as f:
            if f.seek(0, os.SEEK_END):  # a line torn by a kill mid-append: end it, or this one is lost with it
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":
                    data = b"\n" + data
            f.write(data)
            f.flush()


def read_log(out: Path) -> list[dict]:
    """The lines of ``OUT/log.jsonl`` (a torn last line, from a kill mid-write, is skipped)."""
    rows = []
    try:
        text = (Path(out) / "log.jsonl").read_text(encoding="utf-8")
    except OSError:
        return rows
    for line in text.splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue
    return rows
