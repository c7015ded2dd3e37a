"""Real document lengths for the benchmark, and how they are batched.

The lengths come from a recipe built by the data pipeline itself (`qtulu.data.build`: each
source's converter, the chat format, the tokenizer, the split/truncation at ``seq_len``), so a
benchmark reads any recipe or source format training reads, with the same token counts. The
default is ``tests/fixtures/shared_sources.yaml``: the real instruction sources in
``../shared/data/sources`` under the LLaMA tokenizer.

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
from typing import Sequence

REPO = Path(__file__).resolve().parents[2]
DEFAULT_RECIPE = REPO / "tests" / "fixtures" / "shared_sources.yaml"


def token_lengths(
    recipe=None,
    *,
    tokenizer=None,
    seq_len: int | None = None,
    overrides: Sequence[str] = (),
    max_docs: int | None = None,
    seed: int = 0,
) -> list[int]:
    """Token count of each training example of ``recipe`` (a `Recipe`, name or path; default
    `DEFAULT_RECIPE`) as `qtulu.data.build.build_dataset` makes it, in a seeded random order;
    ``max_docs`` keeps the first so many of that order.

    ``tokenizer`` overrides the recipe's (``data.tokenizer``, else its base); ``seq_len`` its
    ``data.max_seq_len`` (examples over it are split or truncated as training would);
    ``overrides`` are ``KEY=VALUE`` recipe overrides.
    """
    from qtulu.data.build import build_dataset
    from qtulu.recipes import load_recipe

    if not hasattr(recipe, "sources"):
        recipe = load_recipe(recipe or DEFAULT_RECIPE, list(overrides))
    elif overrides:
        raise ValueError("pass overrides with a recipe name or path, not with a Recipe object")
    built = build_dataset(recipe, tokenizer, max_seq_len=seq_len, progress=False)
    lengths = [int(n) for n in built.example_lengths]
    random.Random(seed).shuffle(lengths)
    return lengths if max_docs is None else lengths[:max_docs]


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
