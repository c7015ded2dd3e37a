"""Run what a user of the installed wheel runs, from an empty folder: every command must exit 0.

    python .ci/wheel_smoke.py README.md PATH/TO/qtulu      (the venv's console script)

The README's tour is read from README.md (between its tour markers, continuation lines joined) and
run as written on the demo's artefacts, as tests/demo/test_demo.py runs it in the checkout.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

CHAT_INPUT = "upper qtul\n/adapter successor\n/reset\nnext 2019\n/quit\n"


def run(qtulu: str, argv: list[str], stdin: str = "") -> str:
    t = time.perf_counter()
    p = subprocess.run([qtulu, *argv], input=stdin, capture_output=True, text=True)
    print(f"[{time.perf_counter() - t:5.1f}s] rc={p.returncode} qtulu {shlex.join(argv)}", flush=True)
    if p.returncode != 0:
        sys.stderr.write(p.stdout[-4000:] + p.stderr[-4000:])
        raise SystemExit(f"wheel_smoke: `qtulu {shlex.join(argv)}` exited {p.returncode}")
    return p.stdout


def tour(readme: Path) -> list[list[str]]:
    block = re.search(r"<!-- tour:start -->\s*```bash\n(.*?)```\s*<!-- tour:end -->", readme.read_text(), re.S)
    if not block:
        raise SystemExit(f"wheel_smoke: {readme}: no tour block")
    lines = block.group(1).replace("\\\n", " ").splitlines()
    return [shlex.split(x)[1:] for x in lines if x.strip().startswith("qtulu ")]


def main(readme: str, qtulu: str) -> None:
    where = subprocess.run([str(Path(qtulu).with_name("python")), "-c",
                            "import qtulu, qtulu.kernels.nf4, qtulu.evals.runner, kernels; "
                            "print(qtulu.__file__, kernels.__file__)"], capture_output=True, text=True, check=True)
    assert "site-packages" in where.stdout and "/qtulu/" in where.stdout, where.stdout  # the wheel, not a checkout
    print(where.stdout.strip())
    assert "dolly" in run(qtulu, ["recipe", "list"]).split()
    run(qtulu, ["recipe", "show", "dolly", "--preset", "smoke"])
    plan = run(qtulu, ["plan", "dolly", "--shape", "tiny"])
    json.loads(plan.strip().splitlines()[-1])  # its final JSON line
    run(qtulu, ["demo"])
    report = json.loads(Path("demo_out/report.json").read_text())
    assert report["tasks"], report
    for argv in tour(Path(readme)):
        out = run(qtulu, argv, CHAT_INPUT if argv[0] == "chat" else "")
        if argv[0] == "chat":
            assert "[upper] QTUL" in out and "[successor] 2020" in out, out[-2000:]
    run(qtulu, ["study", "demo", "--out", "study_out"])
    assert json.loads(Path("study_out/results.json").read_text())["table"]
    print("wheel_smoke: the installed wheel ran the quick start, the tour, recipe, plan and study")


if __name__ == "__main__":
    main(*sys.argv[1:])
