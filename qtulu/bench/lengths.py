"""Real document lengths for the benchmark, and how they are batched.

The lengths come from the instruction sources in ``../shared/data/sources`` (or any directory of
json/jsonl files in the same native layouts: Alpaca with optional ``history``, ShareGPT
``conversations``, Self-Instruct ``instances``), rendered in the Tulu chat format and measured
with the LLaMA SentencePiece tokenizer. Nothing is cached: this takes a second or two.

Two batchings of the SAME documents per optimizer step:

- qtulu: best-fit-decreasing packing into rows of ``seq_len`` tokens, one row per step, fed as
  ``(1, total)`` with ``position_ids`` restarting at 0 per document (no padding at all);
- baseline (HF padded batches): the step's documents sorted by length and cut into padded
  micro-batches of at most ``seq_len`` tokens padding included, gradients accumulated. This is
  the fair version of the padded stack (a user would not pad a 30-token answer to 4096).
"""

from __future__ import annotations

import bisect
import json
import random
from pathlib import Path
from typing import Any, Iterator


def _alpaca_messages(rec: dict[str, Any]) -> list[dict[str, str]]:
    msgs: list[dict[str, str]] = []
    for turn in rec.get("history") or []:
        user, assistant = turn
        msgs += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    prompt = rec["instruction"] + (("\n\n" + rec["input"]) if rec.get("input") else "")
    return msgs + [{"role": "user", "content": prompt}, {"role": "assistant", "content": rec["output"]}]


def _sharegpt_messages(rec: dict[str, Any]) -> list[dict[str, str]]:
    roles = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
    return [{"role": roles[t["from"]], "content": t["value"]} for t in rec["conversations"]]


def _record_conversations(rec: Any) -> list[list[dict[str, str]]]:
    """One record in a native layout -> its conversations (Self-Instruct: one per instance)."""
    if not isinstance(rec, dict):
        raise ValueError("record is not a JSON object")
    if "conversations" in rec:
        return [_sharegpt_messages(rec)]
    if "instances" in rec:
        out = []
        for inst in rec["instances"]:
            prompt = rec["instruction"] + (("\n\n" + inst["input"]) if inst.get("input") else "")
            out.append([{"role": "user", "content": prompt}, {"role": "assistant", "content": inst["output"]}])
        return out
    if "instruction" in rec and "output" in rec:
        return [_alpaca_messages(rec)]
    raise ValueError(f"unknown layout (keys {sorted(rec)[:8]})")


def iter_conversations(sources_dir: str | Path) -> Iterator[list[dict[str, str]]]:
    """Every conversation of every ``*.json`` / ``*.jsonl`` file under ``sources_dir``, in name
    order. A record in no known layout raises ``ValueError`` naming the file and record."""
    root = Path(sources_dir)
    files = sorted(p for p in root.iterdir() if p.suffix in (".json", ".jsonl"))
    if not files:
        raise FileNotFoundError(f"no .json/.jsonl files in {root}")
    for path in files:
        if path.suffix == ".jsonl":
            lines = path.read_text(encoding="utf-8").splitlines()
            records = ((f"line {i + 1}", json.loads(line)) for i, line in enumerate(lines) if line.strip())
        else:
            data = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(data, list):
                raise ValueError(f"{path}: expected a JSON list of records")
            records = ((f"record {i}", rec) for i, rec in enumerate(data))
        for where, rec in records:
            try:
                convs = _record_conversations(rec)
            except (KeyError, TypeError, ValueError) as exc:
                raise ValueError(f"{path}, {where}: {exc}") from None
            yield from convs


def render_tulu(messages: list[dict[str, str]], eos: str = "") -> str:
    """The Tulu (open-instruct) chat text: ``<|role|>\\n content \\n``, eos after each reply."""
    parts = []
    for m in messages:
        end = eos if m["role"] == "assistant" else ""
        parts.append(f"<|{m['role']}|>\n{m['content'].strip()}{end}\n")
    return "".join(parts)


def token_lengths(
    sources_dir: str | Path,
    tokenizer_model: str | Path,
    *,
    max_docs: int | None = None,
    seed: int = 0,
) -> list[int]:
    """Token count of each conversation (BOS + text + one EOS per reply) under a SentencePiece
    model, in a seeded random order; ``max_docs`` keeps the first so many of that order."""
    import sentencepiece as spm

    convs = list(iter_conversations(sources_dir))
    random.Random(seed).shuffle(convs)
    if max_docs is not None:
        convs = convs[:max_docs]
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer_model))
    ids = sp.encode([render_tulu(c) for c in convs])
    replies = [sum(m["role"] == "assistant" for m in c) for c in convs]
    return [1 + len(t) + r for t, r in zip(ids, replies)]


def read_lengths_file(path: str | Path) -> list[int]:
    """Lengths from a JSON list of ints or a text file of one int per line."""
    p = Path(path)
    text = p.read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        values = json.loads(text)
        where = lambda i: f"{p}, item {i}"  # noqa: E731
    else:
        lines = [(i + 1, line.strip()) for i, line in enumerate(text.splitlines())]
        values, nums = [], []
        for n, line in lines:
            if line and not line.startswith("#"):
                try:
                    values.append(int(line))
                except ValueError:
                    raise ValueError(f"{p}, line {n}: not an integer: {line!r}") from None
                nums.append(n)
        where = lambda i: f"{p}, line {nums[i]}"  # noqa: E731
    out = []
    for i, v in enumerate(values):
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            raise ValueError(f"{where(i)}: a length must be a positive integer, got {v!r}")
        out.append(v)
    if not out:
        raise ValueError(f"{p}: no lengths")
    return out


def pack_bfd(lengths: list[int], seq_len: int) -> list[list[int]]:
    """Best-fit-decreasing packing of document lengths (truncated to ``seq_len``) into rows of
    at most ``seq_len`` tokens. Returns the rows as lists of lengths.

    The same strategy as TRL's ``pack_dataset(strategy="bfd")`` (what training uses), written
    out because TRL's needs a ``datasets.Dataset`` of token lists (here there are only lengths)
    and packs each 1,000-example map batch on its own."""
    if seq_len <= 0:
        raise ValueError("seq_len must be positive")
    rows: list[list[int]] = []
    # free space of each open row, kept sorted with the row index: best fit = smallest free >= n
    free: list[tuple[int, int]] = []
    for n in sorted((min(n, seq_len) for n in lengths), reverse=True):
        i = bisect.bisect_left(free, (n, -1))
        if i < len(free):
            space, row = free.pop(i)
            rows[row].append(n)
            if space - n > 0:
                bisect.insort(free, (space - n, row))
        else:
            rows.append([n])
            if seq_len - n > 0:
                bisect.insort(free, (seq_len - n, len(rows) - 1))
    return rows


def select_rows(rows: list[list[int]], n: int, seed: int = 0) -> list[list[int]]:
    """``n`` rows drawn without replacement in a seeded order (with replacement once all are
    used), so that a short run sees representative rows, not only BFD's first, fullest ones."""
    if not rows:
        raise ValueError("no rows to select from")
    rng = random.Random(seed)
    out: list[list[int]] = []
    while len(out) < n:
        order = list(range(len(rows)))
        rng.shuffle(order)
        out += [rows[i] for i in order[: n - len(out)]]
    return out


def padded_microbatches(lengths: list[int], budget: int) -> list[list[int]]:
    """Indices of ``lengths`` grouped into padded micro-batches: sorted longest first, each batch
    of at most ``budget`` tokens counting padding (len(batch) * longest <= budget)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    for i in order:
        if lengths[i] > budget:
            raise ValueError(f"document of {lengths[i]} tokens exceeds the batch budget {budget}")
        if batches and (len(batches[-1]) + 1) * lengths[batches[-1][0]] <= budget:
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches
