"""The sandbox: canonical HumanEval solutions pass; code execution is opt-in and isolated or refused;
the isolation used is recorded; private uids never collide. Hostile programs: test_sandbox_hostile.py."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import pytest

from qtulu.evals.sandbox import (
    CodeExecutionRefused,
    IsolationUnavailable,
    SandboxConfig,
    isolation,
    run_programs,
    uids,
)
from qtulu.evals.tasks import get_task

pytestmark = pytest.mark.skipif(os.name != "posix" or not os.path.exists("/proc"),
                                reason="the sandbox needs Linux (/proc, rlimits, namespaces)")


def test_canonical_humaneval_solutions_all_pass(shared_data, require_namespaces):
    task = get_task("codex_humaneval")
    problems = task.module.load(shared_data("eval"))
    assert len(problems) == 164
    preds = [{**p, "completions": [p["canonical_solution"]]} for p in problems]
    t0 = time.monotonic()
    metrics = task.module.score(preds, allow_code_execution=True, timeout=20.0, workers=2, data_dir=shared_data("eval"))
    assert metrics["pass@1"] == 1.0, {k: v for k, v in metrics["per_problem"].items() if v == 0}
    assert metrics["statuses"] == {"passed": 164}
    assert metrics["isolation"]["level"] == "full"  # recorded with the metrics (results.json)
    assert time.monotonic() - t0 < 90
    # a wrong completion fails its tests
    wrong = [{**problems[0], "completions": ["    return None\n"]}]
    assert task.module.score(wrong, allow_code_execution=True)["pass@1"] == 0.0


def test_program_is_human_evals_check_program():
    # openai/human-eval human_eval/execution.py (6d43fb9): prompt + completion + "\n" + test + "\n" + check(entry)
    from qtulu.evals.tasks.codex_humaneval import program

    ex = {"prompt": "def f(x):\n", "test": "def check(c):\n    assert c(1) == 2\n", "entry_point": "f"}
    assert program(ex, "    return x + 1") == ex["prompt"] + "    return x + 1" + "\n" + ex["test"] + "\n" + "check(f)\n"


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


def test_isolation_layers_reported(require_namespaces):
    iso = isolation()
    assert iso["level"] == "full"
    assert set(iso["namespaces"]) == {"mount", "pid", "network", "ipc", "uts"}
    if os.geteuid() == 0 and _writable_memory_cgroup():
        assert iso["cgroup"] in ("v1", "v2"), iso  # a machine with a writable memory cgroup must use it


def _writable_memory_cgroup() -> bool:
    v1, v2 = "/sys/fs/cgroup/memory", "/sys/fs/cgroup/cgroup.controllers"
    if os.path.isdir(v1):
        return os.access(v1, os.W_OK)
    return os.path.exists(v2) and "memory" in open(v2).read().split() and os.access("/sys/fs/cgroup", os.W_OK)


def test_isolation_is_written_into_the_report():
    from qtulu.evals.report import markdown_table

    iso = {"level": "full", "namespaces": ["mount", "pid"], "filesystem": "chroot", "uid": "private", "memory": "cgroup v1"}
    res = {"results": {"m": {"codex_humaneval": {"score": 0.5, "isolation": iso}}}, "versions": {"codex_humaneval": "1.0"}}
    assert "Code execution (m/codex_humaneval): isolated (mount, pid namespaces" in markdown_table(res)
    res["results"]["m"]["codex_humaneval"]["isolation"] = {"level": "none", "reason": "not root"}
    assert "NOT isolated (--unsafe-no-isolation: not root)" in markdown_table(res)


_UNPRIVILEGED = shutil.which("unshare")


def _as_unprivileged(args: list[str], **kw) -> subprocess.CompletedProcess:
    """Run ``args`` in a fresh user namespace: euid 65534, no capability on the host (a non-root user)."""
    if not _UNPRIVILEGED or subprocess.run(["unshare", "--user", "true"], capture_output=True).returncode:
        pytest.skip("cannot start an unprivileged process here (unshare --user)")
    return subprocess.run(["unshare", "--user", *args], capture_output=True, text=True, timeout=120, **kw)


def test_without_privileges_code_execution_is_refused_unless_unsafe(tmp_path, shared_data):
    problems = get_task("codex_humaneval").module.load(shared_data("eval"))
    preds = tmp_path / "p.jsonl"
    preds.write_text("".join(json.dumps({**p, "id": p["task_id"], "completions": [p["canonical_solution"], "    pass\nraise SystemExit\n"]})
                             + "\n" for p in problems[:2]))
    cmd = [sys.executable, "-m", "qtulu.cli", "eval", "score", "--task", "codex_humaneval", "--predictions", str(preds),
           "--allow-code-execution", "--out", str(tmp_path / "m.json")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    refused = _as_unprivileged(cmd, env=env)
    assert refused.returncode == 2, refused.stderr
    assert refused.stderr.count("\n") == 1 and "--unsafe-no-isolation" in refused.stderr and "not root" in refused.stderr
    assert "Traceback" not in refused.stderr and not (tmp_path / "m.json").exists()
    unsafe = _as_unprivileged(cmd + ["--unsafe-no-isolation"], env=env)
    assert unsafe.returncode == 0, unsafe.stderr
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert metrics["isolation"]["level"] == "none" and metrics["isolation"]["unsafe_no_isolation"]
    assert metrics["per_problem"] == {problems[0]["task_id"]: 1, problems[1]["task_id"]: 1}  # the SystemExit cheats fail
    assert metrics["statuses"] == {"passed": 2, "failed": 2}


def test_unsafe_mode_still_judges_by_the_harness(tmp_path):
    """Unisolated (as a non-root user would run it): exit-0 cheats still fail, leftovers are killed."""
    script = tmp_path / "run.py"
    script.write_text(
        "import json\n"
        "from qtulu.evals.sandbox import SandboxConfig, run_programs\n"
        "codes = ['print(7)', 'import os\\nos._exit(0)', 'raise SystemExit(0)', 'import sys\\nsys.exit(0)',\n"
        "         'import os, time\\nif os.fork() == 0:\\n    time.sleep(30)\\n', 'import socket\\nsocket.socket()']\n"
        "rs = run_programs(codes, SandboxConfig(timeout=10), workers=2, allow_code_execution=True, unsafe_no_isolation=True)\n"
        "print(json.dumps([[r.status, r.reason, r.stdout, r.isolation['level']] for r in rs]))\n")
    proc = _as_unprivileged([sys.executable, str(script)], env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout.strip().splitlines()[-1])
    assert rows[0] == ["passed", "the test harness reached its end", "7\n", "none"]
    assert [r[0] for r in rows[1:]] == ["failed"] * 5, rows
    assert "did not reach its end" in rows[1][1] and "SystemExit" in rows[2][1] and "SystemExit: 0" in rows[3][1]
    assert "left processes" in rows[4][1]
    assert "network access is disabled" in rows[5][1]


def test_isolated_run_refuses_without_isolation_before_running(monkeypatch):
    import qtulu.evals.sandbox as sb

    monkeypatch.setattr(sb, "_probed", {"namespaces": False, "reason": "not root (test)", "cgroup": sb.cgroup.Support(None)})
    with pytest.raises(IsolationUnavailable, match="--unsafe-no-isolation"):
        run_programs(["print(1)"], allow_code_execution=True)
    from qtulu.evals.runner import check_requirements

    with pytest.raises(IsolationUnavailable):  # evaluate() refuses before loading or generating anything
        check_requirements(["codex_humaneval"], allow_code_execution=True)
    check_requirements(["codex_humaneval"], allow_code_execution=True, unsafe_no_isolation=True)


def test_private_uids_never_collide_across_processes(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("private uids are allocated by root only")
    # another "eval" (process) holds 20 uids; ours must get 20 others, and a released uid is not handed out at once
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys\nfrom qtulu.evals.sandbox import uids\n"
         "ls = [uids.acquire() for _ in range(20)]\nprint(' '.join(str(x.uid) for x in ls), flush=True)\nsys.stdin.read()\n"
         "for x in ls:\n    x.release()\n"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        theirs = {int(x) for x in holder.stdout.readline().split()}
        assert len(theirs) == 20
        uids._next[0] = min(theirs) - uids.UID_BASE  # start our walk right on their uids
        ours = [uids.acquire() for _ in range(20)]
        assert not theirs & {x.uid for x in ours} and len({x.uid for x in ours}) == 20
        released = ours[0].uid
        ours[0].release()
        again = uids.acquire()
        assert again.uid != released
        ours[0] = again
        # a uid with a live process (a leftover) is skipped
        busy = max(x.uid for x in ours) + 1
        sleeper = subprocess.Popen(["sleep", "30"], user=busy)
        try:
            uids._next[0] = busy - uids.UID_BASE
            got = uids.acquire()
            assert got.uid != busy
            got.release()
        finally:
            sleeper.kill()
            sleeper.wait()
        for x in ours:
            x.release()
        assert not any(os.path.exists(x.path) for x in ours)  # lock files do not pile up
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)


def test_concurrent_runs_use_distinct_uids(require_namespaces):
    results = run_programs(["import time\ntime.sleep(0.5)\n"] * 4, SandboxConfig(timeout=10), workers=4,
                           allow_code_execution=True)
    assert all(r.passed for r in results), [r.reason for r in results]
    assert len({r.isolation["uid"] for r in results}) == 4
