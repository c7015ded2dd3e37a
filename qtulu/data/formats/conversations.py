"""Multi-turn chat sources: ShareGPT and Baize.

References (open-instruct, June 2023 release e44fcf588):

- ``scripts/split_sharegpt_conversations.py`` (FastChat's ``split_long_conversation`` with
  open-instruct's fix), run by ``scripts/prepare_train_data.sh`` on the raw ``sg_90k_part*`` files
  with the LLaMA tokenizer and ``--max-length 2048``: each turn costs ``len(tokenizer(value)) + 6``
  tokens (BOS included); the turns are cut to an even number and walked in (human, gpt) pairs; a
  chunk closes before the pair that would overflow; a pair longer than the budget on its own is
  skipped. Then ``filter_invalid_roles`` keeps only chunks that strictly alternate human, gpt,
  human, ... from a human turn.
- ``open_instruct/reformat_datasets.py`` ``convert_sharegpt_data``: human/user -> user, gpt/chatgpt
  -> assistant; a conversation with a ``system`` or ``bing`` turn is dropped; any other speaker
  raises.
- ``convert_baize_data``: the transcript is split on ``[|Human|]`` (the preamble before the first
  one is dropped), rounds that are blank or have no ``[|AI|]`` are skipped, each round is split on
  ``[|AI|]`` into a stripped user turn and a stripped reply.

Two behaviours of the reference are kept as they are, and counted in the manifest: the split loses
the last pair of a conversation when that pair opens a new chunk (the loop ends before the chunk
is written), and a skipped over-long pair. qtulu reports an unknown speaker as a bad row even when
splitting (open-instruct's split would drop it silently through the alternation check before its
converter could raise), since it means a file in another layout.
"""

from __future__ import annotations

from typing import Iterable

from qtulu.data.errors import BadRow, DataError
from qtulu.data.formats._rows import Context, Filtered, Messages, Out, Row, checked, text

_USER = ("human", "user")
_ASSISTANT = ("gpt", "chatgpt")
_DROPPED = ("system", "bing")
SHAREGPT_SPEAKERS = _USER + _ASSISTANT + _DROPPED
TURN_OVERHEAD = 6  # split_sharegpt_conversations.py: len(tokenizer(c["value"]).input_ids) + 6
BATCH = 512


def fastchat_split(lengths: list[int], max_length: int) -> list[tuple[int, int]]:
    """``[(start, end)]`` turn ranges of the chunks that ``split_one_sample`` makes of a conversation
    whose turns cost ``lengths`` tokens (empty ranges included, as it makes them)."""
    n = len(lengths) // 2 * 2
    if n < 2:
        return []
    out, start, cur = [], 0, 0
    for i in range(0, n, 2):
        pair_len = lengths[i] + lengths[i + 1]
        if cur + pair_len > max_length:
            out.append((start, i))
            start = i + 2 if pair_len > max_length else i
            cur = 0
        elif i == n - 2:
            out.append((start, i + 2))
        cur += pair_len
    return out


def _turns(row: dict) -> list[tuple[str, str]]:
    conv = row.get("conversations", row.get("items"))
    if conv is None:
        raise BadRow("missing_field", "no 'conversations' field")
    if not isinstance(conv, list):
        raise BadRow("bad_content_type", f"'conversations' is {type(conv).__name__}, not a list")
    turns = []
    for i, turn in enumerate(conv):
        if not isinstance(turn, dict):
            raise BadRow("bad_message", f"turn {i} is not an object")
        speaker = text(turn, "from")
        if speaker not in SHAREGPT_SPEAKERS:
            raise BadRow("unknown_speaker", f"turn {i} is from {speaker!r} (known: {', '.join(SHAREGPT_SPEAKERS)})")
        turns.append((speaker, text(turn, "value")))
    return turns


def _to_messages(turns: list[tuple[str, str]]) -> Messages | Filtered:
    msgs = []
    for speaker, value in turns:
        if speaker in _DROPPED:
            return Filtered("system_or_bing_turn", f"a {speaker!r} turn (open-instruct drops the conversation)")
        msgs.append({"role": "user" if speaker in _USER else "assistant", "content": value})
    return msgs if msgs else Filtered("empty_conversation")


def _alternates(turns: list[tuple[str, str]]) -> bool:
    return all(speaker == ("human", "gpt")[j % 2] for j, (speaker, _) in enumerate(turns))


def sharegpt(rows: Iterable[Row], options: dict, ctx: Context) -> Out:
    """ShareGPT: ``conversations`` = ``[{"from": human|gpt|..., "value"}]``. Option ``split_long``
    (what open-instruct did to the raw files): split at ``max_length`` tokens (default
    ``data.max_seq_len``) and keep the chunks that alternate human/gpt; without it, the file is taken
    as already split (open-instruct's ``sharegpt_html_cleaned_and_split.json``)."""
    split = bool(options.get("split_long"))
    budget = int(options.get("max_length") or ctx.max_seq_len)
    if split and ctx.tokenizer is None:
        raise DataError("sharegpt with split_long needs a tokenizer to count tokens")
    batch: list[tuple[str, list[tuple[str, str]]]] = []
    for where, turns in checked(rows, lambda row, _: _turns(row)):
        if isinstance(turns, BadRow):
            yield where, turns
            continue
        batch.append((where, turns))
        if len(batch) >= BATCH:
            yield from _emit(batch, split, budget, ctx)
            batch = []
    yield from _emit(batch, split, budget, ctx)


def _emit(batch, split: bool, budget: int, ctx: Context) -> Out:
    if not split:
        for where, turns in batch:
            yield where, _to_messages(turns)
        return
    from qtulu.data.tokenizer import count_tokens

    values = [v for _, turns in batch for _, v in turns]
    lengths = iter(count_tokens(ctx.tokenizer, values, add_bos=True))
    for where, turns in batch:
        lens = [next(lengths) + TURN_OVERHEAD for _ in turns]
        ranges = fastchat_split(lens, budget)
        covered = set()
        for start, end in ranges:
            covered.update(range(start, end))
            chunk = turns[start:end]
            if not chunk:
                continue  # filter_invalid_roles drops the empty chunks the split makes
            if not _alternates(chunk):
                yield f"{where}#{start}", Filtered("not_alternating", "a chunk that does not alternate human, gpt")
                continue
            yield f"{where}#{start}", _to_messages(chunk)
        lost = (len(turns) // 2 * 2 - len(covered)) // 2
        for _ in range(lost):
            yield where, Filtered("split_dropped_turn_pair", "a (human, gpt) pair left out by the split")


def baize(row: dict, options: dict, ctx: Context) -> list[Messages]:
    """Baize: ``input`` = ``"<preamble>[|Human|] ...\\n[|AI|] ...\\n[|Human|] "``."""
    msgs: Messages = []
    for k, rnd in enumerate(text(row, "input").split("[|Human|]")[1:]):
        if not rnd.strip() or "[|AI|]" not in rnd:
            continue
        parts = rnd.split("[|AI|]")
        if len(parts) != 2:
            raise BadRow("bad_transcript", f"round {k} has {len(parts) - 1} [|AI|] markers (open-instruct expects one)")
        msgs += [{"role": "user", "content": parts[0].strip()}, {"role": "assistant", "content": parts[1].strip()}]
    if not msgs:
        raise BadRow("bad_transcript", "no [|Human|] ... [|AI|] round in 'input'")
    return [msgs]
