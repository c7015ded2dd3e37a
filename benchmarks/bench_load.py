"""Peak memory of loading an NF4 base: qtulu's streamed `load_base` vs load-in-bf16-then-quantize.

Writes a random LLaMA-architecture checkpoint (bf16 safetensors) to a temp dir, then loads it in a
fresh subprocess per method and reports the peak anonymous resident host memory (sampled every 5 ms; the
mmapped checkpoint pages are not counted) above the post-import baseline (and peak CUDA memory with --device cuda). Prints a table, then one JSON line.

    python benchmarks/bench_load.py                 # ~170M params, CPU
    python benchmarks/bench_load.py --smoke         # tiny, seconds
    python benchmarks/bench_load.py --device cuda --hidden 4096 --layers 8
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

from qtulu.bench import harness

_CHILD = r"""
import json, resource, sys, time
import torch
method, path, device = sys.argv[1], sys.argv[2], sys.argv[3]
import transformers, qtulu.model.load, qtulu.model.quant  # imports are part of the baseline, not the load
import accelerate, safetensors.torch, tqdm.auto
from transformers import AutoModelForCausalLM, LlamaForCausalLM
from transformers.models.llama import modeling_llama
qtulu.model.quant.Linear4bit.from_linear(torch.nn.Linear(64, 64, dtype=torch.bfloat16))  # warm the kernel code paths
def anon_mb():  # anonymous resident memory: safetensors' mmapped file pages are excluded
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) / 1024
import threading
peak = [0.0]
stop = threading.Event()
def sample():
    while not stop.is_set():
        peak[0] = max(peak[0], anon_mb())
        stop.wait(0.005)
base = anon_mb()
threading.Thread(target=sample, daemon=True).start()
t = time.time()
if method == "qtulu_stream":
    model, _ = qtulu.model.load.load_base(path, quantize="nf4", compute_dtype=torch.bfloat16, device=device,
                                     attn_implementation="sdpa")
else:
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).to(device)
    qtulu.model.quant.quantize_model_(model, compute_dtype=torch.bfloat16)
seconds = time.time() - t
stop.set()
peak[0] = max(peak[0], anon_mb())
out = {"method": method, "seconds": seconds, "peak_anon_rss_above_baseline_mb": peak[0] - base,
       "final_anon_rss_above_baseline_mb": anon_mb() - base}
if device.startswith("cuda"):
    out["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
print("RESULT " + json.dumps(out))
"""


def main(argv: list[str] | None = None) -> int:
    ap = harness.parser(__doc__)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--smoke", action="store_true", help="tiny model (CI smoke mode)")
    args = ap.parse_args(argv)
    if args.smoke:
        args.hidden, args.layers, args.vocab = 128, 2, 1000

    import torch

    from qtulu.model.tiny import tiny_llama_config

    cfg = tiny_llama_config(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=int(args.hidden * 2.6875) // 64 * 64,
                            num_hidden_layers=args.layers, num_attention_heads=max(1, args.hidden // 128),
                            num_key_value_heads=max(1, args.hidden // 128))
    from transformers import LlamaForCausalLM

    with tempfile.TemporaryDirectory() as tmp:
        with torch.device("cpu"):
            model = LlamaForCausalLM(cfg).to(torch.bfloat16)
        n_params = sum(p.numel() for p in model.parameters())
        model.save_pretrained(tmp, safe_serialization=True)
        del model
        bf16_mb = n_params * 2 / 2**20
        rows = []
        for method in ("qtulu_stream", "bf16_then_quantize"):
            proc = subprocess.run([sys.executable, "-c", _CHILD, method, tmp, args.device], capture_output=True, text=True,
                                  env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")})
            line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT ")), None)
            if line is None:
                print(proc.stdout[-2000:], proc.stderr[-4000:], file=sys.stderr)
                return 1
            rows.append(json.loads(line[7:]))
    cuda = args.device != "cpu"
    text = harness.table(["method", "seconds", "peak anon MB", "final anon MB"] + (["peak CUDA MB"] if cuda else []),
                         [[r["method"], r["seconds"], r["peak_anon_rss_above_baseline_mb"],
                           r["final_anon_rss_above_baseline_mb"], r.get("peak_cuda_mb")] for r in rows],
                         ["", ".2f", ".0f", ".0f", ".0f"])
    return harness.finish({"bench": "load", "params": n_params, "bf16_mb": bf16_mb, "device": args.device,
                           "results": rows},
                          f"model: {n_params / 1e6:.1f}M params, bf16 checkpoint {bf16_mb:.0f} MB, device {args.device}\n"
                          + text, args.record, title="Loading an NF4 base")


if __name__ == "__main__":
    raise SystemExit(main())
