"""Private uids for sandboxed programs: one per live program, host-wide, never shared.

Every program runs under a uid of its own taken from ``[UID_BASE, UID_BASE + UID_COUNT)``, a range
no account or user-namespace map uses. A uid is held by an exclusive ``flock`` on
``LOCK_DIR/<uid>``: the lock is taken before the program starts and released only after the host
has checked that no process of that uid is left, so two evals on one host (two processes, two
users of the same machine) never hand out the same uid to two live programs. The lock fd is also
inherited by the sandbox launcher, so the uid stays taken while any part of the sandbox lives,
even if the host process dies first. A uid that still has a process (a leftover of a killed host)
is skipped. Successive samples of one process walk the range round-robin from a random start, so a
uid is not handed out again right after it was released.

Lock files exist only while held: the holder unlinks the file before closing it, and a taker
checks after ``flock`` that the file it locked is still the one at the path (the classic
unlink-while-locked protocol), so the directory does not fill up.
"""

from __future__ import annotations

import fcntl
import os
import random
import stat
import threading

from qtulu.errors import QtuluError

UID_BASE = 2_000_000_000  # below 2**31 (some tools misread larger uids), far above any real account
UID_COUNT = 1 << 16
LOCK_DIRS = ("/run/qtulu-sandbox", "/var/tmp/qtulu-sandbox")  # the first whose parent exists


class UidError(QtuluError, RuntimeError):
    """No private uid could be allocated (lock directory unusable or every uid busy)."""


def lock_dir() -> str:
    """The host-wide lock directory (created 0700 root; refused if it is a symlink or not ours)."""
    for path in LOCK_DIRS:
        if not os.path.isdir(os.path.dirname(path)):
            continue
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            pass
        st = os.lstat(path)
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o022:
            raise UidError(f"{path}: not a directory owned by uid {os.geteuid()} and writable only by it; "
                           "remove it (the sandbox keeps its uid locks there)")
        return path
    raise UidError(f"no directory for the sandbox's uid locks: none of {', '.join(LOCK_DIRS)} has a parent")


def pids_of_uid(uid: int) -> list[int]:
    """Live (non-zombie) processes whose real uid is ``uid`` (as the host's /proc sees them)."""
    pids = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            fd = os.open(f"/proc/{entry.name}/status", os.O_RDONLY | os.O_CLOEXEC)
            try:
                status = os.read(fd, 8192)
            finally:
                os.close(fd)
            state = status.split(b"\nState:", 1)[1].split(None, 1)[0]
            real_uid = int(status.split(b"\nUid:", 1)[1].split(None, 1)[0])
        except (OSError, IndexError, ValueError):  # gone meanwhile
            continue
        if real_uid == uid and state not in (b"Z", b"X"):  # a zombie holds nothing: it waits to be reaped
            pids.append(int(entry.name))
    return pids


class UidLease:
    """A held uid: ``fd`` is the locked file (pass it to the launcher so the lock outlives us)."""

    def __init__(self, uid: int, fd: int, path: str):
        self.uid, self.fd, self.path = uid, fd, path

    def release(self) -> None:
        if self.fd < 0:
            return
        try:
            os.unlink(self.path)  # while still locked: a waiter on this inode sees it is gone and retries
        except FileNotFoundError:
            pass
        os.close(self.fd)
        self.fd = -1

    def __repr__(self) -> str:
        return f"UidLease(uid={self.uid})"


_next = [random.randrange(UID_COUNT)]
_next_lock = threading.Lock()


def _try(uid: int, directory: str) -> UidLease | None:
    path = os.path.join(directory, str(uid))
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    try:
        same = os.stat(path, follow_symlinks=False).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        same = False
    if not same or pids_of_uid(uid):  # released under us, or a leftover process still runs as uid
        if same:
            os.unlink(path)
        os.close(fd)
        return None
    os.write(fd, f"{os.getpid()}\n".encode())  # for a person looking at the directory
    return UidLease(uid, fd, path)


def acquire() -> UidLease:
    """Take a free private uid (see the module docstring); raise `UidError` if none is free."""
    directory = lock_dir()
    for _ in range(UID_COUNT):
        with _next_lock:  # one counter per process, only ever moving forward (modulo the range)
            k = _next[0] % UID_COUNT
            _next[0] = (k + 1) % UID_COUNT
        lease = _try(UID_BASE + k, directory)
        if lease is not None:
            return lease
    raise UidError(f"all {UID_COUNT} sandbox uids from {UID_BASE} are busy (locks in {directory})")
