"""The training loss path: TRL's chunked LM head, with a tile width a recipe can set.

``qtulu train`` computes the loss the way TRL's ``SFTTrainer`` does: ``add_fused_lm_head`` replaces
the model's LM head + cross-entropy by ``ChunkedLogProbFunction``, which projects the hidden states
through the head one tile at a time (``TOKEN_CHUNK_SIZE`` = 4096 tokens x ``chunk_size`` vocabulary
columns, in the compute dtype), folds each tile into online log-sum-exp statistics (a Triton kernel
on CUDA, in place) and recomputes the tiles in backward, accumulating the hidden-state gradient in
fp32. It never materialises the fp32 logits, and its loss is the project's: the summed token loss
of a micro-batch divided by the supervised tokens of the whole optimizer step (HF Trainer's
``num_items_in_batch``; see qtulu/train/run.py).

Why TRL's rather than Liger's or our own: it is already the trainer's loss (same numbers, same
entropy / accuracy metrics), it accumulates in fp32, and on CUDA its only large buffer is one tile.
Liger's fused linear cross-entropy replaces ``model.forward`` (TRL refuses it together with the
fused head) and needs a CUDA device to run at all. What TRL does not expose is the tile width:
its trainer passes ``chunk_size = 32768`` vocabulary columns, so with LLaMA's 32,000-token
vocabulary a tile is the whole bf16 logits of 4,096 tokens (262 MB). `loss_chunking` sets the
width for the duration of a run (recipe: ``train.loss_chunk_size``); 8,192 columns cut the tile to
67 MB at the same maths (the tiles are folded exactly as before, only more of them). The logits
of a tile are bf16 either way, so chunking cannot be more exact than bf16: the test bounds the
chunked loss and hidden-state gradient by twice the unchunked head's own error against float64
(measured on the CPU: both 0.73% on the gradient, bit for bit the same; the CUDA/Triton fold is
checked by the same test on a GPU, owed here).
``qtulu plan`` and ``benchmarks/bench_memory.py`` measure the widths.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

from qtulu.errors import QtuluError

TRL_DEFAULT_CHUNK = 32768


class LossConfigError(QtuluError, ValueError):
    """A loss setting the installed TRL cannot honour."""


@contextlib.contextmanager
def loss_chunking(chunk_size: int | None) -> Iterator[None]:
    """Run TRL's fused LM head with ``chunk_size`` vocabulary columns per tile (None: TRL's own)."""
    if chunk_size is None:
        yield
        return
    if int(chunk_size) < 1:
        raise LossConfigError(f"train.loss_chunk_size must be a positive number of vocabulary columns, got {chunk_size}")
    import trl.trainer.utils as tu

    if not hasattr(tu, "_CHUNKED_LOGPROB_CHUNK_SIZE"):
        raise LossConfigError(
            "train.loss_chunk_size: this TRL has no chunked LM head (trl.trainer.utils._CHUNKED_LOGPROB_CHUNK_SIZE); "
            "remove the setting or install trl>=1.16"
        )
    old = tu._CHUNKED_LOGPROB_CHUNK_SIZE
    tu._CHUNKED_LOGPROB_CHUNK_SIZE = int(chunk_size)
    try:
        yield
    finally:
        tu._CHUNKED_LOGPROB_CHUNK_SIZE = old
