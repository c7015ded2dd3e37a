"""Benchmark: packed (varlen) causal attention, qtulu's Triton kernel against its peers.

For 16k total tokens made of documents of one fixed length (512, 2048, 4096) or of the real
length distribution of the instruction sources in ../shared/data/sources (LLaMA tokenizer,
Tulu chat format), head dim 128, 32 heads (MHA) and 32/8 (GQA), it times forward and
forward+backward of:

* ``qtulu``        qtulu.kernels.varlen_attention (Triton) on the packed tokens;
* ``sdpa_padded``  torch SDPA (``is_causal``) on the same documents padded into a batch;
* ``flex``         FlexAttention (compiled) on the packed tokens with a document-causal BlockMask;
* ``flash_attn``   flash-attn's ``flash_attn_varlen_func``, when it is importable.

FLOPs are counted as flash-attention's benchmark does: forward 4 * s^2 * heads * head_dim per
document, halved for causal; backward 2.5 x forward (so forward+backward is 3.5 x forward).
The same useful FLOPs are credited to every method (padding is the padded method's cost).
Prints a table (medians), the qtulu/peer ratios, and a final JSON line.

    python benchmarks/bench_varlen_attention.py                 # GPU, full
    python benchmarks/bench_varlen_attention.py --smoke         # CPU: tiny, proves it runs
    python benchmarks/bench_varlen_attention.py --compile-only 90   # CPU: compile for H100
                                                  # (= benchmarks/compile_kernels.py --kernels varlen)

The GPU machine may not see ../shared/data: write the real lengths here with
``--dump-lengths lengths.json`` and pass ``--lengths-file lengths.json`` there.
"""

from __future__ import annotations

import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

from qtulu.bench import harness

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data"


# ------------------------------------------------------------------------- real lengths


def _source_texts(sources: Path):
    """(user, assistant) text pairs from the native formats of the shared instruction sources."""
    for path in sorted(sources.iterdir()):
        if path.suffix == ".json":
            rows = json.loads(path.read_text())
        elif path.suffix == ".jsonl":
            rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        else:
            continue
        for row in rows:
            if "conversations" in row:  # ShareGPT
                turns = [t.get("value", "") for t in row["conversations"]]
                yield turns
            elif "instances" in row:  # Self-Instruct
                inst = row["instances"][0] if row["instances"] else {}
                yield [f"{row['instruction']}\n{inst.get('input', '')}".strip(), inst.get("output", "")]
            else:  # Alpaca (LIMA keeps earlier turns in history)
                turns = []
                for user, assistant in row.get("history") or []:
                    turns += [user, assistant]
                turns += [f"{row.get('instruction', '')}\n{row.get('input', '')}".strip(),
                          row.get("output", "")]
                yield turns


def real_lengths(data_dir: Path, max_len: int = 4096) -> list[int]:
    """Token lengths of every example of ../shared/data/sources in the Tulu chat format."""
    import sentencepiece as spm

    tok_path = data_dir / "tokenizers" / "llama" / "tokenizer.model"
    sources = data_dir / "sources"
    if not tok_path.exists() or not sources.exists():
        raise FileNotFoundError(f"need {tok_path} and {sources} (or pass --lengths-file)")
    sp = spm.SentencePieceProcessor(model_file=str(tok_path))
    lengths = []
    for turns in _source_texts(sources):
        text = "".join(
            f"<|{'user' if i % 2 == 0 else 'assistant'}|>\n{t}\n" for i, t in enumerate(turns)
        )
        n = len(sp.encode(text)) + 2  # bos + eos
        lengths.append(min(n, max_len))
    return lengths


def pack_documents(lengths: list[int], total: int, seed: int = 0) -> list[int]:
    """Draw documents (with replacement) until exactly ``total`` tokens; the last is cut."""
    rng = random.Random(seed)
    docs, used = [], 0
    while used < total:
        n = min(rng.choice(lengths), total - used)
        docs.append(n)
        used += n
    return docs


# -------------------------------------------------------------------------------- methods


def make_methods(docs, heads, kv_heads, head_dim, dtype, device, wanted):
    """{name: (forward_fn, fwd_bwd_fn) or reason-string}, all on the same random tensors."""
    import torch
    import torch.nn.functional as F

    total = sum(docs)
    gen = torch.Generator(device="cpu").manual_seed(0)
    q = torch.randn(total, heads, head_dim, generator=gen).to(device, dtype)  # (T, H, D)
    k = torch.randn(total, kv_heads, head_dim, generator=gen).to(device, dtype)  # (T, Hkv, D)
    v = torch.randn(total, kv_heads, head_dim, generator=gen).to(device, dtype)  # (T, Hkv, D)
    do = torch.randn(total, heads, head_dim, generator=gen).to(device, dtype)  # (T, H, D)
    cu = torch.tensor([0] + list(_cumsum(docs)), dtype=torch.int32, device=device)
    max_len = max(docs)
    methods: dict = {}

    def with_grad(fn, inputs, grad):
        leaves = [t.detach().requires_grad_() for t in inputs]
        plain = [t.detach() for t in inputs]  # forward-only timing: no autograd bookkeeping

        def fwd():
            with torch.no_grad():
                fn(*plain)

        def fwd_bwd():
            out = fn(*leaves)
            torch.autograd.backward(out, grad)
            for t in leaves:
                t.grad = None

        def check():
            with torch.no_grad():
                return fn(*plain)

        return fwd, fwd_bwd, check

    if "qtulu" in wanted:
        from qtulu.kernels.varlen_attention import varlen_attention

        methods["qtulu"] = with_grad(
            lambda a, b, c: varlen_attention(a, b, c, cu, max_len, causal=True, backend="triton"),
            (q, k, v), do,
        )

    if "sdpa_padded" in wanted:
        # padded layout (B, H, L, D): right padding, so is_causal alone keeps pads out of reach
        batch = len(docs)
        index = torch.cat([torch.arange(n, device=device) + i * max_len for i, n in enumerate(docs)])

        def to_padded(x):
            out = x.new_zeros(batch * max_len, *x.shape[1:])
            out[index] = x
            return out.view(batch, max_len, *x.shape[1:]).transpose(1, 2)  # (B, H, L, D)

        qp, kp, vp, dop = (to_padded(t).contiguous() for t in (q, k, v, do))
        sdpa_kw = {"enable_gqa": True} if kv_heads != heads else {}
        fwd, fwd_bwd, _ = with_grad(
            lambda a, b, c: F.scaled_dot_product_attention(a, b, c, is_causal=True, **sdpa_kw),
            (qp, kp, vp), dop,
        )

        def check():  # back to packed for the agreement check
            with torch.no_grad():
                o = F.scaled_dot_product_attention(qp, kp, vp, is_causal=True, **sdpa_kw)
            return o.transpose(1, 2).reshape(batch * max_len, heads, head_dim)[index]

        methods["sdpa_padded"] = (fwd, fwd_bwd, check)

    if "flex" in wanted:
        try:
            from torch.nn.attention.flex_attention import create_block_mask, flex_attention

            doc_id = torch.repeat_interleave(
                torch.arange(len(docs), device=device), torch.tensor(docs, device=device)
            )

            def document_causal(b, h, q_idx, kv_idx):
                return (doc_id[q_idx] == doc_id[kv_idx]) & (q_idx >= kv_idx)

            block_mask = create_block_mask(document_causal, None, None, total, total, device=device)
            flex = torch.compile(flex_attention, dynamic=False)
            flex_gqa = kv_heads != heads

            def run_flex(a, b, c):
                o = flex(a.transpose(0, 1)[None], b.transpose(0, 1)[None], c.transpose(0, 1)[None],
                         block_mask=block_mask, enable_gqa=flex_gqa)  # (1, H, T, D)
                return o[0].transpose(0, 1)  # (T, H, D)

            methods["flex"] = with_grad(run_flex, (q, k, v), do)
        except Exception as exc:  # report the reason in the table rather than dying
            methods["flex"] = f"n/a ({type(exc).__name__}: {str(exc).splitlines()[0][:80]})"

    if "flash_attn" in wanted:
        try:
            from flash_attn import flash_attn_varlen_func

            methods["flash_attn"] = with_grad(
                lambda a, b, c: flash_attn_varlen_func(a, b, c, cu, cu, max_len, max_len, causal=True),
                (q, k, v), do,
            )
        except ImportError as exc:
            methods["flash_attn"] = f"n/a (not importable: {exc})"
    return methods


def _cumsum(xs):
    total = 0
    for x in xs:
        total += x
        yield total


def causal_fwd_flops(docs, heads, head_dim):
    return sum(4 * n * n * heads * head_dim // 2 for n in docs)


# ----------------------------------------------------------------------------------- main


def _parse(argv):
    p = harness.parser(__doc__)
    p.add_argument("--smoke", action="store_true", help="tiny CPU run (Triton interpreted)")
    p.add_argument("--total-tokens", type=int, default=None, help="default 16384 (smoke: 128)")
    p.add_argument("--heads", type=int, default=None, help="default 32 (smoke: 2)")
    p.add_argument("--kv-heads", default=None, help="comma list, default '32,8' (smoke: '2,1')")
    p.add_argument("--head-dim", type=int, default=None, help="default 128 (smoke: 32)")
    p.add_argument("--cases", default=None, help="doc lengths and/or 'real'; default 512,2048,4096,real")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--methods", default="qtulu,sdpa_padded,flex,flash_attn")
    p.add_argument("--reps", type=int, default=None, help="timed repetitions (median); default 30")
    p.add_argument("--data-dir", type=Path, default=DEFAULT_DATA)
    p.add_argument("--lengths-file", type=Path, help="JSON list of real document lengths")
    p.add_argument("--dump-lengths", type=Path, help="write the real lengths as JSON and exit")
    p.add_argument("--compile-only", type=int, metavar="SM",
                   help="compile every kernel config for sm_SM (e.g. 90) without a GPU, and exit")
    args = p.parse_args(argv)
    smoke = args.smoke  # the smoke run's defaults are small enough for the Triton interpreter
    args.total_tokens = args.total_tokens or (128 if smoke else 16384)
    args.heads = args.heads or (2 if smoke else 32)
    args.kv_heads = [int(x) for x in (args.kv_heads or ("2,1" if smoke else "32,8")).split(",")]
    args.head_dim_given, args.head_dim = args.head_dim, args.head_dim or (32 if smoke else 128)
    args.cases = (args.cases or ("32,real" if smoke else "512,2048,4096,real")).split(",")
    args.reps = args.reps or (1 if smoke else 30)
    args.warmup = 0 if smoke else 5
    return args


def _documents(case: str, total: int, real: list[int] | None) -> list[int]:
    if case == "real":
        return pack_documents(real, total)
    n = int(case)
    return [n] * (total // n) + ([total % n] if total % n else [])


def _measure_case(case, docs, kv_heads, args, dtype, device) -> list[dict]:
    """One row per method for one document layout and head grouping; errors land in their row."""
    fwd_flops = causal_fwd_flops(docs, args.heads, args.head_dim)
    cuda = device.type == "cuda"
    methods = make_methods(docs, args.heads, kv_heads, args.head_dim, dtype, device, set(args.methods.split(",")))
    rows, reference = [], None
    for name, entry in methods.items():
        row = {"case": case, "docs": len(docs), "heads": args.heads, "kv_heads": kv_heads,
               "head_dim": args.head_dim, "method": name}
        rows.append(row)
        if isinstance(entry, str):
            row["error"] = entry
            continue
        fwd, fwd_bwd, check = entry
        try:
            out = check()
            if reference is None:
                reference = out
            row["max_abs_diff_vs_first"] = float((out.float() - reference.float()).abs().max())
            t_f = 1e3 * harness.median_seconds(fwd, args.reps, args.warmup, cuda=cuda)
            row.update(fwd_ms=t_f, fwd_tflops=fwd_flops / (t_f * 1e-3) / 1e12)
            t_fb = 1e3 * harness.median_seconds(fwd_bwd, args.reps, args.warmup, cuda=cuda)
            row.update(fwd_bwd_ms=t_fb, fwd_bwd_tflops=3.5 * fwd_flops / (t_fb * 1e-3) / 1e12)
        except Exception as exc:  # one failing peer must not hide the others
            row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:100]}"
    return rows


def speedups(results: list[dict]) -> list[dict]:
    """time_peer / time_qtulu per case, head grouping and peer, forward and forward+backward."""
    ratios = []
    for r in results:
        mine = next((x for x in results if x["method"] == "qtulu" and x["case"] == r["case"]
                     and x["kv_heads"] == r["kv_heads"]), None)
        if r["method"] == "qtulu" or mine is None:
            continue
        ratio = {"case": r["case"], "kv_heads": r["kv_heads"], "peer": r["method"]}
        for key, ms in (("fwd", "fwd_ms"), ("fwd_bwd", "fwd_bwd_ms")):
            if ms in r and ms in mine:
                ratio[key] = r[ms] / mine[ms]
        if len(ratio) > 3:
            ratios.append(ratio)
    return ratios


def _format(results: list[dict], ratios: list[dict], head: str) -> str:
    text = harness.table(
        ["case", "docs", "H/Hkv", "method", "fwd ms", "fwd TF/s", "f+b ms", "f+b TF/s", "max|diff|", "error"],
        [[r["case"], r["docs"], f"{r['heads']}/{r['kv_heads']}", r["method"], r.get("fwd_ms"), r.get("fwd_tflops"),
          r.get("fwd_bwd_ms"), r.get("fwd_bwd_tflops"), r.get("max_abs_diff_vs_first"), r.get("error", "")]
         for r in results],
        ["", "d", "", "", ".3f", ".2f", ".3f", ".2f", ".2e", ""], left=(-1,))
    lines = [head, text, "\nspeed-up of qtulu over each peer (time_peer / time_qtulu)"]
    for r in ratios:
        cells = "  ".join(f"{k} x{r[k]:.2f}" for k in ("fwd", "fwd_bwd") if k in r)
        lines.append(f"  {r['case']:>6} Hkv={r['kv_heads']:<3} vs {r['peer']:<12} {cells}")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = _parse(argv)
    if args.compile_only:  # one implementation, shared with the NF4 kernel's check
        from qtulu.bench.compile import main as compile_main

        return compile_main(["--arch", str(args.compile_only), "--kernels", "varlen",
                             "--head-dim", str(args.head_dim_given or 128), "--dtype", args.dtype])
    if args.dump_lengths:
        lengths = real_lengths(args.data_dir)
        args.dump_lengths.write_text(json.dumps(lengths))
        print(f"wrote {len(lengths)} lengths (mean {statistics.mean(lengths):.0f}) to {args.dump_lengths}")
        return 0

    import torch

    on_gpu = torch.cuda.is_available()
    if not on_gpu:
        if not args.smoke:
            print("no CUDA device: GPU figures cannot be measured here; use --smoke for a CPU check",
                  file=sys.stderr)
            return 2
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported
    device = torch.device("cuda" if on_gpu else "cpu")
    device_name = torch.cuda.get_device_name() if on_gpu else f"CPU (smoke, {os.cpu_count()} cores)"
    real = None
    if "real" in args.cases:
        real = ([int(n) for n in json.loads(args.lengths_file.read_text())] if args.lengths_file
                else real_lengths(args.data_dir))
        print(f"real lengths: {len(real)} examples, mean {statistics.mean(real):.0f}, "
              f"median {statistics.median(real):.0f}, max {max(real)}")
    results = []
    for case in args.cases:
        docs = _documents(case, args.total_tokens, real)
        for kv_heads in args.kv_heads:
            results += _measure_case(case, docs, kv_heads, args, getattr(torch, args.dtype), device)
            if on_gpu:
                torch.cuda.empty_cache()
    ratios = speedups(results)
    head = (f"\nvarlen attention, {device_name}, {args.dtype}, {args.total_tokens} tokens, head_dim {args.head_dim}, "
            f"causal, medians of {args.reps}")
    return harness.finish({
        "bench": "varlen_attention", "device": device_name, "smoke": args.smoke,
        "date": time.strftime("%Y-%m-%d", time.gmtime()), "dtype": args.dtype,
        "total_tokens": args.total_tokens, "head_dim": args.head_dim, "causal": True,
        "torch": torch.__version__, "results": results, "ratios": ratios,
    }, _format(results, ratios, head), args.record, title="Varlen attention")


if __name__ == "__main__":
    sys.exit(main())
