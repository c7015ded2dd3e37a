"""The sandbox launcher: run by the host as ``python -I -S -B launcher.py`` with its config on stdin.

Standalone on purpose (stdlib only, no qtulu import): it runs in a fresh interpreter with no
environment, no site-packages and, once it has unshared, in namespaces of its own. It is never
imported; ``qtulu.evals.sandbox`` documents the design and holds the host side.

    launcher (root): unshare mount, PID, network, IPC and UTS namespaces; private mounts; IPC
        sysctls of the new IPC namespace; a size-limited tmpfs root holding read-only, nosuid
        binds of /usr and the interpreter, /work, /tmp and three device nodes
    └─fork─ init (root, PID 1 of the new PID namespace, PDEATHSIG=KILL): reaps; once the program
            has exited, kills whatever it left (the whole namespace) and reports how it ended
        └─fork─ program: joins its cgroup(s), rlimits, chroot, drops to the private uid, no new
                privileges, fds 0-4 only; execs the harness wrapper (``WRAPPER``), which execs the
                program's source, then writes back a token it reads from fd 3 only after the
                source has returned.

The launcher then writes ``{"nonce", "harness_end", "exit", "signal", "left", ...}`` as JSON to
its verdict fd: a pipe from the host that nothing below the launcher holds. ``harness_end`` is
true only when the token written back on fd 4 equals the one the launcher generated.

With ``"isolate": false`` (the host's ``--unsafe-no-isolation``) the namespaces, chroot, uid drop
and cgroup are skipped; the harness, rlimits and leftover-process kill stay.
"""

import ctypes
import fcntl
import json
import os
import resource
import signal
import sys

NEWNS, NEWUTS, NEWIPC, NEWPID, NEWNET = 0x00020000, 0x04000000, 0x08000000, 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 1, 2, 4, 32, 4096, 16384, 1 << 18
PR_SET_PDEATHSIG, PR_SET_CHILD_SUBREAPER, PR_SET_NO_NEW_PRIVS = 1, 36, 38

# The harness: the program's source runs in this interpreter through exec(); only if exec returns
# (no exception, SystemExit included; no os._exit; not killed) does it read the token from fd 3
# and write it to fd 4. The token is not in this process while the program's code runs.
WRAPPER = r'''
import os, sys
def _qtulu_harness(read=os.read, write=os.write, exit_=os._exit, path=sys.argv[1], no_net=sys.argv[2] == "1"):
    if no_net:  # no network namespace (unsafe mode): refuse sockets from inside the interpreter
        def hook(event, args):
            if event.startswith("socket."):
                raise PermissionError("network access is disabled in the qtulu sandbox")
        sys.addaudithook(hook)
    sys.argv = [path]
    with open(path, encoding="utf-8") as f:
        source = f.read()
    namespace = {"__name__": "__main__", "__file__": path, "__builtins__": __builtins__}
    try:
        exec(compile(source, path, "exec"), namespace)
    except BaseException:
        try:
            sys.stdout.flush()
        except BaseException:
            pass
        try:
            import traceback
            traceback.print_exc()
            sys.stderr.flush()
        except BaseException:
            pass
        exit_(1)
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except BaseException:
        pass
    try:
        write(4, read(3, 64))
    except BaseException:
        exit_(1)
    exit_(0)
_qtulu_harness()
'''

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
    """Unshare every namespace, build the tmpfs root. Raises OSError naming the step that failed."""
    _check(libc.unshare(NEWNS | NEWPID | NEWNET | NEWIPC | NEWUTS), "unshare")
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


def program_child(cfg, tok_r, end_w, err_w):
    """In the forked program process: confine, then exec the harness. Never returns."""
    lim = cfg["limits"]
    for procs in cfg["cgroup_procs"]:
        write_file(procs, "0")  # join the program's cgroup(s) while still root
    if cfg["isolate"]:
        os.setsid()  # (unisolated it stays in the launcher's process group, which the host kills on timeout)
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
    a, b = fcntl.fcntl(tok_r, fcntl.F_DUPFD, 5), fcntl.fcntl(end_w, fcntl.F_DUPFD, 5)
    os.dup2(a, 3)  # the harness's token (read) and end marker (write) pipes, at fixed numbers
    os.dup2(b, 4)
    close_fds_except((err_w,), lo=5)  # err_w is close-on-exec
    os.execve(cfg["python"], [cfg["python"], "-I", "-S", "-B", "-c", WRAPPER, prog, "0" if cfg["isolate"] else "1"], {})


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


def init_main(cfg, tok_r, end_w, st_w):
    """PID 1 of the sandbox (or, unisolated, a subreaper): run the program, reap, report on st_w."""
    libc.prctl(PR_SET_CHILD_SUBREAPER, 1)  # unisolated: orphans come to us (in a PID namespace, PID 1 gets them anyway)
    err_r, err_w = os.pipe()  # close-on-exec: EOF with no data means the exec succeeded
    child = os.fork()
    if child == 0:
        try:
            os.close(st_w)
            os.close(err_r)
            program_child(cfg, tok_r, end_w, err_w)
        except BaseException:
            import traceback
            os.write(err_w, traceback.format_exc().encode())
        os._exit(126)
    os.close(tok_r)
    os.close(end_w)
    os.close(err_w)
    start_error = b""
    while True:
        chunk = os.read(err_r, 4096)
        if not chunk:
            break
        start_error += chunk
    os.close(err_r)
    while True:
        pid, status = os.waitpid(-1, 0)
        if pid == child:
            break
    left = False
    while True:  # anything else still alive is a descendant the program left behind
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            break
        if pid == 0:
            left = True
            break
    if left:
        if cfg["isolate"]:
            os.kill(-1, signal.SIGKILL)  # PID 1 of a namespace: every other process in it
        else:
            for _ in range(1000):  # as a subreaper every orphan is our child: kill them until none is left
                kids = _children_of(os.getpid())
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
    report = {"left": left, "start_error": start_error.decode("utf-8", "replace"),
              "exit": os.WEXITSTATUS(status) if os.WIFEXITED(status) else None,
              "signal": os.WTERMSIG(status) if os.WIFSIGNALED(status) else None}
    os.write(st_w, json.dumps(report).encode())
    os._exit(0)


def _read_all(fd, cap):
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


def run(cfg):
    token = os.urandom(16).hex().encode()
    tok_r, tok_w = os.pipe()
    end_r, end_w = os.pipe()
    st_r, st_w = os.pipe()
    os.write(tok_w, token)
    os.close(tok_w)
    me = os.getpid()
    init = os.fork()
    if init == 0:
        try:
            libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)  # the launcher's death (host timeout) kills init...
            if os.getppid() != me and not cfg["isolate"]:
                os._exit(125)
            close_fds_except((tok_r, end_w, st_w))  # ...and with it the whole PID namespace
            init_main(cfg, tok_r, end_w, st_w)
        except BaseException as e:
            os.write(2, ("sandbox init: %r\n" % (e,)).encode())
        os._exit(126)
    os.close(tok_r)
    os.close(end_w)
    os.close(st_w)

    def backstop(signum, frame):  # the host normally kills us first; this covers a host that died
        os.kill(init, signal.SIGKILL)

    signal.signal(signal.SIGALRM, backstop)
    signal.alarm(cfg["backstop_seconds"])
    while True:
        try:
            _, status = os.waitpid(init, 0)
            break
        except InterruptedError:
            continue
    signal.alarm(0)
    raw = _read_all(st_r, 4096)
    report = json.loads(raw) if raw else {"init_error": "init ended without a report (status %d)" % status}
    marker = _read_all(end_r, 4096)
    report["harness_end"] = bool(marker) and marker == token
    report["marker_written"] = bool(marker)
    return report


def main():
    cfg = json.loads(sys.stdin.buffer.read())
    null = os.open("/dev/null", os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    try:
        if cfg["isolate"]:
            isolate(cfg)
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
