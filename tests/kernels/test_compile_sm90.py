"""The varlen attention kernels compile for an H100 (sm_90) without a GPU, and do not spill.

On this machine the kernels only run under the Triton interpreter, which cannot show GPU-only
compile errors or register pressure. This builds the first autotune config of each kernel
(forward, dq, dk/dv; bf16, head dim 128; plain causal, and with sliding window + softcap) with Triton's real compiler and bundled ptxas, through
``qtulu.bench.compile`` (``benchmarks/compile_kernels.py``), and reads their resource usage from the cubin. (Before the
dk/dv kernel was reduced to one query loop, every one of its configs spilled registers.) The NF4
kernel has the same kind of check in ``test_nf4.py``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


_SCRIPT = r"""
import json
import qtulu.bench.compile as ck  # sets TRITON_INTERPRET aside before triton is imported

seen, rows = set(), []
cases = list(ck.varlen_cases("bfloat16", 128)) + list(ck.varlen_cases("bfloat16", 128, window=True, softcap=True))
for label, fn, sig, consts, cfg, extra, aligned in cases:
    if label in seen:
        continue
    seen.add(label)
    compiled = ck._compile(fn, sig, consts, 90, {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}, aligned)
    rows.append({"kernel": label, "config": cfg.kwargs, "shared": compiled.metadata.shared,
                 "mma": "mma" in compiled.asm["ptx"], **ck.resource_usage(compiled.asm["cubin"])})
print(json.dumps(rows))
"""


def test_varlen_kernels_compile_for_sm90_without_spills():
    triton = pytest.importorskip("triton")
    nvidia_bin = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    if not (nvidia_bin / "ptxas").exists() or not (nvidia_bin / "cuobjdump").exists():
        pytest.skip("triton's bundled ptxas/cuobjdump are absent: cannot compile for CUDA here")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(Path(os.environ.get("TMPDIR", "/tmp")) / "qtulu-triton-cache-test")
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    res = subprocess.run([sys.executable, "-c", _SCRIPT], env=env,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = json.loads(res.stdout.strip().splitlines()[-1])
    assert [r["kernel"] for r in rows] == [f"varlen {k} d128{v}" for v in ("", " window+softcap")
                                           for k in ("fwd", "dq", "dkdv")]
    for r in rows:
        assert r["mma"], f"{r['kernel']}: no tensor-core instruction in the PTX"
        assert r["shared"] <= 232448, f"{r['kernel']} {r['config']}: {r['shared']} B of shared memory"
        assert r["regs"] and r["stack"] == 0, f"{r['kernel']} {r['config']}: spills ({r})"
