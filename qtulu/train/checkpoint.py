"""Training checkpoints that are complete or absent: staged writes, completeness checks, resume checks.

HF Trainer (transformers 5.23) writes ``checkpoint-N/`` in place, file after file: a process killed
mid-write leaves a directory that ``get_last_checkpoint`` happily picks. qtulu's trainer writes
each checkpoint under ``.stage-checkpoint-N/`` in the same directory, adds ``qtulu_checkpoint.json``
(sizes and SHA-256 of every file, the resolved recipe, the data fingerprint), fsyncs, and renames the
directory into place last. ``last_complete_checkpoint`` only returns a directory whose manifest is
present and matches, and clears stale staging directories.

Resuming with a different recipe is refused with the keys that differ (`ResumeMismatch`) unless
forced; keys that only change bookkeeping (logging/saving cadence, report_to) may differ.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Any

from qtulu.errors import QtuluError
from qtulu.files import atomic_write_text, fsync_dir

CHECKPOINT_PREFIX = "checkpoint"
STAGE_PREFIX = ".stage-"
TRASH_PREFIX = ".trash-"
MANIFEST_NAME = "qtulu_checkpoint.json"
_CKPT_RE = re.compile(rf"^{CHECKPOINT_PREFIX}-(\d+)$")

# Recipe keys that may change between a run and its resume: they do not change the math.
RESUME_IGNORED_KEYS = (
    "name",
    "description",
    "train.logging_steps",
    "train.save_steps",
    "train.save_total_limit",
    "train.report_to",
    "train.max_nonfinite_in_a_row",
    "train.eval_steps",  # evaluation reads the weights under no_grad: the training steps stay the same
    "train.keep_best_checkpoint",
)


class CheckpointError(QtuluError, RuntimeError):
    """A checkpoint that cannot be written or used."""


class ResumeMismatch(CheckpointError):
    """Resuming would continue a run under a different recipe/data; ``.keys`` lists what differs."""

    def __init__(self, message: str, keys: list[str]):
        super().__init__(message)
        self.keys = keys


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _fsync_tree(root: Path) -> None:
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(dirpath))


def stage_dir(run_dir: Path, step: int) -> Path:
    """Where checkpoint ``step`` is written before it is renamed to ``checkpoint-<step>``."""
    return Path(run_dir) / f"{STAGE_PREFIX}{CHECKPOINT_PREFIX}-{step}"


def write_manifest(ckpt_dir: Path, payload: dict[str, Any]) -> dict:
    """Add ``qtulu_checkpoint.json`` (file sizes + SHA-256 + ``payload``) to a fully written dir."""
    ckpt_dir = Path(ckpt_dir)
    files = {}
    for p in sorted(ckpt_dir.rglob("*")):
        if p.is_file() and p.name != MANIFEST_NAME:
            rel = p.relative_to(ckpt_dir).as_posix()
            files[rel] = {"size": p.stat().st_size, "sha256": _sha256(p)}
    manifest = {"format_version": 1, **payload, "files": files}
    atomic_write_text(ckpt_dir / MANIFEST_NAME, json.dumps(manifest, indent=1, sort_keys=True, default=str))
    return manifest


def commit(stage: Path, final: Path) -> Path:
    """fsync ``stage`` and rename it to ``final`` (an existing ``final`` is moved away first)."""
    stage, final = Path(stage), Path(final)
    _fsync_tree(stage)
    old = None
    if final.exists():
        old = final.with_name(f"{TRASH_PREFIX}{final.name}-{uuid.uuid4().hex[:8]}")
        os.replace(final, old)
    os.replace(stage, final)
    fsync_dir(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return final


def remove_checkpoint(path: Path) -> None:
    """Delete a checkpoint by renaming it out of the ``checkpoint-*`` namespace first, then rmtree."""
    path = Path(path)
    trash = path.with_name(f"{TRASH_PREFIX}{path.name}-{uuid.uuid4().hex[:8]}")
    os.replace(path, trash)
    fsync_dir(path.parent)
    shutil.rmtree(trash, ignore_errors=True)


def checkpoint_step(path: Path) -> int | None:
    m = _CKPT_RE.match(Path(path).name)
    return int(m.group(1)) if m else None


def list_checkpoints(run_dir: Path) -> list[Path]:
    """``checkpoint-N`` dirs under ``run_dir``, oldest step first (complete or not)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = [p for p in run_dir.iterdir() if p.is_dir() and checkpoint_step(p) is not None]
    return sorted(found, key=checkpoint_step)


def read_manifest(ckpt_dir: Path) -> dict:
    path = Path(ckpt_dir) / MANIFEST_NAME
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{ckpt_dir}: incomplete (no {MANIFEST_NAME}: the write did not finish)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: unreadable ({e})") from None


def check_complete(ckpt_dir: Path, *, hashes: bool = True) -> dict:
    """Return the manifest of a complete checkpoint; raise `CheckpointError` naming what is wrong."""
    ckpt_dir = Path(ckpt_dir)
    manifest = read_manifest(ckpt_dir)
    for rel, meta in manifest.get("files", {}).items():
        p = ckpt_dir / rel
        if not p.is_file():
            raise CheckpointError(f"{ckpt_dir}: file {rel} is missing")
        if p.stat().st_size != meta["size"]:
            raise CheckpointError(f"{ckpt_dir}: file {rel} has {p.stat().st_size} bytes, expected {meta['size']}")
        if hashes and _sha256(p) != meta["sha256"]:
            raise CheckpointError(f"{ckpt_dir}: file {rel} fails its SHA-256 check")
    return manifest


def clean_stale(run_dir: Path) -> list[Path]:
    """Remove leftovers of interrupted writes (staging and trash dirs); returns what was removed."""
    run_dir = Path(run_dir)
    removed = []
    if run_dir.is_dir():
        for p in run_dir.iterdir():
            if p.is_dir() and p.name.startswith((STAGE_PREFIX, TRASH_PREFIX)):
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p)
    return removed


def last_complete_checkpoint(run_dir: Path, *, log=None) -> Path | None:
    """The newest ``checkpoint-N`` under ``run_dir`` that passes `check_complete` (None if none)."""
    for ckpt in reversed(list_checkpoints(run_dir)):
        try:
            check_complete(ckpt)
        except CheckpointError as e:
            if log is not None:
                log(f"skipping {ckpt.name}: {e}")
            continue
        return ckpt
    return None


def rotate(run_dir: Path, keep: int | None, protect: Path | None = None) -> None:
    """Keep the ``keep`` newest checkpoints (None/<=0: keep all); older ones are removed safely.

    ``protect`` (the best checkpoint, ``train.keep_best_checkpoint``) is kept in addition to them.
    """
    if not keep or keep <= 0:
        return
    ckpts = list_checkpoints(run_dir)
    for old in ckpts[: max(0, len(ckpts) - keep)]:
        if protect is not None and old.name == Path(protect).name:
            continue
        remove_checkpoint(old)


def flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    """``{"train": {"seed": 1}}`` -> ``{"train.seed": 1}``; lists of dicts use the item's name or index."""
    out: dict[str, Any] = {}
    if isinstance(d, dict):
        for k, v in d.items():
            out.update(flatten(v, f"{prefix}{k}."))
    elif isinstance(d, list) and d and all(isinstance(x, dict) for x in d):
        for i, v in enumerate(d):
            out.update(flatten(v, f"{prefix}{v.get('name', i)}."))
    else:
        out[prefix[:-1]] = d
    return out


def diff_keys(saved: dict, current: dict, ignored=RESUME_IGNORED_KEYS) -> list[tuple[str, Any, Any]]:
    """``[(dotted_key, saved_value, current_value)]`` for every key that differs (sorted)."""
    a, b = flatten(saved), flatten(current)
    out = []
    for key in sorted(set(a) | set(b)):
        if key in ignored:
            continue
        va, vb = a.get(key, "<absent>"), b.get(key, "<absent>")
        if va != vb:
            out.append((key, va, vb))
    return out


def check_resume(manifest: dict, current: dict, *, where: Path, force: bool = False, warn=None) -> list[str]:
    """Compare a checkpoint's saved run identity with the current one; raise `ResumeMismatch` unless forced.

    ``current`` holds ``recipe`` (``Recipe.to_dict()``) plus run facts that must also match
    (``data_fingerprint``, ``world_size``, ``gradient_accumulation_steps``).
    """
    def view(d: dict) -> dict:
        # recipe keys at the top (train.seed, lora.r, ...), run facts beside them
        out = dict(d.get("recipe") or {})
        out.update({k: d.get(k) for k in current if k != "recipe"})
        return out

    diffs = diff_keys(view(manifest), view(current))
    keys = [k for k, _, _ in diffs]
    if diffs:
        lines = "\n".join(f"  {k}: {a!r} -> {b!r}" for k, a, b in diffs)
        msg = (
            f"cannot resume from {where}: the run differs from the checkpoint in {len(diffs)} key(s):\n{lines}\n"
            "Resume with the original recipe, start a fresh run in another --output-dir, or pass --force "
            "to resume anyway."
        )
        if not force:
            raise ResumeMismatch(msg, keys)
        if warn is not None:
            warn(msg.replace("cannot resume", "resuming anyway (force)"))
    return keys


def interrupted_message(out: Path, steps: list[dict], is_main: bool = True) -> str:
    """What Ctrl-C left behind: the last complete checkpoint (resume point) and the steps so far.

    (``steps.jsonl`` is written as the run goes, by `qtulu.train.callbacks.StepsLog`.)
    """
    last = last_complete_checkpoint(out / "checkpoints")
    where = (f"last complete checkpoint {last}; run the same command again to resume from it" if last
             else "no checkpoint was complete yet (train.save_steps); a new run starts over")
    return f"stopped after {len(steps)} optimizer step(s); {where}"
