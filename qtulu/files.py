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

import contextlib
import errno
import json
import math
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Callable, Sequence

from qtulu.errors import QtuluError

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
    with disk_full_is_one_line(path.parent, f"writing {path}"):  # eval results, study records, reports
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


def _exchange(a: Path, b: Path) -> bool:
    """Swap ``a`` and ``b`` in one step (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EPERM):
        return False  # an old kernel or a filesystem without the flag: fall back to two renames
    raise OSError(err, os.strerror(err), str(b))


def replace_dir(stage: Path, out_dir: Path) -> None:
    """Move a fully written ``stage`` dir to ``out_dir`` (replacing it) with renames only; its files
    get the umask's modes first (`share_modes`).

    The earlier ``out_dir`` stays recoverable at every instant: where the kernel can, the two are
    swapped in one step (the old one then sits at ``stage`` until removed); elsewhere the old one is
    moved to ``.NAME.old-XXXX`` beside it first, and moved back if the second rename fails. It is
    deleted only once the new one is in place."""
    stage, out_dir = Path(stage), Path(out_dir)
    share_modes(stage)
    if out_dir.is_dir() and not out_dir.is_symlink() and _exchange(stage, out_dir):
        fsync_dir(out_dir.parent)
        shutil.rmtree(stage, ignore_errors=True)
        return
    old = None
    if out_dir.exists() or out_dir.is_symlink():
        old = out_dir.with_name(f".{out_dir.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(out_dir, old)
    try:
        os.replace(stage, out_dir)
    except BaseException:
        if old is not None:
            os.replace(old, out_dir)  # put the earlier output back: nothing is lost
        raise
    fsync_dir(out_dir.parent)
    if old is not None:
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink(missing_ok=True)


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


# --------------------------------------------------------------------------------------------
# inputs that are not plain files, and a full disk, as one-line errors


class NotAFileError(QtuluError, ValueError):
    """An input path is a FIFO, a device or a socket (reading it could hang or never end)."""


class DiskFullError(QtuluError, OSError):
    """A write failed because the disk (or quota) is full; nothing half-written was left."""


def check_input_path(path: str | os.PathLike, what: str = "input") -> Path:
    """``path`` if it is a regular file or a directory (symlinks followed); `NotAFileError` naming it
    for a FIFO, character/block device or socket, which a reader would block on or read forever.
    A missing path is left to the caller (its own "not found" message)."""
    import stat

    p = Path(path)
    try:
        mode = os.stat(p).st_mode
    except OSError:
        return p
    if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        kind = ("a FIFO" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode)
                else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "not a regular file")
        raise NotAFileError(f"{what} {p}: is {kind}, not a regular file; refusing to read it")
    return p


def check_input_tree(path: str | os.PathLike, what: str = "input") -> Path:
    """`check_input_path` for ``path`` and, when it is a directory, every entry below it."""
    p = check_input_path(path, what)
    if p.is_dir():
        for sub in sorted(p.rglob("*")):
            check_input_path(sub, what)
    return p


@contextlib.contextmanager
def disk_full_is_one_line(path: str | os.PathLike, what: str):
    """Turn a full disk while writing ``what`` under ``path`` into `DiskFullError` (one line);
    every other error passes through unchanged."""
    try:
        yield
    except QtuluError:
        raise
    except Exception as e:
        if is_disk_full(e, path):
            raise DiskFullError(f"{what}: the disk is full at {path} ({type(e).__name__}); nothing was "
                                "written there. Free some space and run the command again") from e
        raise


# --------------------------------------------------------------------------------------------
# output paths: the one place that decides where a command may write

# What each kind of output leaves behind, so that a later command recognises its own earlier output
# (a glob relative to the output folder; any match is enough).
OUTPUT_MARKERS = {
    "adapter": ("qtulu.json",),
    "model": ("qtulu_merge.json",),
    # names only qtulu writes (a foreign "checkpoints/" folder is not enough: a run cleans stale files there)
    "run": (".qtulu-run.lock", "steps.jsonl", "adapter/qtulu.json", "checkpoints/checkpoint-*/qtulu_checkpoint.json"),
    "eval": ("results.json", "*/*/metrics.json", "*/*/predictions.jsonl", "merge_search.json", "candidates"),
    "study": (".qtulu-study", "log.jsonl", ".qtulu-run.lock"),
    "data": ("manifest.json", "recipe.json"),  # `qtulu data build --out`
    "demo": ("report.json", "runs/*/adapter/qtulu.json"),  # `qtulu demo --out`
    "bench": ("results.json",),  # `qtulu bench e2e --out-dir`
}
WARNINGS_LOG = "warnings.log"  # the libraries' warnings of a command (qtulu.cli), in its output folder
OUTPUT_WHAT = {"adapter": "adapter", "model": "merged model", "run": "training run", "eval": "eval output",
               "study": "study", "file": "output file", "data": "data build", "demo": "demo output",
               "bench": "benchmark output"}


class OutputPathError(QtuluError, ValueError):
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
    - ``kind``: ``adapter``, ``model``, ``run``, ``eval``, ``study``, ``data``, ``demo``, ``bench`` (a
      folder) or ``file``. A
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
    # qtulu's own warnings.log and empty folders (an earlier attempt that failed early leaves them:
    # `qtulu.cli`, an empty checkpoints/) hold nothing that writing there could lose
    foreign = next((e for e in o.iterdir() if e.name != WARNINGS_LOG
                    and not (e.is_dir() and not e.is_symlink() and next(e.iterdir(), None) is None)), None)
    if not overwrite and foreign is not None and not is_output_of(o, kind):
        raise OutputPathError(
            f"{flag} {raw}: a non-empty folder that is not a qtulu {what}; refusing to write into it "
            f"(choose an empty or new {flag}, or pass --overwrite to let qtulu replace its contents)")
    return o
