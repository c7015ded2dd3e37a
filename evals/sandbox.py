"""OS-isolated execution of model-written Python (HumanEval completions).

Each program runs as::

    host ──Popen(setsid, env={}, cwd=fresh tmp dir)──▶ launcher (python -I -S, root)
        unshare(NEWNS | NEWNET | NEWPID), private mounts, a tmpfs root holding read-only binds of
        /usr and the interpreter prefix plus the program's own directory
        └─fork──▶ init (PID 1 of its PID namespace): PDEATHSIG=KILL, rlimits (AS, CPU, NPROC,
                  FSIZE, NOFILE, CORE) set, chroot, groups dropped, setuid to a uid of its own
            └─fork──▶ exec ``python -I -S program.py``; init reaps it, and if any descendant
                      is still alive then, kills them all and fails the sample (exit 125)

so the program sees no host files but the interpreter and /usr, no environment, no network (an
empty network namespace: no interface but a down loopback), and cannot signal or ptrace host
processes. Containment of process trees needs no cgroups: when PID 1 of a PID namespace dies the
kernel kills every process in it (grandchildren that ``setsid`` away included), the launcher's
death kills PID 1 (PDEATHSIG), the host kills the launcher's process group on timeout, and a final
sweep kills anything still running under the program's private uid. Output goes to files capped
by RLIMIT_FSIZE, never into host memory.

Where the OS refuses a piece (not root, no ``unshare``), the launcher degrades: without a network
namespace, sockets are refused by an audit hook installed before the program runs (weaker: code
that reaches the socket syscalls through ctypes gets through) and ``isolation()`` reports it with a
warning; without a PID namespace or uid drop, the process group is killed on timeout.

Code execution is opt-in: callers must pass ``allow_code_execution=True`` (CLI:
``--allow-code-execution``); ``require_opt_in`` raises ``CodeExecutionRefused`` otherwise.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

from qtulu.errors import QtuluError


class CodeExecutionRefused(QtuluError, PermissionError):
    """Raised when model-written code would run without the explicit opt-in."""


def require_opt_in(allow_code_execution: bool, what: str = "this task") -> None:
    if not allow_code_execution:
        raise CodeExecutionRefused(
            f"{what} executes model-written code; it runs only with --allow-code-execution "
            "(evaluate(..., allow_code_execution=True)), in the sandbox of qtulu.evals.sandbox"
        )


@dataclass(frozen=True)
class SandboxConfig:
    """Limits for one program. ``cpu_seconds`` None = ceil(timeout) + 1."""

    timeout: float = 5.0
    memory_mb: int = 1024
    cpu_seconds: int | None = None
    max_processes: int = 16
    max_file_mb: int = 16
    max_open_files: int = 64
    max_output_bytes: int = 64 * 1024


@dataclass
class ExecResult:
    """Outcome of one program: ``passed`` iff it exited 0 before the timeout."""

    passed: bool
    status: str  # "passed" | "failed" | "timeout"
    returncode: int | None
    duration: float
    stdout: str = ""
    stderr: str = ""
    isolation: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


# The launcher runs in a fresh interpreter (python -I -S -c), single-threaded, as the host user.
_LAUNCHER = r'''
import ctypes, json, os, resource, signal, sys
cfg = json.loads(sys.argv[1])
libc = ctypes.CDLL(None, use_errno=True)
NEWNS, NEWNET, NEWPID = 0x00020000, 0x40000000, 0x20000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 1, 2, 4, 32, 4096, 16384, 1 << 18
iso = {"root": os.geteuid() == 0}
def unshare(flag):
    return libc.unshare(flag) == 0
def mount(src, dst, fstype, flags, data=None):
    enc = lambda s: None if s is None else s.encode()
    if libc.mount(enc(src), enc(dst), enc(fstype), ctypes.c_ulong(flags), enc(data)) != 0:
        raise OSError(ctypes.get_errno(), "mount %s -> %s" % (src, dst))
def bind_ro(src, dst):
    mount(src, dst, None, MS_BIND | MS_REC)
    mount(None, dst, None, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV)
iso["netns"] = unshare(NEWNET)
iso["pidns"] = unshare(NEWPID)
iso["chroot"] = False
work, newroot = cfg["work"], cfg["newroot"]
if iso["root"] and unshare(NEWNS):
    try:
        # private first: nothing mounted below may propagate back to the host
        mount(None, "/", None, MS_REC | MS_PRIVATE)
        mount("tmpfs", newroot, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,mode=755")
        for src in ["/usr", cfg["prefix"]] + [p for p in ("/lib", "/lib64", "/bin") if os.path.isdir(p) and not os.path.islink(p)]:
            os.makedirs(newroot + src, exist_ok=True)
            bind_ro(src, newroot + src)
        for name in ("bin", "lib", "lib64"):
            if os.path.islink("/" + name):
                os.symlink(os.readlink("/" + name), newroot + "/" + name)
        os.makedirs(newroot + "/work")
        mount(work, newroot + "/work", None, MS_BIND | MS_NOSUID | MS_NODEV)
        os.makedirs(newroot + "/dev")
        open(newroot + "/dev/null", "w").close()
        mount("/dev/null", newroot + "/dev/null", None, MS_BIND)
        os.makedirs(newroot + "/tmp", mode=0o1777)
        os.chmod(newroot + "/tmp", 0o1777)
        iso["chroot"] = True
    except OSError as e:
        iso["chroot_error"] = str(e)
if not iso["root"]:
    uid_s = str(os.getuid())
    mine = 0
    for d in os.listdir("/proc"):
        try:
            if d.isdigit() and any(l.split()[1] == uid_s for l in open("/proc/%s/status" % d) if l.startswith("Uid:")):
                mine += 1
        except (OSError, IndexError):
            pass
    cfg["limits"]["nproc"] += mine  # the limit counts every process of the user, not just ours
pid = os.fork()
if pid == 0:
    try:
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: the launcher's death kills us
        lim = cfg["limits"]
        for res, val in ((resource.RLIMIT_AS, lim["as"]), (resource.RLIMIT_CPU, lim["cpu"]),
                         (resource.RLIMIT_FSIZE, lim["fsize"]), (resource.RLIMIT_NOFILE, lim["nofile"]),
                         (resource.RLIMIT_CORE, 0), (resource.RLIMIT_NPROC, lim["nproc"])):
            resource.setrlimit(res, (val, val))
        prog = cfg["program"]
        if iso["chroot"]:
            os.chroot(newroot)
            os.chdir("/work")
            prog = "/work/" + os.path.basename(prog)
        else:
            os.chdir(work)
        if iso["root"]:
            os.setgroups([])
            os.setgid(cfg["uid"])
            os.setuid(cfg["uid"])
        libc.prctl(36, 1)  # PR_SET_CHILD_SUBREAPER: orphans come to us even without a PID namespace
        child = os.fork()
        if child == 0:
            os.execve(cfg["python"], [cfg["python"], "-I", "-S", "-B", prog], {})
        while True:  # we are the namespace's init: reap until the program itself ends
            p, st = os.waitpid(-1, 0)
            if p == child:
                break
        left = False
        while True:
            try:
                p, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if p == 0:
                left = True
                break
        if left:  # descendants outlived the program: kill them all, count the sample as failed
            if iso["pidns"] or iso["root"]:  # -1 = our namespace / our private uid; never the user's own processes
                os.kill(-1, signal.SIGKILL)
            else:  # as a subreaper every orphan becomes our child: kill children until none is left
                me = str(os.getpid())
                for _ in range(1000):
                    kids = []
                    for d in os.listdir("/proc"):
                        try:
                            if d.isdigit() and open("/proc/%s/stat" % d).read().rsplit(")", 1)[1].split()[1] == me:
                                kids.append(int(d))
                        except (OSError, IndexError):
                            pass
                    if not kids:
                        break
                    for k in kids:
                        try:
                            os.kill(k, signal.SIGKILL)
                        except ProcessLookupError:
                            pass
                    try:
                        while os.waitpid(-1, os.WNOHANG)[0]:
                            pass
                    except ChildProcessError:
                        pass
            os.write(2, b"sandbox: the program left processes running; they were killed\n")
            os._exit(125)
        os._exit(os.waitstatus_to_exitcode(st) if os.WIFEXITED(st) else 128 + os.WTERMSIG(st))
    except BaseException as e:
        os.write(2, ("sandbox launcher: %r\n" % (e,)).encode())
        os._exit(126)
_, status = os.waitpid(pid, 0)
with open(cfg["status"], "w") as f:
    json.dump(iso, f)
os._exit(os.waitstatus_to_exitcode(status) if os.WIFEXITED(status) else 128 + os.WTERMSIG(status))
'''

# Without a network namespace: refuse sockets from inside the interpreter (documented as weaker).
_NO_NET_PREAMBLE = """\
import sys as _qtulu_sys
def _qtulu_no_net(event, args):
    if event.startswith("socket."):
        raise PermissionError("network access is disabled in the qtulu sandbox")
_qtulu_sys.addaudithook(_qtulu_no_net)
del _qtulu_sys, _qtulu_no_net
"""

_UID_BASE = 200_000 + (os.getpid() % 4096) * 256  # private uids per host process, per slot
_uid_lock = threading.Lock()
_uids_free: list[int] = []
_uids_next = [0]


def _take_uid() -> int:
    with _uid_lock:
        if _uids_free:
            return _uids_free.pop()
        _uids_next[0] += 1
        return _UID_BASE + _uids_next[0]


def _give_uid(uid: int) -> None:
    with _uid_lock:
        _uids_free.append(uid)


def _pids_of_uid(uid: int) -> list[int]:
    pids = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/status") as f:
                zombie = False
                for line in f:
                    if line.startswith("State:"):
                        zombie = line.split()[1] in ("Z", "X")  # dead, waiting to be reaped: holds nothing
                    elif line.startswith("Uid:"):
                        if int(line.split()[1]) == uid and not zombie:
                            pids.append(int(entry.name))
                        break
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
    return pids


def _sweep(uid: int, deadline: float = 5.0) -> int:
    """SIGKILL every process running as ``uid`` until none is left; returns how many were killed."""
    killed, end = 0, time.monotonic() + deadline
    while time.monotonic() < end:
        pids = _pids_of_uid(uid)
        if not pids:
            return killed
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
                killed += 1
            except ProcessLookupError:
                pass
        time.sleep(0.01)
    raise RuntimeError(f"sandbox: processes of uid {uid} survive SIGKILL: {_pids_of_uid(uid)}")


_warned = [False]


def _read_capped(path: Path, cap: int) -> str:
    try:
        with open(path, "rb") as f:
            return f.read(cap).decode("utf-8", "replace")
    except FileNotFoundError:
        return ""


def run_program(code: str, config: SandboxConfig = SandboxConfig()) -> ExecResult:
    """Run ``code`` (a complete Python program) in the sandbox and report how it ended."""
    is_root = os.geteuid() == 0
    top = Path(tempfile.mkdtemp(prefix="qtulu-sandbox-"))
    uid = _take_uid() if is_root else os.getuid()
    try:
        os.chmod(top, 0o711)
        work = top / "work"
        work.mkdir()
        (top / "newroot").mkdir()
        program = work / "program.py"
        program.write_text(code, encoding="utf-8")
        if is_root:
            os.chown(work, uid, uid)
            os.chown(program, uid, uid)
        cfg = {
            "work": str(work), "newroot": str(top / "newroot"), "program": str(program),
            "status": str(top / "status.json"), "uid": uid, "python": os.path.realpath(sys.executable),
            "prefix": os.path.realpath(sys.base_prefix),
            "limits": {
                "as": config.memory_mb * 2**20,
                "cpu": config.cpu_seconds or int(config.timeout) + 1,
                "fsize": config.max_file_mb * 2**20,
                "nofile": config.max_open_files,
                "nproc": config.max_processes,
            },
        }
        t0 = time.monotonic()
        timed_out = False
        with open(top / "stdout", "wb") as out, open(top / "stderr", "wb") as err:
            proc = subprocess.Popen(
                [cfg["python"], "-I", "-S", "-c", _LAUNCHER, json.dumps(cfg)],
                stdin=subprocess.DEVNULL, stdout=out, stderr=err, env={}, cwd=str(work),
                start_new_session=True, close_fds=True,
            )
            try:
                rc = proc.wait(timeout=config.timeout)
            except subprocess.TimeoutExpired:
                timed_out = True
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                rc = proc.wait()
            finally:
                if is_root:
                    _sweep(uid)
        duration = time.monotonic() - t0
        try:
            iso = json.loads((top / "status.json").read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            iso = {}
        if iso and not iso.get("netns") and not _warned[0]:
            _warned[0] = True
            warnings.warn("qtulu sandbox: no network namespace on this system; sockets are refused by "
                          "an audit hook only (code using ctypes could bypass it)", RuntimeWarning)
        status = "timeout" if timed_out else ("passed" if rc == 0 else "failed")
        return ExecResult(
            passed=status == "passed", status=status, returncode=None if timed_out else rc,
            duration=duration, stdout=_read_capped(top / "stdout", config.max_output_bytes),
            stderr=_read_capped(top / "stderr", config.max_output_bytes), isolation=iso,
        )
    finally:
        if is_root:
            _give_uid(uid)
        shutil.rmtree(top, ignore_errors=True)


def run_programs(codes: Sequence[str], config: SandboxConfig = SandboxConfig(), *, workers: int | None = None,
                 allow_code_execution: bool = False, progress: bool = False) -> list[ExecResult]:
    """Run many programs, ``workers`` at a time (default: CPU count); results in input order."""
    require_opt_in(allow_code_execution, "run_programs")
    workers = workers or os.cpu_count() or 1
    codes = [_maybe_guard(c) for c in codes]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = [pool.submit(run_program, c, config) for c in codes]
        if progress:
            from tqdm.auto import tqdm

            for _ in tqdm(futures, desc="executing", leave=False):
                _.result()
        return [f.result() for f in futures]


_netns_ok: list[bool] = []


def _maybe_guard(code: str) -> str:
    """Prepend the socket-refusing audit hook where no network namespace can be had."""
    if not _netns_ok:
        _netns_ok.append(bool(isolation().get("netns")))
    return code if _netns_ok[0] else _NO_NET_PREAMBLE + code


def isolation() -> dict:
    """Which isolation layers this system grants (runs a trivial program once)."""
    return run_program("pass\n", SandboxConfig(timeout=10)).isolation
