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

import platform
from datetime import datetime, timezone

import torch

from qtulu.bench import harness

FULL_SHAPES = [(4096, 4096), (4096, 11008), (11008, 4096), (8192, 8192)]
FULL_MS = [1, 16, 256, 4096, 16384]
TINY_SHAPES = [(256, 704)]
TINY_MS = [1, 16, 64]


def _parse(argv):
    p = harness.parser(__doc__)
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--tiny", action="store_true", help="small shapes and few iterations (smoke test)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    p.add_argument("--shapes", default=None, help="comma list of KxN, e.g. 4096x4096,4096x11008")
    p.add_argument("--ms", default=None, help="comma list of M, e.g. 1,16,256")
    p.add_argument("--iters", type=int, default=None)
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--backend", default="auto", help="qtulu backend for 'ours' (auto|triton|torch)")
    p.add_argument("--no-double-quant", action="store_true")
    return p.parse_args(argv)


class _Timer:
    """Median microseconds with L2 flushed (a 256 MiB write) before every call; peak extra memory."""

    def __init__(self, device: str, iters: int, warmup: int):
        self.iters, self.warmup = iters, warmup
        self.cuda = device == "cuda"
        self.flush_buf = torch.empty(256 * 1024 * 1024, dtype=torch.uint8, device=device) if self.cuda else None

    def time_us(self, fn) -> float:
        flush = self.flush_buf.zero_ if self.cuda else None
        return 1e6 * harness.median_seconds(fn, self.iters, self.warmup, cuda=self.cuda, before=flush)

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


def _case(k: int, n: int, m: int, dev: str, dtype, dq: bool, backend: str, timer: _Timer) -> list[dict]:
    """One weight shape (N, K) and token count M: forward and dX rows, every peer on the same inputs."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnbF

    from qtulu.kernels.nf4 import _nf4_matmul_dx_op, _state_args, nf4_matmul, quantize_nf4

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
    rows = []
    for op, fns in (("fwd", fwd), ("dX", bwd)):
        row = {"op": op, "K": k, "N": n, "M": m}
        with torch.no_grad():
            for name, fn in fns.items():
                row[f"{name}_us"] = round(timer.time_us(fn), 2)
                mem = timer.peak_extra_mib(fn)
                row[f"{name}_mem_mib"] = None if mem is None else round(mem, 2)
        rows.append(row)
    return rows  # the tensors of this case are freed on return


def _ratio(a, b):
    return None if not a or not b else a / b


def _goals(rows: list[dict]) -> list[dict]:
    """Add the ratios to each row; the issue's goals, each with its value and whether it is met."""
    goals = []
    for r in rows:
        o, a, c = r["ours_us"], r.get("a_bnb_matmul_4bit_us"), r["c_bf16_matmul_us"]
        r["ours_over_c"] = _ratio(o, c)
        r["a_over_ours"] = _ratio(a, o)
        r["b_over_ours"] = _ratio(r["b_dequant_matmul_us"], o)
        case = f"{r['op']} {r['K']}x{r['N']} M={r['M']}"
        if r["M"] >= 4096:
            goals.append({"case": case, "goal": "ours <= 1.10x (c)", "value": r["ours_over_c"],
                          "met": r["ours_over_c"] is not None and r["ours_over_c"] <= 1.10})
        if r["M"] <= 16:
            cv = _ratio(c, o)
            goals.append({"case": case, "goal": "(c)/ours >= 2.5", "value": cv, "met": cv is not None and cv >= 2.5})
            if r["op"] == "fwd":
                goals.append({"case": case, "goal": "(a)/ours >= 1.3", "value": r["a_over_ours"],
                              "met": r["a_over_ours"] is not None and r["a_over_ours"] >= 1.3})
    return goals


def _format(rows: list[dict], goals: list[dict], on_gpu: bool) -> str:
    text = harness.table(
        ["op", "KxN", "M", "ours us", "(a) us", "(b) us", "(c) us", "ours/(c)", "(a)/ours", "(b)/ours",
         "mem ours", "mem (b)", "mem (c)"],
        [[r["op"], f"{r['K']}x{r['N']}", r["M"], r["ours_us"], r.get("a_bnb_matmul_4bit_us"),
          r["b_dequant_matmul_us"], r["c_bf16_matmul_us"], r["ours_over_c"], r["a_over_ours"], r["b_over_ours"],
          r["ours_mem_mib"], r["b_dequant_matmul_mem_mib"], r["c_bf16_matmul_mem_mib"]] for r in rows],
        ["", "", "d", ".1f", ".1f", ".1f", ".1f", ".2f", ".2f", ".2f", ".1f", ".1f", ".1f"])
    met = sum(g["met"] for g in goals)
    lines = [text, f"\ngoals met: {met}/{len(goals)}" + ("" if on_gpu else "  (CPU smoke run: goals are GPU goals)")]
    lines += [f"  missed: {g['case']}: {g['goal']} (got {g['value'] if g['value'] is None else round(g['value'], 3)})"
              for g in goals if not g["met"]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    import bitsandbytes as bnb
    import triton

    from qtulu.kernels.backend import resolve_backend

    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench_nf4_matmul: no CUDA device; use --device cpu --tiny for a smoke run")
    dev, dtype, dq = args.device, getattr(torch, args.dtype), not args.no_double_quant
    shapes = TINY_SHAPES if args.tiny else FULL_SHAPES
    ms = TINY_MS if args.tiny else FULL_MS
    if args.shapes:
        shapes = [tuple(int(v) for v in s.lower().split("x")) for s in args.shapes.split(",")]
    if args.ms:
        ms = [int(v) for v in args.ms.split(",")]
    iters = args.iters or (3 if args.tiny else 50)
    timer = _Timer(dev, iters, args.warmup or (1 if args.tiny else 10))
    backend = resolve_backend(args.backend, torch.empty(0, device=dev))
    from tqdm.auto import tqdm

    rows = [row for k, n, m in tqdm([(k, n, m) for (k, n) in shapes for m in ms], desc="nf4 bench", unit="case")
            for row in _case(k, n, m, dev, dtype, dq, backend, timer)]
    goals = _goals(rows)
    met = sum(g["met"] for g in goals)
    device_name = torch.cuda.get_device_name() if dev == "cuda" else platform.processor() or platform.machine()
    return harness.finish({
        "bench": "nf4_matmul", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": device_name, "dtype": args.dtype, "backend": backend, "double_quant": dq,
        "versions": {"torch": torch.__version__, "triton": triton.__version__, "bitsandbytes": bnb.__version__},
        "iters": iters, "results": rows, "goals": goals, "goals_met": met, "goals_total": len(goals),
    }, _format(rows, goals, dev == "cuda"), args.record, title="NF4 dequant-in-GEMM matmul")


if __name__ == "__main__":
    raise SystemExit(main())
