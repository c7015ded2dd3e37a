"""One converter per native schema of the Tülu paper's sources, each to ``[{"role", "content"}, ...]``.

A converter takes the rows of one source as ``(where, row)`` pairs (``where`` = ``file:line`` or
``source[index]``), the source's ``options`` and a `Context` (profile, seed, tokenizer), and yields
``(where, messages)``, ``(where, BadRow)`` (malformed: an error or counted, by policy) or
``(where, Filtered)`` (left out on purpose, as the reference does: always counted). The generic
checks (roles, empty replies, special tokens) happen afterwards in `qtulu.data.chat.validate_messages`.

Every converter reproduces open-instruct's June-2023 converter (``open_instruct/reformat_datasets.py``
at e44fcf588, the data of the Tülu paper) under the default profile ``open_instruct``; the
``plain`` profile differs only in the instruction layout (instruction, blank line, input: the
converter's ``random_template=False``). Modules, each naming its reference:

- `templates`: open-instruct's weighted instruction templates and few-shot layout
- `instructions`: Alpaca, Code-Alpaca, GPT4-Alpaca, Dolly, Self-Instruct, Unnatural Instructions
- `conversations`: ShareGPT (FastChat-style splitting) and Baize
- `trees`: OpenAssistant OASST1 (trees file and flat messages)
- `superni`: Super-NaturalInstructions task files
- `flan`: FLAN V2 (submix resampling) and its CoT submix
- `flan_cot_raw`: FLAN's raw CoT TSV (GSM8K) rendered as FLAN's ``cot_zsopt`` rows, then converted as `cot`
- `released`: ``messages`` rows and the released Tülu mixtures
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

from qtulu.data.errors import DataError
from qtulu.data.formats._rows import PROFILES, Context, Filtered, Out, Row, rowwise
from qtulu.data.formats.conversations import baize, sharegpt
from qtulu.data.formats.flan import PORTIONS, cot, flan_v2
from qtulu.data.formats.flan_cot_raw import flan_cot_raw
from qtulu.data.formats.instructions import alpaca, dolly, self_instruct, unnatural_instructions
from qtulu.data.formats.released import RELEASES, messages, release_source
from qtulu.data.formats.superni import superni
from qtulu.data.formats.trees import oasst1
from qtulu.recipes import FORMATS

__all__ = ["CONVERTERS", "OPTIONS", "PROFILES", "RELEASES", "Context", "Filtered", "check_options", "convert",
           "release_source"]

CONVERTERS: dict[str, Callable[[Iterable[Row], dict, Context], Out]] = {
    "alpaca": rowwise(alpaca),
    "dolly": rowwise(dolly),
    "oasst1": oasst1,
    "sharegpt": sharegpt,
    "self_instruct": rowwise(self_instruct),
    "unnatural_instructions": rowwise(unnatural_instructions),
    "superni": superni,
    "flan_v2": flan_v2,
    "cot": cot,
    "flan_cot_raw": flan_cot_raw,
    "baize": rowwise(baize),
    "messages": messages,
}

_OPT_INT = (int, type(None))
# per format: option -> (default, accepted types, meaning). Anything else in a recipe is an error.
OPTIONS: dict[str, dict[str, tuple[Any, tuple, str]]] = {
    "alpaca": {},
    "dolly": {},
    "oasst1": {
        "leaf_only": (False, (bool,), "only paths ending at an assistant message without replies (open-instruct 853377e82)"),
        "skip_deleted": (False, (bool,), "leave out deleted messages (open-instruct 503407ee8)"),
        "top_k_replies": (None, _OPT_INT, "follow only the k best-rated replies (labels.quality; 503407ee8)"),
        "filter_creator_mentions": (False, (bool,), "drop subtrees mentioning LAION / OpenAssistant (94055552c)"),
        "lang": (None, (str, type(None)), "keep only trees whose prompt is in this language (qtulu)"),
    },
    "sharegpt": {
        "split_long": (False, (bool,), "split as scripts/split_sharegpt_conversations.py (raw sg_90k files)"),
        "max_length": (None, _OPT_INT, "the split's token budget (default: data.max_seq_len)"),
    },
    "self_instruct": {},
    "unnatural_instructions": {
        "reformulations": (False, (bool,), "also use each row's reformulations (not used by open-instruct)"),
    },
    "superni": {
        "zero_shot_per_task": (60, (int,), "zero-shot examples per task"),
        "few_shot_per_task": (20, (int,), "few-shot examples per task"),
        "n_few_shot": (2, (int,), "positive examples in a few-shot prompt"),
        "split": ("xlingual", (str,), "splits/<split>/train_tasks.txt of a repository root"),
        "exclude_mmmlu": (True, (bool,), "leave out the *_mmmlu_* tasks (MMLU test leakage)"),
    },
    "flan_v2": {
        "resample": (None, _OPT_INT, "draw this many rows in the fixed submix shares (null: take the rows as given)"),
        "portions": ("tulu_v1", (str,), f"submix shares: {' | '.join(PORTIONS)}"),
    },
    "cot": {
        "zero_shot": (None, _OPT_INT, "zs_opt rows to draw (null: all)"),
        "few_shot": (None, _OPT_INT, "fs_opt rows to draw (null: all)"),
    },
    "flan_cot_raw": {
        "zero_shot": (None, _OPT_INT, "rendered zs_opt rows to draw, as cot's zero_shot (null: all)"),
    },
    "baize": {},
    "messages": {
        "dataset": (None, (str, list, type(None)), "keep only rows whose `dataset` is this name (or one of a list)"),
        "split_long": (False, (bool,), "split conversations over max_seq_len into whole-turn chunks (qtulu)"),
    },
}
assert set(CONVERTERS) == set(FORMATS) == set(OPTIONS), "formats.CONVERTERS and recipes.FORMATS disagree"


def check_options(fmt: str, options: dict, source: str) -> None:
    """`DataError` naming the source when ``options`` has a key the converter does not know, or a
    value of the wrong type."""
    known = OPTIONS[fmt]
    unknown = set(options) - set(known)
    if unknown:
        valid = ", ".join(sorted(known)) or "none"
        raise DataError(f"source {source!r} (format {fmt}): unknown option(s) {sorted(unknown)} (valid: {valid})")
    for key, value in options.items():
        _, types, meaning = known[key]
        if isinstance(value, bool) and bool not in types or not isinstance(value, types):
            raise DataError(f"source {source!r} (format {fmt}): option {key}={value!r}: expected "
                            f"{' or '.join(t.__name__.replace('NoneType', 'null') for t in types)} ({meaning})")
        if isinstance(value, int) and not isinstance(value, bool) and value < 0:
            raise DataError(f"source {source!r} (format {fmt}): option {key}={value} must be >= 0")
    if fmt == "flan_v2" and options.get("portions", "tulu_v1") not in PORTIONS:
        raise DataError(f"source {source!r}: flan_v2 option portions={options['portions']!r} (known: {', '.join(PORTIONS)})")


def convert(fmt: str, rows: Iterable[Row], options: dict | None = None, context: Context | None = None) -> Out:
    """Run the converter ``fmt`` over ``(where, row)`` pairs: yields ``(where, messages | BadRow | Filtered)``.

    ``context`` defaults to the ``open_instruct`` profile, seed 42, no tokenizer.
    """
    if fmt not in CONVERTERS:
        raise DataError(f"unknown format {fmt!r} (known: {', '.join(CONVERTERS)})")
    return CONVERTERS[fmt](rows, dict(options or {}), context if context is not None else Context())
