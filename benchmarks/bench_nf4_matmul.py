"""Benchmark qtulu's NF4 dequant-in-GEMM (forward and dX) against its peers.

Peers, timed in the same run on the same inputs:
  (a) ``bitsandbytes.matmul_4bit`` (bnb's own 4-bit path: a GEMV kernel for one row, else
      dequantize + cuBLAS). For dX bnb's autograd does exactly (b), so (a) is timed for the
      forward only.
  (b) ``bitsandbytes.functional.dequantize_4bit`` + ``torch.matmul`` (what Unsloth/Axolotl do),
  (c) ``torch.matmul`` on the bf16 weight (the ceiling; needs the 2-byte weight in memory).

Timing: CUDA events around each call, L2 flushed (a 256 MiB write) before every call, median of
``--iters``. Memory: peak allocated during one call minus allocated before it, output included.
Prints a table of times and ratios, the issue's goals, and a final JSON line.

  python benchmarks/bench_nf4_matmul.py                       # full grid on CUDA
  python benchmarks/bench_nf4_matmul.py --device cpu --tiny   # smoke run of the script on a CPU

Shapes are ``K x N`` = in_features x out_features (4096x11008 = LLaMA-7B up/gate_proj).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from datetime import datetime, timezone

import torch

FULL_SHAPES = [(4096, 4096), (4096, 11008), (11008, 4096), (8192, 8192)]
FULL_MS = [1, 16, 256, 4096, 16384]
TINY_SHAPES = [(256, 704)]
TINY_MS = [1, 16, 64]


def _parse():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--tiny", action="store_true", help="small shapes and few iterations (smoke test)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    p.add_argument("--shapes", default=None, help="comma list of KxN, e.g. 4096x4096,4096x11008")
    p.add_argument("--ms", default=None, help="comma list of M, e.g. 1,16,256")
    p.add_argument("--iters", type=int, default=None)
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--backend", default="auto", help="qtulu backend for 'ours' (auto|triton|torch)")
    p.add_argument("--no-double-quant", action="store_true")
    return p.parse_args()


class _Timer:
    def __init__(self, device: str, iters: int, warmup: int):
        self.device, self.iters, self.warmup = device, iters, warmup
        self.cuda = device == "cuda"
        if self.cuda:
            self.flush_buf = torch.empty(256 * 1024 * 1024, dtype=torch.uint8, device=device)

    def _flush(self):
        if self.cuda:
            self.flush_buf.zero_()

    def time_us(self, fn) -> float:
        for _ in range(self.warmup):
            fn()
        times = []
        for _ in range(self.iters):
            self._flush()
            if self.cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end) * 1e3)
            else:
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e6)
        return statistics.median(times)

    def peak_extra_mib(self, fn) -> float | None:
        if not self.cuda:
            return None
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        out = fn()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        del out
        return (peak - before) / 2**20


def main() -> int:
    args = _parse()
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnbF

    from qtulu.kernels.nf4 import _nf4_matmul_dx_op, _state_args, nf4_matmul, quantize_nf4

    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench_nf4_matmul: no CUDA device; use --device cpu --tiny for a smoke run")
    dev = args.device
    dtype = getattr(torch, args.dtype)
    shapes = TINY_SHAPES if args.tiny else FULL_SHAPES
    ms = TINY_MS if args.tiny else FULL_MS
    if args.shapes:
        shapes = [tuple(int(v) for v in s.lower().split("x")) for s in args.shapes.split(",")]
    if args.ms:
        ms = [int(v) for v in args.ms.split(",")]
    iters = args.iters or (3 if args.tiny else 50)
    warmup = args.warmup or (1 if args.tiny else 10)
    timer = _Timer(dev, iters, warmup)
    from qtulu.kernels.backend import resolve_backend

    backend = resolve_backend(args.backend, torch.empty(0, device=dev))
    dq = not args.no_double_quant

    rows = []
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        tqdm = None
    grid = [(k, n, m) for (k, n) in shapes for m in ms]
    it = tqdm(grid, desc="nf4 bench", unit="case") if tqdm else grid
    for k, n, m in it:
        torch.manual_seed(0)
        w = (torch.randn(n, k, device=dev) * 0.02).to(dtype)  # (N, K)
        packed, state = quantize_nf4(w, blocksize=64, double_quant=dq)
        qs = state.to_bnb()
        x = torch.randn(m, k, device=dev, dtype=dtype)  # (M, K)
        dy = torch.randn(m, n, device=dev, dtype=dtype)  # (M, N)
        sargs = _state_args(state)

        fwd = {
            "ours": lambda: nf4_matmul(x, packed, state, backend=backend),
            "a_bnb_matmul_4bit": lambda: bnb.matmul_4bit(x, packed.t(), quant_state=qs),
            "b_dequant_matmul": lambda: torch.matmul(x, bnbF.dequantize_4bit(packed, qs).t()),
            "c_bf16_matmul": lambda: torch.matmul(x, w.t()),
        }
        bwd = {
            "ours": lambda: _nf4_matmul_dx_op(dy, packed, *sargs, n, k, state.blocksize, state.blocksize2, backend),
            "b_dequant_matmul": lambda: torch.matmul(dy, bnbF.dequantize_4bit(packed, qs)),
            "c_bf16_matmul": lambda: torch.matmul(dy, w),
        }
        for op, fns in (("fwd", fwd), ("dX", bwd)):
            row = {"op": op, "K": k, "N": n, "M": m}
            with torch.no_grad():
                for name, fn in fns.items():
                    row[f"{name}_us"] = round(timer.time_us(fn), 2)
                    mem = timer.peak_extra_mib(fn)
                    row[f"{name}_mem_mib"] = None if mem is None else round(mem, 2)
            rows.append(row)
        del w, packed, state, qs, x, dy

    # --- table ---------------------------------------------------------------------------------
    def ratio(a, b):
        return None if not a or not b else a / b

    hdr = (
        f"{'op':<4} {'KxN':>11} {'M':>6} | {'ours us':>9} {'(a) us':>9} {'(b) us':>9} {'(c) us':>9} | "
        f"{'ours/(c)':>8} {'(a)/ours':>8} {'(b)/ours':>8} | {'mem ours':>8} {'mem (b)':>8} {'mem (c)':>8}"
    )
    print(hdr)
    print("-" * len(hdr))
    goals = []
    for r in rows:
        o, a, b, c = r["ours_us"], r.get("a_bnb_matmul_4bit_us"), r["b_dequant_matmul_us"], r["c_bf16_matmul_us"]
        r["ours_over_c"] = ratio(o, c)
        r["a_over_ours"] = ratio(a, o)
        r["b_over_ours"] = ratio(b, o)
        fmt = lambda v, p=2: "-" if v is None else f"{v:.{p}f}"  # noqa: E731
        print(
            f"{r['op']:<4} {str(r['K']) + 'x' + str(r['N']):>11} {r['M']:>6} | {fmt(o,1):>9} {fmt(a,1):>9} "
            f"{fmt(b,1):>9} {fmt(c,1):>9} | {fmt(r['ours_over_c']):>8} {fmt(r['a_over_ours']):>8} "
            f"{fmt(r['b_over_ours']):>8} | {fmt(r['ours_mem_mib'],1):>8} {fmt(r['b_dequant_matmul_mem_mib'],1):>8} "
            f"{fmt(r['c_bf16_matmul_mem_mib'],1):>8}"
        )
        if r["M"] >= 4096:
            goals.append({"case": f"{r['op']} {r['K']}x{r['N']} M={r['M']}", "goal": "ours <= 1.10x (c)",
                          "value": r["ours_over_c"], "met": r["ours_over_c"] is not None and r["ours_over_c"] <= 1.10})
        if r["M"] <= 16:
            cv = ratio(c, o)
            goals.append({"case": f"{r['op']} {r['K']}x{r['N']} M={r['M']}", "goal": "(c)/ours >= 2.5",
                          "value": cv, "met": cv is not None and cv >= 2.5})
            if r["op"] == "fwd":
                goals.append({"case": f"fwd {r['K']}x{r['N']} M={r['M']}", "goal": "(a)/ours >= 1.3",
                              "value": r["a_over_ours"], "met": r["a_over_ours"] is not None and r["a_over_ours"] >= 1.3})
    met = sum(g["met"] for g in goals)
    print(f"\ngoals met: {met}/{len(goals)}" + ("" if dev == "cuda" else "  (CPU smoke run: goals are GPU goals)"))
    for g in goals:
        if not g["met"]:
            print(f"  missed: {g['case']}: {g['goal']} (got {g['value'] if g['value'] is None else round(g['value'], 3)})")

    device_name = torch.cuda.get_device_name() if dev == "cuda" else platform.processor() or platform.machine()
    import triton

    print(json.dumps({
        "bench": "nf4_matmul",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": device_name,
        "dtype": args.dtype,
        "backend": backend,
        "double_quant": dq,
        "versions": {"torch": torch.__version__, "triton": triton.__version__, "bitsandbytes": bnb.__version__},
        "iters": iters,
        "results": rows,
        "goals": goals,
        "goals_met": met,
        "goals_total": len(goals),
    }))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
