"""Held-out reply loss of one training source: the rows its ``hold_out`` keeps out of training,
scored as the mean negative log-likelihood per supervised (reply) token.

Not a benchmark of the paper: it measures how well the base and each adapter predict the replies
of a source's own held-out rows, rendered exactly as training renders them. The rows are the ones
`qtulu.data.holdout` sets aside for the same ``format``/``path``/``hold_out`` (give a column the
values the recipes use; the recipes' data manifests record the hold-out's sha256, this task's
metrics record the same digest), converted by the same converter (``options``, ``data_profile``,
``seed``), validated and encoded with `qtulu.data.chat.encode_batch` in ``chat_format`` with the
evaluated model's tokenizer, truncated to ``max_seq_len`` as the build truncates. Each
conversation's summed NLL over its supervised tokens (assistant replies and their EOS: the training
loss's terms) comes from one forward pass (`evals.lm.LM.masked_nll`); no generation.

Metrics: ``loss`` = token-weighted mean NLL (nats per supervised token), ``tokens``, ``n``
(conversations scored) and ``score`` = exp(-loss), the geometric-mean probability of a reply token:
in [0, 1] and higher is better, like every other column (a study's table, average and merge search
need no special case). A conversation whose replies all fall past ``max_seq_len`` has no supervised
token left: it is counted in ``excluded`` (``truncated_away``) and not scored, as the build drops it;
one with no supervised token at all (empty replies) is ``no_supervised_tokens``.

The conversion happens in ``predict`` (it needs the evaluated model's tokenizer: ShareGPT's
``split_long`` counts tokens, and a reply holding one of its special tokens is a bad row): ``load``
returns the held-out native rows, one example each (a row may become several conversations).

``path``: absolute, or relative to the task's data folder (``--data-dir``; a study resolves
``./`` and ``../`` paths against the study file, as it does for recipes' source paths).
"""

from __future__ import annotations

import math
from pathlib import Path

from ._common import TaskConfigError, TaskDataError, head

NAME = "reply_loss"
VERSION = "1.0"
DATA_SUBDIR = ""  # `path` is resolved against the data folder; only that file is keyed (data_files)
FILE_OPTIONS = ("path",)  # options naming files: a cell is keyed by their contents, not their spelling
# the code that renders the rows, keyed with the task's own (a converter change re-scores the cells)
CODE_MODULES = ("qtulu.data.holdout", "qtulu.data.build", "qtulu.data.chat", "qtulu.data.sources", "qtulu.data.formats")
# every option load/predict/score accept: name -> (default, meaning); `qtulu eval --list-tasks` shows them
OPTIONS = {
    "format": (None, "the source's format (a converter of qtulu data formats: dolly, oasst1, superni, ...)"),
    "path": (None, "the source file (absolute, or relative to the data folder)"),
    "options": ({}, "the converter's options, as the recipe's sources.NAME.options"),
    "hold_out": (None, "the recipe's sources.NAME.hold_out: int k rows, or a fraction in (0, 1)"),
    "chat_format": ("tulu", "tulu or tokenizer (the recipe's data.chat_format)"),
    "max_seq_len": (2048, "truncate each conversation to this many tokens (the recipe's data.max_seq_len)"),
    "data_profile": ("open_instruct", "the recipe's data.profile: open_instruct (random templates) or plain"),
    "seed": (42, "the recipe's data.seed (seeds open_instruct's random templates)"),
    "profile": ("open_instruct", "accepted like every task's; one scoring here"),
}


def _spec(format=None, path=None, options=None, hold_out=None, data_dir=None):
    from qtulu.recipes import FORMATS, SourceSpec

    if format not in FORMATS:
        raise TaskConfigError(f"reply_loss: option format={format!r}: give the source's format ({', '.join(FORMATS)})")
    if not isinstance(path, str) or not path:
        raise TaskConfigError("reply_loss: option path: give the source file (absolute, or relative to the data folder)")
    if isinstance(hold_out, bool) or not isinstance(hold_out, (int, float)) or \
            (isinstance(hold_out, int) and hold_out < 1) or (isinstance(hold_out, float) and not 0 < hold_out < 1):
        raise TaskConfigError(f"reply_loss: option hold_out={hold_out!r}: give the recipe's hold_out "
                              "(an int >= 1 or a fraction in (0, 1))")
    if not isinstance(options, dict):
        raise TaskConfigError(f"reply_loss: option options={options!r}: expected a mapping of converter options")
    return SourceSpec(name=Path(path).stem, format=format, path=str(resolve_path(data_dir, path)),
                      hold_out=hold_out, options=dict(options))


def resolve_path(data_dir, path: str) -> Path:
    """``path`` itself when absolute (``~`` expanded), else under ``data_dir``."""
    p = Path(path).expanduser()
    return p if p.is_absolute() or data_dir is None else Path(data_dir) / p


def data_files(data_dir, *, path=None, **_) -> dict[str, Path]:
    """The files a cell's key hashes (its `FILE_OPTIONS` resolved): only the source file."""
    return {"path": resolve_path(data_dir, path)} if isinstance(path, str) and path else {}


def load(data_dir, *, limit=None, format=None, path=None, options=None, hold_out=None, **_):
    from qtulu.data.build import held_out_rows
    from qtulu.errors import QtuluError

    spec = _spec(format, path, options if options is not None else {}, hold_out, data_dir)
    if not Path(spec.path).exists():
        raise TaskDataError(f"reply_loss source not found: {spec.path} (option path; relative paths are under "
                            "the data folder)")
    try:
        resolved, rows, info = held_out_rows(spec)
    except QtuluError as e:
        raise TaskDataError(f"reply_loss: {e}") from None
    if not rows:
        raise TaskDataError(f"reply_loss: hold_out={hold_out!r} holds out no row of {spec.path}")
    return [{"id": where, "row": row, "source": resolved, "held_out": info} for where, row in head(rows, limit)]


def _encoded(lm, examples, chat_format, max_seq_len, data_profile, seed):
    """``([(where, ids, labels, why excluded or None)], counts of dropped/filtered rows)``."""
    from qtulu.data.build import convert_rows
    from qtulu.data.chat import IGNORE_INDEX, encode_batch

    if chat_format not in ("tulu", "tokenizer"):
        raise TaskConfigError(f"reply_loss: option chat_format={chat_format!r}: tulu or tokenizer")
    convs, counts = convert_rows(examples[0]["source"], [(ex["id"], ex["row"]) for ex in examples], lm.tokenizer,
                                 profile=data_profile, seed=seed, max_seq_len=max_seq_len)
    L = int(max_seq_len) if not lm.max_length else min(int(max_seq_len), lm.max_length)
    out = []
    for (where, _), (ids, labels) in zip(convs, encode_batch([m for _, m in convs], lm.tokenizer, chat_format)):
        why = None
        if not (labels != IGNORE_INDEX).any():
            why = "no_supervised_tokens"
        elif not (labels[:L] != IGNORE_INDEX).any():
            why = "truncated_away"
        out.append((where, ids[:L].tolist(), labels[:L].tolist(), why, len(ids) > L))
    return out, counts


def predict(lm, examples, *, chat_format="tulu", max_seq_len=2048, data_profile="open_instruct", seed=42, **_):
    if not examples:
        return []
    encoded, counts = _encoded(lm, examples, chat_format, max_seq_len, data_profile, seed)
    scored = [(ids, labels) for _, ids, labels, why, _ in encoded if why is None]
    nll = iter(lm.masked_nll(scored))
    info = examples[0]["held_out"]
    preds = []
    for where, ids, _, why, cut in encoded:
        total, n = next(nll) if why is None else (None, 0)
        preds.append({"id": where, "nll": total, "tokens": n, "length": len(ids), "truncated": cut, "excluded": why})
    if preds:  # what the conversion left out, and the hold-out's digest, ride on the first record
        preds[0]["rows"] = {"held_out": info, **counts, "native_rows": len(examples)}
    return preds


def score(predictions, **_):
    kept = [p for p in predictions if p["excluded"] is None]
    excluded: dict[str, int] = {}
    for p in predictions:
        if p["excluded"] is not None:
            excluded[p["excluded"]] = excluded.get(p["excluded"], 0) + 1
    tokens = sum(p["tokens"] for p in kept)
    loss = sum(p["nll"] for p in kept) / tokens if tokens else float("nan")
    rows = predictions[0].get("rows", {}) if predictions else {}
    return {"score": math.exp(-loss) if tokens else float("nan"), "loss": loss, "n": len(kept), "tokens": tokens,
            "excluded": excluded, "truncated": sum(p["truncated"] for p in kept),
            "held_out": rows.get("held_out"), "dropped": rows.get("dropped", {}), "filtered": rows.get("filtered", {})}


def describe(*, limit=None, format=None, path=None, hold_out=None, max_seq_len=2048, profile="open_instruct", **_) -> dict:
    name = Path(path).name if isinstance(path, str) else "?"
    subset = f"held-out rows of {name} ({format}, hold_out={hold_out}, {max_seq_len} tokens)" + \
        ("" if limit is None else f", first {limit} rows")
    return {"profile": profile, "subset": subset,
            "metric": "exp(-mean NLL per reply token); loss = the mean NLL (nats), fully truncated examples excluded",
            "comparable": False, "note": "not a paper benchmark: a training source's held-out reply loss (qtulu)"}
