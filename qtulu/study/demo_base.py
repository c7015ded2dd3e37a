"""The CPU study's inputs, made in-process: the demo's synthetic skills and its tiny warmed-up base.

Both are what `qtulu demo` makes (same code, same seeds): ``OUT/data/SKILL_{train,test}.jsonl``
and ``OUT/base`` (safetensors + config + character tokenizer), so that
``qtulu study recipes/studies/demo.yaml`` needs nothing downloaded.
"""

from __future__ import annotations

import json
from pathlib import Path

from qtulu.study.schema import DemoBaseSpec, SyntheticSpec


def write_synthetic(spec: SyntheticSpec, data_dir: Path) -> list[Path]:
    """Write each skill's train and held-out splits; a file already holding the same rows is left
    untouched (its mtime too). Returns the files."""
    from qtulu.demo.synthetic import make_examples, write_jsonl

    paths = []
    for skill in spec.skills:
        for split, n in (("train", spec.train_examples), ("test", spec.test_examples)):
            rows = make_examples(skill, n, split=split, seed=spec.seed)
            path = data_dir / f"{skill}_{split}.jsonl"
            want = "".join(json.dumps({"messages": r["messages"]}) + "\n" for r in rows)
            try:
                same = path.read_text(encoding="utf-8") == want
            except OSError:
                same = False
            if not same:
                write_jsonl(rows, path)
            paths.append(path)
    return paths


def build_demo_base(spec: DemoBaseSpec, out_dir: Path, *, progress: bool = True, say=print) -> dict:
    """Build, warm up (copy task, all weights) and save the tiny base to ``out_dir`` (atomically).

    Returns what the record keeps: parameters, the warm-up's first and last loss.
    """
    import random

    import torch

    from qtulu.demo.run import warmup_pretrain
    from qtulu.demo.synthetic import make_examples
    from qtulu.model.threads import threads_for
    from qtulu.model.tiny import build_char_tokenizer, build_tiny_llama, save_base

    saved = torch.get_num_threads()
    try:
        torch.manual_seed(spec.seed)
        random.seed(spec.seed)
        tok = build_char_tokenizer()
        shape = {k: getattr(spec, k) for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                              "num_attention_heads", "num_key_value_heads", "initializer_range")}
        model = build_tiny_llama(spec.seed, torch.float32, vocab_size=len(tok), **shape)
        model.set_attn_implementation("sdpa")
        n_params = sum(p.numel() for p in model.parameters())
        torch.set_num_threads(threads_for(n_params))  # one thread for so small a model (qtulu.model.threads)
        say(f"building the demo base: tiny LLaMA ({n_params / 1e3:.0f}k parameters), warm-up on the synthetic "
            f"'copy' task ({spec.warmup_steps} steps, all weights)")
        copy = make_examples("copy", spec.warmup_examples, split="train", seed=spec.seed)
        losses = warmup_pretrain(model, tok, copy, steps=spec.warmup_steps, batch_size=spec.warmup_batch,
                                 lr=spec.warmup_lr, seed=spec.seed, progress=progress)
        save_base(model, tok, out_dir)
    finally:
        torch.set_num_threads(saved)
    return {"parameters": n_params, "warmup_loss": [losses[0], losses[-1]]}
