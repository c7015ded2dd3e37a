"""One cgroup per sandboxed program: a memory bound and a process-count bound for its whole tree.

``detect()`` looks at the mounted cgroup hierarchies once and picks:

- **v2** (a ``cgroup2`` mount whose controllers include ``memory`` and ``pids``): programs go to
  ``<own cgroup or the mount root>/qtulu-sandbox/uid-<uid>`` with ``memory.max``,
  ``memory.swap.max = 0`` and ``pids.max``;
- **v1** (a ``cgroup`` mount with the ``memory`` controller, ``pids`` if mounted): programs go to
  ``<own memory cgroup>/qtulu-sandbox/uid-<uid>`` with ``memory.limit_in_bytes`` (and
  ``memory.memsw.limit_in_bytes``: no escape into swap) and ``pids.max`` in the pids hierarchy.

Creating, limiting and joining need root. ``detect()`` proves it works by creating and removing a
probe cgroup; when nothing works it returns a `Support` with ``version=None`` and the reason, and
the sandbox uses its documented rlimit fallback (see ``qtulu.evals.sandbox``).

Everything under ``/sys/fs/cgroup`` is read from ``/proc/self/mountinfo`` and
``/proc/self/cgroup``, so a cgroup namespace or a non-standard mount point works the same.
"""

from __future__ import annotations

import errno
import os
import signal
import time
from dataclasses import dataclass, field

from qtulu.errors import QtuluError

GROUP = "qtulu-sandbox"


class CgroupError(QtuluError, RuntimeError):
    """A cgroup could not be created, limited or removed."""


@dataclass(frozen=True)
class Support:
    """Where program cgroups are made. ``bases``: controller -> parent dir (``GROUP`` dirs)."""

    version: str | None  # "v2" | "v1" | None
    bases: dict = field(default_factory=dict)
    reason: str = ""

    @property
    def pids(self) -> bool:
        return "pids" in self.bases


def _mounts(mountinfo: str = "/proc/self/mountinfo") -> list[tuple[str, str, str, set[str]]]:
    """(mount root, mount point, fstype, super options) of every cgroup/cgroup2 mount."""
    out = []
    with open(mountinfo) as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fields, rfields = left.split(), right.split()
            if len(rfields) >= 3 and rfields[0] in ("cgroup", "cgroup2"):
                mount_point = fields[4].replace("\\040", " ")
                out.append((fields[3], mount_point, rfields[0], set(rfields[2].split(","))))
    return out


def _own(proc_cgroup: str = "/proc/self/cgroup") -> dict[str, str]:
    """{"memory": "/a/b", "pids": ..., "": <v2 path>} for this process."""
    out = {}
    with open(proc_cgroup) as f:
        for line in f:
            _id, ctrls, path = line.rstrip("\n").split(":", 2)
            for c in (ctrls.split(",") if ctrls else [""]):
                out[c] = path
    return out


def _under(mount_root: str, mount_point: str, path: str) -> str:
    """Directory of cgroup ``path`` (as /proc/self/cgroup names it) under a mount of ``mount_root``."""
    rel = os.path.relpath(path, mount_root) if path.startswith(mount_root) else path.lstrip("/")
    return os.path.normpath(os.path.join(mount_point, "" if rel == "." else rel))


def _write(path: str, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()


def _v2_base(mount_point: str, own_dir: str) -> str | None:
    """A dir under which children get memory+pids: our own cgroup if it delegates them, else the root."""
    for parent in dict.fromkeys([own_dir, mount_point]):
        ctrls = set(_read(os.path.join(parent, "cgroup.controllers")).split())
        if not {"memory", "pids"} <= ctrls:
            continue
        try:
            if not {"memory", "pids"} <= set(_read(os.path.join(parent, "cgroup.subtree_control")).split()):
                _write(os.path.join(parent, "cgroup.subtree_control"), "+memory +pids")
            base = os.path.join(parent, GROUP)
            os.makedirs(base, exist_ok=True)
            if not {"memory", "pids"} <= set(_read(os.path.join(base, "cgroup.subtree_control")).split()):
                _write(os.path.join(base, "cgroup.subtree_control"), "+memory +pids")
            return base
        except OSError:  # e.g. EBUSY: a cgroup with processes cannot delegate (no internal processes)
            continue
    return None


def detect() -> Support:
    """Find where program cgroups can be made, and prove it with a probe cgroup."""
    if os.geteuid() != 0:
        return Support(None, reason="not root: cannot create cgroups")
    try:
        mounts, own = _mounts(), _own()
    except OSError as e:
        return Support(None, reason=f"cannot read the cgroup mounts ({e})")
    bases: dict[str, str] = {}
    version = None
    for root, point, fstype, _opts in mounts:
        if fstype != "cgroup2" or "" not in own:
            continue
        try:
            base = _v2_base(point, _under(root, point, own[""]))
        except OSError:
            base = None
        if base:
            version, bases = "v2", {"memory": base, "pids": base}
            break
    if version is None:
        for ctrl in ("memory", "pids"):
            for root, point, fstype, opts in mounts:
                if fstype == "cgroup" and ctrl in opts and ctrl in own:
                    bases[ctrl] = os.path.join(_under(root, point, own[ctrl]), GROUP)
                    break
        if "memory" in bases:
            version = "v1"
        else:
            return Support(None, reason="no cgroup hierarchy with the memory controller is mounted")
    support = Support(version, bases)
    try:
        probe = ProgramCgroup(support, f"probe-{os.getpid()}", 64 << 20, 8)
        probe.remove()
    except OSError as e:
        return Support(None, reason=f"cannot create a {version} cgroup under {bases['memory']} ({e})")
    return support


class ProgramCgroup:
    """The cgroup(s) of one program: created with limits; the program joins via ``procs_files``."""

    def __init__(self, support: Support, name: str, memory_bytes: int, max_pids: int):
        self.support = support
        self.dirs: dict[str, str] = {}
        try:
            for ctrl, base in support.bases.items():
                d = os.path.join(base, name)
                if d in self.dirs.values():
                    self.dirs[ctrl] = d
                    continue
                os.makedirs(base, exist_ok=True)
                if os.path.isdir(d):  # left by a host that died mid-run: its uid lock was free, so it is ours now
                    _Dir(d).remove()
                os.mkdir(d)
                self.dirs[ctrl] = d
            self._limit(memory_bytes, max_pids)
        except BaseException:
            self.remove()
            raise

    def _limit(self, memory_bytes: int, max_pids: int) -> None:
        mem = self.dirs["memory"]
        if self.support.version == "v2":
            _write(os.path.join(mem, "memory.max"), str(memory_bytes))
            if os.path.exists(os.path.join(mem, "memory.swap.max")):
                _write(os.path.join(mem, "memory.swap.max"), "0")
            _write(os.path.join(mem, "pids.max"), str(max_pids))
            return
        _write(os.path.join(mem, "memory.limit_in_bytes"), str(memory_bytes))
        memsw = os.path.join(mem, "memory.memsw.limit_in_bytes")
        if os.path.exists(memsw):  # memory + swap: set after the memory limit (it must be >= it)
            _write(memsw, str(memory_bytes))
        if "pids" in self.dirs:
            _write(os.path.join(self.dirs["pids"], "pids.max"), str(max_pids))

    @property
    def procs_files(self) -> list[str]:
        """``cgroup.procs`` of each hierarchy: a process writes ``0`` to each to join (before dropping root)."""
        return [os.path.join(d, "cgroup.procs") for d in dict.fromkeys(self.dirs.values())]

    def stats(self) -> dict:
        """``{"peak_bytes", "oom_kills", "limit_hits"}`` read from the memory controller."""
        mem = self.dirs.get("memory")
        out = {"peak_bytes": None, "oom_kills": 0, "limit_hits": 0}
        if not mem:
            return out
        try:
            if self.support.version == "v2":
                if os.path.exists(os.path.join(mem, "memory.peak")):
                    out["peak_bytes"] = int(_read(os.path.join(mem, "memory.peak")))
                events = dict(line.split() for line in _read(os.path.join(mem, "memory.events")).splitlines())
                out["oom_kills"] = int(events.get("oom_kill", 0))
                out["limit_hits"] = int(events.get("max", 0))
            else:
                out["peak_bytes"] = int(_read(os.path.join(mem, "memory.max_usage_in_bytes")))
                out["limit_hits"] = int(_read(os.path.join(mem, "memory.failcnt")))
                oom = dict(line.split() for line in _read(os.path.join(mem, "memory.oom_control")).splitlines())
                out["oom_kills"] = int(oom.get("oom_kill", 0))
        except (OSError, ValueError):
            pass
        return out

    def kill(self) -> None:
        for d in dict.fromkeys(self.dirs.values()):
            _Dir(d).kill()

    def remove(self) -> None:
        """Kill whatever is left in the cgroup(s) and remove them (waits for the processes to exit)."""
        for d in dict.fromkeys(self.dirs.values()):
            _Dir(d).remove()
        self.dirs = {}


class _Dir:
    def __init__(self, path: str):
        self.path = path

    def pids(self) -> list[int]:
        try:
            return [int(x) for x in _read(os.path.join(self.path, "cgroup.procs")).split()]
        except FileNotFoundError:
            return []

    def kill(self) -> None:
        kill_file = os.path.join(self.path, "cgroup.kill")
        if os.path.exists(kill_file):  # v2, Linux >= 5.14: the kernel kills the whole tree at once
            try:
                _write(kill_file, "1")
                return
            except OSError:
                pass
        for _ in range(100):  # v1: SIGKILL until empty (a fork bomb is bounded by pids.max/RLIMIT_NPROC)
            pids = self.pids()
            if not pids:
                return
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.005)

    def remove(self, deadline: float = 10.0) -> None:
        if not os.path.isdir(self.path):
            return
        end = time.monotonic() + deadline
        while True:
            self.kill()
            try:
                os.rmdir(self.path)
                return
            except FileNotFoundError:
                return
            except OSError as e:
                if e.errno != errno.EBUSY or time.monotonic() > end:
                    raise CgroupError(f"cannot remove cgroup {self.path}: {e} (processes: {self.pids()})") from None
            time.sleep(0.01)
