"""Writing files so that nothing is ever half there, and telling a full disk from other failures.

- `atomic_write` / `atomic_write_text` / `write_json` / `write_jsonl`: a temp file beside the target,
  fsynced and renamed into place; the one way qtulu writes a file that others read.
- `replace_dir`: move a fully written stage directory into place with renames only.
- `share_modes`: files meant to be shared follow the user's umask (0644 under umask 022). Some
  writers do not: safetensors (>= 0.6) writes through a private temp file and leaves its tensors
  0600, so an adapter or an export would be unreadable by a serving account while the JSON beside it
  is 0644. Both writers above call it on what they move into place.
- `is_disk_full`: on a full disk the libraries that write checkpoints do not all raise
  ``OSError(ENOSPC)``: safetensors raises its own ``SafetensorError("... No space left on device
  (os error 28)")`` and torch's zip writer a ``RuntimeError("[enforce fail at inline_container.cc]
  unexpected pos ...")`` that does not mention the disk at all. `is_disk_full` looks at the exception
  chain for ENOSPC / EDQUOT or their messages, and, failing that, at the free space left where the
  write went.
"""

from __future__ import annotations

import errno
import json
import math
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Callable, Sequence

NEARLY_FULL_BYTES = 4 << 20  # a write that failed with less than this free is taken as "disk full"


def is_disk_full(exc: BaseException, path: str | os.PathLike) -> bool:
    """True when ``exc`` (raised while writing under ``path``) was caused by a full disk or quota."""
    seen = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        text = str(e)
        if "No space left on device" in text or "os error 28" in text or "Disk quota exceeded" in text:
            return True
        e = e.__cause__ or e.__context__
    try:
        probe = os.fspath(path)
        while not os.path.exists(probe) and os.path.dirname(probe) != probe:
            probe = os.path.dirname(probe)
        return shutil.disk_usage(probe).free < NEARLY_FULL_BYTES
    except OSError:
        return False


def fsync_dir(path: Path) -> None:
    """fsync a directory so that renames inside it survive a power cut (no-op where unsupported)."""
    try:
        fd = os.open(str(path), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on directories; the rename is still atomic
    finally:
        os.close(fd)


def current_umask() -> int:
    """The process's umask, read without changing it where Linux tells it (/proc), else set and reset."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def share_modes(path: Path) -> None:
    """Give ``path`` (a file, or a directory and everything under it) the modes a plain ``open`` /
    ``mkdir`` would under the current umask: 0644 / 0755 under 022, 0600 / 0700 under 077.
    Executable bits a writer set are kept (masked by the umask too)."""
    mask = current_umask()
    paths = [path]
    if path.is_dir() and not path.is_symlink():
        paths += [Path(root) / n for root, dirs, files in os.walk(path) for n in (*dirs, *files)]
    for p in paths:
        if p.is_symlink():
            continue
        st = p.stat()
        base = 0o777 if p.is_dir() or st.st_mode & 0o111 else 0o666
        want = base & ~mask
        if st.st_mode & 0o777 != want:
            p.chmod(want)


def atomic_write(path: str | os.PathLike, write: Callable[[Path], Any]) -> Path:
    """``write(tmp)`` writes a temp file beside ``path`` (same suffix, so that e.g. matplotlib picks
    the format from it), which is flushed to disk and renamed into place: a reader sees the old file
    or the whole new one, never a part. The temp file is removed if ``write`` fails. The one way
    qtulu writes a file that others read while it may be rewritten (reports, logs, charts)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp{path.suffix}")
    try:
        write(tmp)
        share_modes(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically (`atomic_write`)."""
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def replace_dir(stage: Path, out_dir: Path) -> None:
    """Move a fully written ``stage`` dir to ``out_dir`` (replacing it) with renames only; its files
    get the umask's modes first (`share_modes`)."""
    share_modes(stage)
    old = None
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(out_dir, old)
    os.replace(stage, out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_jsonl(path: Path, rows: Sequence[dict]) -> None:
    """One JSON object a line, atomically (`atomic_write_text`)."""
    atomic_write_text(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, ensure_ascii=False, default=_json_default))


def _json_default(o):
    if isinstance(o, float) and math.isnan(o):
        return None
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON-able: {type(o).__name__}")
