"""Synthetic instruction datasets for `qtulu demo`, generated in-process (no downloads).

Each task maps a random argument to an exact answer, so accuracy is exact match. Train and
held-out splits are disjoint by construction: an argument goes to the held-out split when a hash
of it falls in the held-out bucket, so no held-out prompt is ever seen in training.

Tasks (small enough for a ~1M-parameter model on a CPU):

* ``upper``     (string manipulation) ``upper kqzv`` -> ``KQZV``
* ``successor`` (arithmetic)          ``next 3719`` -> ``3720`` (add one, with carries)
* ``copy``      (the warm-up skill)   ``echo aZ3k`` -> ``aZ3k``

The base model is warmed up on ``copy`` only (it learns the chat format and to reproduce its
argument), then one adapter per skill learns the transformation. A copying base scores ~0 on
``upper`` and ``successor`` because the copy is never the right answer (arguments always contain
a lowercase letter / the number always changes).
"""

from __future__ import annotations

import json
import random
import string
import zlib
from pathlib import Path
from typing import Callable

HELD_OUT_BUCKETS = 5  # one bucket in five is held out


def _held_out(arg: str, salt: str) -> bool:
    return zlib.crc32(f"{salt}:{arg}".encode()) % HELD_OUT_BUCKETS == 0


ARG_LEN = 4  # fixed-length arguments: a model of ~100k parameters learns them in seconds


def _upper_arg(rng: random.Random) -> str:
    return "".join(rng.choice(string.ascii_lowercase) for _ in range(ARG_LEN))


def _successor_arg(rng: random.Random) -> str:
    # 1000..9998: the answer keeps ARG_LEN digits
    return str(rng.randint(10 ** (ARG_LEN - 1), 10**ARG_LEN - 2))


def _copy_arg(rng: random.Random) -> str:
    return "".join(rng.choice(string.ascii_letters + string.digits) for _ in range(ARG_LEN))


TASKS: dict[str, dict] = {
    "upper": {"kind": "string manipulation", "prefix": "upper ", "arg": _upper_arg, "answer": str.upper},
    "successor": {"kind": "arithmetic", "prefix": "next ", "arg": _successor_arg, "answer": lambda a: str(int(a) + 1)},
    "copy": {"kind": "warm-up", "prefix": "echo ", "arg": _copy_arg, "answer": lambda a: a},
}
DEMO_SKILLS = ("upper", "successor")


def make_examples(task: str, n: int, *, split: str, seed: int) -> list[dict]:
    """``n`` examples ``{"messages": [user, assistant], "prompt", "answer"}`` of ``task`` in ``split``.

    ``split`` is ``"train"`` or ``"test"`` (the held-out bucket); arguments repeat within a split
    only when the split is small (sampling is with replacement over the split's arguments).
    """
    if task not in TASKS:
        raise KeyError(f"unknown synthetic task {task!r} (known: {', '.join(TASKS)})")
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    spec = TASKS[task]
    gen: Callable[[random.Random], str] = spec["arg"]
    rng = random.Random(f"{seed}:{task}:{split}")
    want_held_out = split == "test"
    out = []
    tries = 0
    while len(out) < n:
        tries += 1
        if tries > 1000 * n + 1000:
            raise RuntimeError(f"cannot draw {n} {split} examples for {task!r}")
        arg = gen(rng)
        if _held_out(arg, task) != want_held_out:
            continue
        prompt = spec["prefix"] + arg
        answer = spec["answer"](arg)
        out.append(
            {
                "messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}],
                "prompt": prompt,
                "answer": answer,
            }
        )
    return out


def write_jsonl(examples: list[dict], path: str | Path) -> Path:
    """Write ``{"messages": ...}`` rows (the ``messages`` source format) to ``path``."""
    from qtulu.files import atomic_write_text

    return atomic_write_text(path, "".join(json.dumps({"messages": ex["messages"]}) + "\n" for ex in examples))


def packed_toy_dataset(n_rows: int = 16, per_row: int = 3, *, seed: int = 0, vocab: tuple[int, int] = (4, 100),
                       min_len: int = 6, max_len: int = 20):
    """A small packed dataset in the layout `qtulu.data.build` produces (for tests and benchmarks).

    Each row packs ``per_row`` random examples; the first half of each example is the prompt
    (labels -100), the second half is supervised. Columns: ``input_ids``, ``labels``,
    ``position_ids`` (restart at 0 per example), ``seq_lens``.
    """
    from datasets import Dataset

    rng = random.Random(seed)
    rows = []
    for _ in range(n_rows):
        ids: list[int] = []
        labels: list[int] = []
        lens: list[int] = []
        for _ in range(per_row):
            n = rng.randint(min_len, max_len)
            x = [rng.randint(*vocab) for _ in range(n)]
            ids += x
            labels += [-100] * (n // 2) + x[n // 2 :]
            lens.append(n)
        rows.append({"input_ids": ids, "labels": labels, "position_ids": [p for n in lens for p in range(n)], "seq_lens": lens})
    return Dataset.from_list(rows)


def repack(dataset, per_row: int):
    """Re-pack the examples of a packed dataset with ``per_row`` examples per row (same order)."""
    from datasets import Dataset

    examples = []
    for row in dataset:
        start = 0
        for n in row["seq_lens"]:
            examples.append((row["input_ids"][start : start + n], row["labels"][start : start + n]))
            start += n
    rows = []
    for i in range(0, len(examples), per_row):
        group = examples[i : i + per_row]
        rows.append({
            "input_ids": [t for ids, _ in group for t in ids],
            "labels": [t for _, lab in group for t in lab],
            "position_ids": [p for ids, _ in group for p in range(len(ids))],
            "seq_lens": [len(ids) for ids, _ in group],
        })
    return Dataset.from_list(rows)


def toy_recipe(*, train: dict | None = None, lora: dict | None = None, model: dict | None = None, name: str = "toy"):
    """A validated `Recipe` for a tiny in-memory run (fp32, no quantization unless asked).

    Its single source is never read: callers pass the packed data to `qtulu.train.run.train`.
    """
    from qtulu.recipes import recipe_from_dict

    t = {"learning_rate": 1e-2, "max_steps": 4, "gradient_accumulation_steps": 1, "micro_batch_size": 2,
         "save_steps": 0, "logging_steps": 1, "gradient_checkpointing": False, "warmup_ratio": 0.0,
         "seed": 0, "optimizer": "adamw_torch", "max_grad_norm": 1.0}
    t.update(train or {})
    lo = {"r": 4, "alpha": 8, "dropout": 0.0}
    lo.update(lora or {})
    m = {"quantize": None, "compute_dtype": "float32", "attn_implementation": "qtulu_varlen"}
    m.update(model or {})
    return recipe_from_dict({
        "name": name,
        "sources": [{"name": "toy", "format": "messages", "path": "in-memory-toy-data.jsonl"}],
        "model": m, "lora": lo, "train": t,
    })
