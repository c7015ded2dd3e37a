"""What binding adapters to their base costs: ``weights_sha256`` on the load benchmark's model.

Adapters bind to what they trained against (qtulu.model.load.state_dict_sha256: the NF4 codes + quant
state of every quantized layer, the values of every other tensor), hashed from memory after the
load, so the checkpoint is read once. This writes the same random LLaMA-architecture bf16
checkpoint as ``benchmarks/bench_load.py`` (~167M parameters by default), loads it (NF4 with bf16
compute, and unquantized bf16), and times, on the CPU:

* the load itself (``qtulu.model.load.load_base``, streamed);
* the trained-against hash of the loaded model (what ``base_info`` computes once per load);
* for comparison, the former binding: SHA-256 of the checkpoint files (a second read of the
  checkpoint; here from the page cache, so a lower bound of what a cold disk costs).

Prints a table, then one JSON line.

    python benchmarks/bench_base_hash.py             # ~167M parameters
    python benchmarks/bench_base_hash.py --smoke     # tiny, seconds
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

from qtulu.bench import harness


def main(argv: list[str] | None = None) -> int:
    ap = harness.parser(__doc__)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--repeat", type=int, default=3, help="hash timings: best of this many")
    ap.add_argument("--smoke", action="store_true", help="tiny model (CI smoke mode)")
    args = ap.parse_args(argv)
    if args.smoke:
        args.hidden, args.layers, args.vocab, args.repeat = 128, 2, 1000, 1

    import torch

    from qtulu.model.load import _safetensor_files, base_info, files_sha256, load_base, state_dict_sha256
    from qtulu.model.tiny import tiny_llama_config

    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    cfg = tiny_llama_config(vocab_size=args.vocab, hidden_size=args.hidden,
                            intermediate_size=int(args.hidden * 2.6875) // 64 * 64, num_hidden_layers=args.layers,
                            num_attention_heads=max(1, args.hidden // 128), num_key_value_heads=max(1, args.hidden // 128))
    from transformers import LlamaForCausalLM

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / "ckpt"
        torch.manual_seed(0)
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
        n_params = sum(p.numel() for p in model.parameters())
        model.save_pretrained(ckpt, safe_serialization=True)
        del model
        files = _safetensor_files(ckpt)
        ckpt_bytes = sum(f.stat().st_size for f in files)

        for quantize in ("nf4", None):
            t = time.perf_counter()
            loaded, _ = load_base(str(ckpt), quantize=quantize, compute_dtype=torch.bfloat16, device="cpu",
                                  attn_implementation="sdpa")
            load_s = time.perf_counter() - t
            hash_s, digest = harness.best_of(lambda: state_dict_sha256(loaded), args.repeat)
            assert base_info(loaded)["weights_sha256"] == digest
            held = sum(t.numel() * t.element_size() for t in loaded.state_dict().values())  # bytes hashed
            rows.append({"base": quantize or "bf16", "load_s": load_s, "hash_s": hash_s,
                         "hash_over_load": hash_s / load_s, "hashed_mb": held / 1e6})
            loaded = None  # free it before the next load

        def old():
            os.environ["QTULU_CACHE_DIR"] = tempfile.mkdtemp(dir=tmp)  # a cold digest cache every time
            return files_sha256(files)

        files_s, _ = harness.best_of(old, args.repeat)

    text = harness.table(["base", "load s", "hash s", "hash/load", "hashed MB"],
                         [[r["base"], r["load_s"], r["hash_s"], r["hash_over_load"], r["hashed_mb"]] for r in rows],
                         ["", ".2f", ".3f", ".1%", ".0f"])
    text = (f"model: {n_params / 1e6:.0f}M parameters, bf16 checkpoint {ckpt_bytes / 1e6:.0f} MB, CPU\n{text}\n"
            f"former binding (SHA-256 of the checkpoint files, page cache warm): {files_s:.3f} s")
    return harness.finish({"bench": "base_hash", "params": n_params, "checkpoint_bytes": ckpt_bytes, "rows": rows,
                           "files_sha256_s": files_s, "device": "cpu", "threads": torch.get_num_threads()},
                          text, args.record, title="Binding adapters to their base")


if __name__ == "__main__":
    raise SystemExit(main())
