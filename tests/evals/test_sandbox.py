"""The sandbox: canonical HumanEval solutions pass; hostile programs are contained and fail."""

from __future__ import annotations

import os
import time

import pytest

from qtulu.evals.sandbox import CodeExecutionRefused, SandboxConfig, isolation, run_programs
from qtulu.evals.tasks import get_task

pytestmark = pytest.mark.skipif(os.name != "posix" or not os.path.exists("/proc"),
                                reason="the sandbox needs Linux (/proc, rlimits, namespaces)")


def test_canonical_humaneval_solutions_all_pass(shared_data):
    task = get_task("codex_humaneval")
    problems = task.module.load(shared_data("eval"))
    assert len(problems) == 164
    preds = [{**p, "completions": [p["canonical_solution"]]} for p in problems]
    t0 = time.monotonic()
    metrics = task.module.score(preds, allow_code_execution=True, timeout=20.0)
    assert metrics["pass@1"] == 1.0, {k: v for k, v in metrics["per_problem"].items() if v == 0}
    assert time.monotonic() - t0 < 60
    # a wrong completion fails its tests
    wrong = [{**problems[0], "completions": ["    return None\n"]}]
    assert task.module.score(wrong, allow_code_execution=True)["pass@1"] == 0.0


def test_code_execution_is_opt_in(char_tokenizer):
    from qtulu.evals.lm import LM

    with pytest.raises(CodeExecutionRefused, match="--allow-code-execution"):
        run_programs(["print(1)"])
    task = get_task("codex_humaneval")
    ex = {"id": "t/0", "prompt": "def f():\n", "entry_point": "f", "test": "def check(c): pass", "completions": ["  pass"]}
    with pytest.raises(CodeExecutionRefused):
        task.module.score([ex])
    with pytest.raises(CodeExecutionRefused):  # refused before any generation
        task.module.predict(LM(None, char_tokenizer), [ex])


MARK = "4242.4242"  # argv of the escaping grandchild: found in /proc if it survived

HOSTILE = {
    "read_outside": "open({secret!r}).read()\nprint('read it')\n",
    "read_etc": "print(open('/etc/hostname').read())\n",
    "env": "import os\nassert os.environ['QTULU_SANDBOX_SECRET'] == 'hunter2'\n",
    "socket": "import socket\ns = socket.create_connection(('1.1.1.1', 53), timeout=2)\n",
    "fork_bomb": "import os\nwhile True:\n    os.fork()\n",
    "memory": "x = []\nwhile True:\n    x.append(bytearray(10**7))\n",
    "loop": "while True:\n    pass\n",
    "grandchild": ("import os, time\n"
                   "if os.fork() == 0:\n"
                   "    os.setsid()\n"
                   "    if os.fork() == 0:\n"
                   f"        os.execv('/usr/bin/sleep', ['sleep', '{MARK}'])\n"
                   "    os._exit(0)\n"
                   "time.sleep(0.3)\n"),
    "print_gigabytes": "import sys\nwhile True:\n    sys.stdout.write('x' * 1000000)\n",
}


def _marked_processes() -> list[int]:
    out = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if MARK.encode() in f.read():
                    out.append(int(pid))
        except OSError:
            continue
    return out


def test_hostile_programs_are_contained(tmp_path, monkeypatch):
    if not isolation().get("chroot"):
        pytest.skip("file isolation needs root (mount namespace + chroot); this run is not root")
    secret = tmp_path / "secret.txt"
    secret.write_text("top secret")
    monkeypatch.setenv("QTULU_SANDBOX_SECRET", "hunter2")
    names = list(HOSTILE)
    codes = [HOSTILE[n].format(secret=str(secret)) if n == "read_outside" else HOSTILE[n] for n in names]
    codes.append("print('still running')\n")  # the run goes on after the hostile ones
    cfg = SandboxConfig(timeout=4.0, memory_mb=512, max_processes=16, max_file_mb=4)
    t0 = time.monotonic()
    results = run_programs(codes, cfg, workers=2, allow_code_execution=True)
    elapsed = time.monotonic() - t0
    for name, r in zip(names, results):
        assert not r.passed, (name, r)
        assert len(r.stdout) <= cfg.max_output_bytes and "top secret" not in r.stdout and "hunter2" not in r.stdout
    by = dict(zip(names, results))
    assert by["loop"].status == "timeout"
    assert "left processes running" in by["grandchild"].stderr
    assert not _marked_processes()  # the escaped grandchild is gone
    assert results[-1].passed and results[-1].stdout == "still running\n"
    assert elapsed < 30
    assert secret.read_text() == "top secret"


def test_isolation_layers_reported():
    iso = isolation()
    assert set(iso) >= {"netns", "pidns", "chroot"}
    if os.geteuid() == 0:  # root in this CI: every layer must be on, not silently degraded
        assert iso["netns"] and iso["pidns"] and iso["chroot"], iso
