"""Compile every autotune config of qtulu's Triton kernels for a CUDA architecture, without a GPU.

The kernels only *run* under the Triton interpreter on a CPU; this script takes each config the
GPU autotuner would try (NF4 GEMM: small-M and tiled paths, forward and dX; varlen attention:
forward, dq, dk/dv) through Triton's real compiler for ``sm_<arch>`` (with the ``ptxas`` that
ships with Triton), and reports per config:

* compile errors (a GPU-only failure cannot hide behind the interpreter);
* shared memory (Triton's dynamic shared memory), against the device's per-block limit: a config
  over it is skipped by the autotuner at run time, so it is only wasted compile time;
* registers per thread and the stack frame (where spilled registers go) from ``cuobjdump
  --dump-resource-usage`` on the cubin: a config that spills is a slow candidate.

    python benchmarks/compile_kernels.py                  # sm_90 (H100/H200), bf16
    python benchmarks/compile_kernels.py --arch 90 --dtype float16 --kernels nf4

Prints a table and a final JSON line; exit status 1 if any config failed to compile. Run it under
each Triton version the code must support (the GPU image's is older than this machine's).
The logic lives here (``qtulu.bench.compile``) so that the tests import it as a module;
``benchmarks/compile_kernels.py`` is the script.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from qtulu.bench import harness

# the interpreter must be off before triton and the kernels are imported: the kernels build their
# GPU autotune lists only when not interpreting
os.environ.pop("TRITON_INTERPRET", None)

# per-block dynamic shared memory on the architectures we target (bytes; CUDA's
# sharedMemPerBlockOptin): sm_80 A100 163 KB, sm_89 99 KB, sm_90 H100/H200 227 KB
SMEM_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448}
TT = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}


def _tool(name: str) -> Path:
    import triton

    return Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name


def resource_usage(cubin: bytes) -> dict:
    """Registers per thread and stack frame bytes of the kernel in ``cubin``, read by the
    ``cuobjdump`` that ships with Triton (the stack frame holds the spilled registers)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "k.cubin"
        path.write_bytes(cubin)
        res = subprocess.run([str(_tool("cuobjdump")), "--dump-resource-usage", str(path)],
                             capture_output=True, text=True, timeout=120)
    if res.returncode != 0:
        raise RuntimeError(f"cuobjdump failed: {(res.stdout + res.stderr).strip()[-200:]}")
    regs = re.search(r"REG:(\d+)", res.stdout)
    stack = re.search(r"STACK:(\d+)", res.stdout)
    return {"regs": int(regs.group(1)) if regs else None, "stack": int(stack.group(1)) if stack else None}


def _compile(fn, sig: dict, consts: dict, arch: int, options: dict, aligned_ints=()):
    """Compile as the JIT would for a launch whose pointers are 16-byte aligned and whose
    ``aligned_ints`` (strides, feature sizes) are multiples of 16: the JIT passes these facts to
    the compiler as ``tt.divisibility`` hints, and vectorized loads depend on them."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = fn.arg_names
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n, t in sig.items()
             if t.startswith("*") or n in aligned_ints}
    src = ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)


def nf4_cases(dtype: str):
    """(label, jit fn, signature, constexprs, config) for every NF4 GEMM autotune config."""
    import qtulu.kernels.nf4 as m

    tt = TT[dtype]
    fn = m._nf4_gemm_kernel
    for path, tuner in m._KERNELS.items():
        small = path == "small"
        for transpose, op in ((True, "fwd"), (False, "dX")):
            for cfg in tuner.configs:
                ptrs = {"a_ptr": f"*{tt}", "packed_ptr": "*u8", "absmax_ptr": "*u8", "code_ptr": "*fp32",
                        "offset_ptr": "*fp32", "absmax2_ptr": "*fp32", "code2_ptr": "*fp32",
                        "bias_ptr": f"*{tt}", "c_ptr": "*fp32" if small else f"*{tt}"}
                consts = dict(TRANSPOSE_W=transpose, HAS_BIAS=transpose, NESTED=True, BLOCKSIZE=64,
                              BLOCKSIZE2=256, IEEE=dtype == "float32", ATOMIC=small, INTERPRET_BF16=False,
                              INDEX64=False, ALIGNED=True, **cfg.kwargs)
                sig = {n: ptrs.get(n, "constexpr" if n in consts else "i32") for n in fn.arg_names}
                # LLaMA shapes: N, K, the row strides are multiples of 16; M (tokens) may not be
                yield (f"nf4 {path} {op}", fn, sig, consts, cfg, {"enable_fp_fusion": False},
                       ("N", "K", "W_COLS", "stride_am", "stride_cm"))


def varlen_cases(dtype: str, head_dim: int, window: bool = False, softcap: bool = False):
    """The same for the varlen attention kernels (forward, dq, dk/dv); ``window`` / ``softcap``
    build the sliding-window / logit-softcapping variants (Mistral, Gemma-2) instead."""
    import triton

    import qtulu.kernels.varlen_attention_triton as va

    variant = "+".join(n for n, on in (("window", window), ("softcap", softcap)) if on)

    tt = TT[dtype]
    kernels = {
        "fwd": (va._varlen_fwd_kernel, ["Q", "K", "V", "O"], va._fwd_configs(bool(variant))),
        "dq": (va._varlen_bwd_dq_kernel, ["Q", "K", "V", "DO", "DQ"], va._bwd_configs("dq", bool(variant))),
        "dkdv": (va._varlen_bwd_dkdv_kernel, ["Q", "K", "V", "DO", "DK", "DV"],
                 va._bwd_configs("dkdv", bool(variant))),
    }
    for name, (fn, tensors, configs) in kernels.items():
        for cfg in configs:
            consts = dict(GROUP=4, HEAD_DIM=head_dim, BLOCK_D=triton.next_power_of_2(head_dim), IS_CAUSAL=True,
                          HAS_WINDOW=window, HAS_SOFTCAP=softcap,
                          PRECISION="ieee" if tt == "fp32" else None, UPCAST=False, INDEX64=False,
                          **cfg.kwargs)
            sig = {}
            for arg in fn.arg_names:
                if arg in consts:
                    sig[arg] = "constexpr"
                elif arg in tensors:
                    sig[arg] = f"*{tt}"
                elif arg in ("LSE", "DELTA"):
                    sig[arg] = "*fp32"
                elif arg == "CU":
                    sig[arg] = "*i32"
                elif arg in ("qk_scale", "sm_scale", "cap_in", "cap_out"):
                    sig[arg] = "fp32"
                else:
                    sig[arg] = "i32"
            yield (f"varlen {name} d{head_dim}" + (f" {variant}" if variant else ""), fn, sig, consts, cfg, {},
                   tuple(a for a in fn.arg_names if a.startswith("stride_")))


def run(arch: int, dtype: str, kernels: list[str], head_dim: int, limit: int | None = None) -> dict:
    import triton

    for tool in ("ptxas", "cuobjdump"):
        if not _tool(tool).exists():
            raise SystemExit(f"triton's bundled {tool} is absent ({_tool(tool)}): cannot compile for CUDA here")
    smem_limit = SMEM_LIMIT.get(arch)
    cases = []
    if "nf4" in kernels:
        cases += list(nf4_cases(dtype))
    if "varlen" in kernels:
        cases += list(varlen_cases(dtype, head_dim))
        cases += list(varlen_cases(dtype, head_dim, window=True, softcap=True))
    if limit:
        cases = cases[:limit]
    try:
        from tqdm.auto import tqdm

        it = tqdm(cases, desc=f"compiling for sm_{arch}", unit="config", file=sys.stderr)
    except ImportError:  # pragma: no cover
        it = cases
    rows = [_compile_row(case, arch, smem_limit) for case in it]
    failures = sum(r["status"].startswith("FAILED") for r in rows)
    summary = {
        "bench": "compile_kernels", "arch": arch, "dtype": dtype, "head_dim": head_dim,
        "triton": triton.__version__, "smem_limit": smem_limit, "configs": len(rows), "failures": failures,
        "over_smem": sum("over smem" in r["status"] for r in rows),
        "spilling": sum("spills" in r["status"] for r in rows), "rows": rows,
    }
    return summary


def _compile_row(case, arch: int, smem_limit: int | None) -> dict:
    """Compile one config; its shared memory, registers, stack, and a status that names a failure."""
    label, fn, sig, consts, cfg, extra, aligned_ints = case
    row = {"kernel": label, "config": cfg.kwargs, "warps": cfg.num_warps, "stages": cfg.num_stages}
    t0 = time.perf_counter()
    try:
        options = {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages, **extra}
        compiled = _compile(fn, sig, consts, arch, options, aligned_ints)
        row["shared"] = int(compiled.metadata.shared)
        row.update(resource_usage(compiled.asm["cubin"]))
        row["tensor_cores"] = "mma" in compiled.asm["ptx"]
        flags = []
        if smem_limit and row["shared"] > smem_limit:
            flags.append("over smem (skipped at run time)")
        if row["stack"]:
            flags.append("spills")
        if not row["tensor_cores"]:
            flags.append("no mma")
        row["status"] = "ok" + (f" ({', '.join(flags)})" if flags else "")
    except Exception as exc:  # report every failing config, not only the first
        row["status"] = f"FAILED {type(exc).__name__}: {str(exc).strip().splitlines()[0][:100] if str(exc).strip() else ''}"
    row["seconds"] = round(time.perf_counter() - t0, 2)
    return row


def format_rows(summary: dict) -> str:
    """The table of configs, and a line of totals."""
    text = harness.table(
        ["kernel", "config", "w", "s", "smem KiB", "regs", "stack B", "status"],
        [[r["kernel"], ",".join(f"{k}={v}" for k, v in r["config"].items()), r["warps"], r["stages"],
          r["shared"] / 1024 if "shared" in r else None, r.get("regs"), r.get("stack"), r["status"]]
         for r in summary["rows"]],
        ["", "", "d", "d", ".0f", "d", "d", ""], left=(0, 1, -1))
    return (text + f"\n\n{summary['configs']} configs, {summary['failures']} failed to compile, "
            f"{summary['over_smem']} over shared memory, {summary['spilling']} spill registers "
            f"(triton {summary['triton']}, sm_{summary['arch']}, {summary['dtype']})")


def main(argv=None) -> int:
    p = harness.parser(__doc__.split("\n\n")[0])
    p.add_argument("--arch", type=int, default=90, help="CUDA compute capability x10 (default 90: H100/H200)")
    p.add_argument("--dtype", default="bfloat16", choices=list(TT))
    p.add_argument("--kernels", default="nf4,varlen", help="comma list: nf4, varlen")
    p.add_argument("--head-dim", type=int, default=128, help="varlen attention head dim (default 128)")
    p.add_argument("--limit", type=int, default=None, help="compile only the first N configs")
    args = p.parse_args(argv)
    kernels = [k.strip() for k in args.kernels.split(",") if k.strip()]
    bad = set(kernels) - {"nf4", "varlen"}
    if bad:
        p.error(f"unknown kernels {sorted(bad)}; choose from nf4, varlen")
    summary = run(args.arch, args.dtype, kernels, args.head_dim, args.limit)
    harness.finish(summary, format_rows(summary), args.record, title=f"Triton kernels compiled for sm_{args.arch}")
    return 1 if summary["failures"] else 0
