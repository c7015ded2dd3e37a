"""One writer per run directory: ``qtulu train`` holds an exclusive lock on ``OUT/.qtulu-run.lock``.

The lock is a ``flock`` on that file, so the kernel releases it whenever the holder ends, however
it ends (return, exception, SIGKILL, power cut): a lock is never stale after its holder died. The
file records who holds it (pid, host, command, start time) so that a second run on the same
directory fails at once with a message naming the holder.

A run that ends in Python, successfully or with an error or Ctrl-C, also removes the file, so a
failed run leaves no lock file behind that would look held. It is unlinked while still locked, and
a taker checks after locking that the file it locked is still the one at the path (else it locked
a removed file and tries again): two runs can never both hold the directory. Only a process killed
outright (SIGKILL) leaves the file; it is not locked, and the next run takes it over.

Under torchrun/accelerate only the main process (RANK 0) takes the lock: the ranks of one launch
share the directory; a second launch's rank 0 is refused.

Also here: `set_aside_checkpoints` and `set_aside_adapter`, what ``--resume never`` does with the
checkpoints and the adapter an earlier run left in the directory: it moves them aside
(``checkpoints.previous-<time>``, ``adapter.previous-<time>``), never deletes them.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import json
import os
import socket
import stat
import sys
import time
from pathlib import Path
from typing import Iterator

from qtulu.errors import QtuluError

LOCK_NAME = ".qtulu-run.lock"


class RunDirLocked(QtuluError, RuntimeError):
    """Another live run holds the run directory."""


def _describe(info: dict) -> str:
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info["started"])) if "started" in info else "?"
    return f"pid {info.get('pid', '?')} on {info.get('host', '?')}, since {since}: {info.get('command', '?')}"


@contextlib.contextmanager
def run_lock(out_dir: str | os.PathLike, *, what: str = "qtulu train run",
             hint: str = "choose another --output-dir") -> Iterator[Path]:
    """Hold the run directory ``out_dir`` (created if needed) for the duration of the ``with``.

    Raises `RunDirLocked` naming the holder when another live process holds it (``what`` names the
    kind of run in the message, ``hint`` the way out).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / LOCK_NAME
    fd = _take(path, out, what, hint)
    try:
        info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(),
                "command": " ".join([os.path.basename(sys.argv[0] or "python"), *sys.argv[1:]])}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        yield path
    finally:
        try:
            os.unlink(path)  # still locked here: a taker that opened it re-checks the path after locking
        except FileNotFoundError:
            pass
        os.close(fd)  # releases the lock


def _take(path: Path, out: Path, what: str, hint: str) -> int:
    """Open and lock ``path``; the locked file must still be the one at ``path`` (see module doc)."""
    while True:
        try:
            # never follow a planted symlink (its target would be truncated and overwritten), never
            # block on a FIFO: the lock is a plain file qtulu created, or nothing
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK, 0o644)
        except OSError as e:
            if path.is_symlink() or e.errno == errno.ELOOP:
                raise RunDirLocked(f"{path}: is a symlink, not qtulu's lock file; refusing to follow it "
                                   "(remove it, or choose another directory)") from None
            raise
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise RunDirLocked(f"{path}: is not a regular file (qtulu's lock file is one); refusing to use it")
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                info = json.loads(os.pread(fd, 65536, 0) or b"{}")
            except (OSError, ValueError):
                info = {}
            os.close(fd)
            raise RunDirLocked(
                f"{out} is in use by another {what} ({_describe(info)}); wait for it to finish or {hint}"
            ) from None
        except BaseException:
            os.close(fd)
            raise
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)  # the holder removed it between our open and our lock: take the new one


def locks_run_dir(fn):
    """Decorator for ``train(..., output_dir=...)``: run it holding `run_lock` (main rank only)."""

    @functools.wraps(fn)
    def wrapper(*args, output_dir, **kwargs):
        if int(os.environ.get("RANK", "0")) != 0:
            return fn(*args, output_dir=output_dir, **kwargs)
        with run_lock(output_dir):
            return fn(*args, output_dir=output_dir, **kwargs)

    return wrapper


def set_aside_checkpoints(run_dir: str | os.PathLike, *, say=print) -> Path | None:
    """Move ``run_dir`` (an earlier run's ``checkpoints/``) to ``<run_dir>.previous-<time>`` when it
    holds any checkpoint, and recreate it empty; returns where they went (None if nothing moved)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir() or not any(p.name.startswith("checkpoint-") for p in run_dir.iterdir()):
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S")
    dest = run_dir.with_name(f"{run_dir.name}.previous-{stamp}")
    n = 1
    while dest.exists():
        n += 1
        dest = run_dir.with_name(f"{run_dir.name}.previous-{stamp}-{n}")
    os.replace(run_dir, dest)
    run_dir.mkdir()
    say(f"resume=never: the earlier run's checkpoints were moved to {dest} (not deleted)")
    return dest


def _aside(path: Path) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    dest = path.with_name(f"{path.name}.previous-{stamp}")
    n = 1
    while dest.exists() or dest.is_symlink():
        n += 1
        dest = path.with_name(f"{path.name}.previous-{stamp}-{n}")
    return dest


def set_aside_adapter(adapter_dir: str | os.PathLike, *, say=print) -> Path | None:
    """Move an earlier run's ``adapter/`` (``adapter_dir``) to ``adapter.previous-<time>`` so that a
    fresh run (``--resume never``) never replaces it; returns where it went (None if nothing was there)."""
    adapter_dir = Path(adapter_dir)
    if not (adapter_dir.exists() or adapter_dir.is_symlink()):
        return None
    dest = _aside(adapter_dir)
    os.replace(adapter_dir, dest)
    say(f"resume=never: the earlier run's adapter was moved to {dest} (not deleted)")
    return dest
