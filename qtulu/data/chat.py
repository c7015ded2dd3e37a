"""Render conversations (Tulu format or the tokenizer's own template) and label assistant turns only.

Tulu format (open-instruct ``open_instruct/finetune.py`` ``encode_with_messages_format`` at
e44fcf588)::

    <|system|>\\n{content}\\n          (optional)
    <|user|>\\n{content}\\n
    <|assistant|>\\n{content}</s>      then " " before the next message, nothing at the end

Labels are -100 everywhere except on assistant content and the EOS that ends it.

Why a space after ``</s>`` and no final newline: open-instruct writes ``</s>\\n`` after each reply
and strips the whole text, so the text ends without a newline; its scripts tokenize with the *slow*
LLaMA tokenizer (``--use_slow_tokenizer``), after ``finetune.py`` re-adds ``</s>`` as a plain-string
special token, and the slow tokenizer then strips the whitespace on both sides of every special
token and SentencePiece-encodes each piece between them on its own, with its dummy prefix "\u2581".
So the Tülu models saw ``</s>`` ``\u2581<`` ``|`` ``user`` ..., never ``</s>`` ``<0x0A>`` ``<``. Writing a
space there makes the fast tokenizer produce exactly those ids (tests compare with that
encoding, re-implemented on SentencePiece, on real multi-turn rows). Two documented differences
remain (tests/data/test_token_parity.py): open-instruct masks only non-assistant messages, so it
also trains on the ``<|assistant|>`` tag of an assistant turn that follows another one (qtulu trains
on replies and EOS only); and it trains on texts that contain a special-token string such as
``</s>`` (its tokenizer turns it into the control token), which qtulu refuses as a bad row.

Why offsets and not prefix tokenization: tokenizing ``prompt`` and ``prompt + reply`` separately
and masking ``len(prompt_ids)`` tokens is the classic bug with SentencePiece tokenizers, because the
space/newline at the boundary merges differently in the two calls, shifting the mask by a token.
Here each conversation is rendered once to a string with the character ranges of every assistant
reply (+ EOS) recorded, tokenized once with ``return_offsets_mapping``, and a token is labelled iff
its character span lies inside one of those ranges. The ids are therefore exactly those of the
whole conversation, and the mask cannot drift (tests check this on the real LLaMA tokenizer).
Contents are stripped, as open-instruct does.
"""

from __future__ import annotations

import re
from typing import Any, Iterable, Sequence

import numpy as np

from qtulu.data.errors import BadRow

ROLES = ("system", "user", "assistant")
TULU_TAGS = {"system": "<|system|>\n", "user": "<|user|>\n", "assistant": "<|assistant|>\n"}
IGNORE_INDEX = -100


# --------------------------------------------------------------------------------------------
# validation


def validate_messages(messages: Any, special_re: re.Pattern | None = None, *,
                      allow_empty_reply: bool = False) -> list[dict[str, str]]:
    """Check a conversation and return it as a clean list of ``{"role", "content"}`` (contents stripped).

    Raises `BadRow` with reason ``no_messages``, ``bad_message``, ``unknown_role``, ``null_content``,
    ``bad_content_type``, ``invalid_utf8``, ``special_token_in_content``, ``empty_assistant_turn``
    (unless ``allow_empty_reply``: open-instruct keeps such rows, see `render_tulu_with_spans`)
    or ``no_assistant_turn``.
    """
    if not isinstance(messages, list) or not messages:
        raise BadRow("no_messages", f"expected a non-empty list of messages, got {type(messages).__name__}")
    out = []
    has_assistant = False
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise BadRow("bad_message", f"message {i} is not a {{role, content}} mapping: {str(m)[:80]!r}")
        role, content = m["role"], m["content"]
        if role not in ROLES:
            raise BadRow("unknown_role", f"message {i} has role {role!r} (expected one of {ROLES})")
        if content is None:
            raise BadRow("null_content", f"message {i} ({role}) has null content")
        if not isinstance(content, str):
            raise BadRow("bad_content_type", f"message {i} ({role}) content is {type(content).__name__}, not str")
        check_text(content, f"message {i} ({role})", special_re)
        content = content.strip()
        if role == "assistant":
            if not content and not allow_empty_reply:
                raise BadRow("empty_assistant_turn", f"message {i} is an empty assistant turn")
            has_assistant = True
        out.append({"role": role, "content": content})
    if not has_assistant:
        raise BadRow("no_assistant_turn", "the conversation has no assistant turn to learn from")
    return out


def check_text(text: str, what: str, special_re: re.Pattern | None = None) -> None:
    """`BadRow` if ``text`` holds undecodable bytes (lone surrogates from surrogateescape) or a special token."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise BadRow("invalid_utf8", f"{what} contains bytes that are not valid UTF-8 (at char {e.start})") from None
    if special_re is not None:
        hit = special_re.search(text)
        if hit:
            raise BadRow(
                "special_token_in_content",
                f"{what} contains the tokenizer's special token {hit.group(0)!r}, which would be read as a control token",
            )


def special_tokens_regex(tokenizer) -> re.Pattern | None:
    """A regex matching every added/special token string of ``tokenizer`` (None if it has none)."""
    toks = set(getattr(tokenizer, "all_special_tokens", []) or [])
    toks |= set(tokenizer.get_added_vocab().keys()) if hasattr(tokenizer, "get_added_vocab") else set()
    toks = sorted((t for t in toks if t), key=len, reverse=True)
    return re.compile("|".join(re.escape(t) for t in toks)) if toks else None


# --------------------------------------------------------------------------------------------
# rendering


def render_tulu(messages: Sequence[dict[str, str]], eos_token: str = "</s>", *, add_generation_prompt: bool = False) -> str:
    """The Tulu-format string of ``messages`` (contents stripped); optionally followed by the
    separator and ``<|assistant|>\\n`` (the prompt for the next reply)."""
    text, _ = render_tulu_with_spans(messages, eos_token)
    if add_generation_prompt:
        text += (_separator(messages[-1]["role"]) if messages else "") + TULU_TAGS["assistant"]
    return text


def _separator(role: str) -> str:
    """What follows a message when another one comes: a newline, or a space after a reply's EOS."""
    return " " if role == "assistant" else "\n"


def render_tulu_with_spans(messages: Sequence[dict[str, str]], eos_token: str = "</s>") -> tuple[str, list[tuple[int, int]]]:
    """(text, [(start, end)]) where each range covers one assistant reply and its EOS.

    An empty reply is rendered ``<|assistant|></s>`` with no range: open-instruct writes
    ``<|assistant|>\\n</s>``, its slow tokenizer strips the newline before ``</s>``, and its mask of
    the prompt (counted with the newline, one token more) covers that EOS, so nothing of the turn
    is trained on (finetune.py @ e44fcf588 and 7c5ee77a1; tests/data/test_empty_replies.py).
    """
    parts: list[str] = []
    spans: list[tuple[int, int]] = []
    pos = 0
    for k, m in enumerate(messages):
        role, content = m["role"], m["content"].strip()
        if k:
            sep = _separator(messages[k - 1]["role"])
            parts.append(sep)
            pos += len(sep)
        tag = TULU_TAGS[role]
        if role == "assistant" and not content:
            tag = tag.rstrip("\n") + eos_token
        parts.append(tag)
        pos += len(tag)
        if role == "assistant" and not content:
            continue
        if role == "assistant":
            parts.append(content + eos_token)
            spans.append((pos, pos + len(content) + len(eos_token)))
            pos += len(content) + len(eos_token)
        else:
            parts.append(content)
            pos += len(content)
    return "".join(parts), spans


def render_template_with_spans(messages: Sequence[dict[str, str]], tokenizer) -> tuple[str, list[tuple[int, int]]]:
    """Render with the tokenizer's own chat template and find each assistant reply (+ a following EOS).

    Replies are located in order in the rendered text; a template that rewrites content so that it
    can no longer be found is reported as `BadRow` ``template_mismatch``.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("chat_format='tokenizer' but the tokenizer has no chat_template (use chat_format: tulu)")
    text = tokenizer.apply_chat_template(list(messages), tokenize=False)
    eos = tokenizer.eos_token or ""
    spans, cursor = [], 0
    for i, m in enumerate(messages):
        content = m["content"].strip()
        if not content:
            continue
        at = text.find(content, cursor)
        if at < 0:
            raise BadRow("template_mismatch", f"message {i} ({m['role']}) not found verbatim in the chat template output")
        end = at + len(content)
        if m["role"] == "assistant":
            rest = text[end:]
            gap = len(rest) - len(rest.lstrip(" "))
            if eos and rest[gap:].startswith(eos):
                end += gap + len(eos)
            spans.append((at, end))
        cursor = end
    return text, spans


# --------------------------------------------------------------------------------------------
# tokenization


def label_from_offsets(offsets: np.ndarray, spans: Iterable[tuple[int, ...]]) -> np.ndarray:
    """Boolean mask over the tokens supervised by ``spans``: each span is ``(a, b)`` or ``(lo, a, b)``.

    A non-empty token ``[s, e)`` is supervised iff ``lo <= s``, ``e <= b`` and ``e > a``: it lies in
    the reply ``[a, b)``, except that it may also take the spaces ``[lo, a)`` just before it (a
    SentencePiece "\u2581answer" or BPE " answer" token after a template's space is the reply's first
    token). ``lo`` defaults to ``a``.
    """
    starts, ends = offsets[:, 0], offsets[:, 1]
    mask = np.zeros(len(offsets), dtype=bool)
    nonempty = ends > starts
    for span in spans:
        lo, a, b = span if len(span) == 3 else (span[0], *span)
        mask |= (starts >= lo) & (ends <= b) & (ends > a) & nonempty
    return mask


def _soft_start(text: str, a: int) -> int:
    """``a`` moved left over the spaces just before it (see `label_from_offsets`)."""
    lo = a
    while lo > 0 and text[lo - 1] == " ":
        lo -= 1
    return lo


def bos_token_id(tokenizer) -> int | None:
    """The id every row starts with: the tokenizer's BOS, unless its config says prompts take none
    (``add_bos_token: false`` in tokenizer_config.json, as a GGUF base's header says for SmolLM2,
    whose ``<|im_start|>`` is named BOS but opens chat turns instead). LLaMA's tokenizers leave the
    key out or set it true, and keep their ``<s>``."""
    if (getattr(tokenizer, "init_kwargs", None) or {}).get("add_bos_token") is False:
        return None
    return tokenizer.bos_token_id


def encode_batch(
    conversations: Sequence[Sequence[dict[str, str]]],
    tokenizer,
    chat_format: str = "tulu",
    *,
    add_bos: bool = True,
    word_cache: dict | None = None,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Like `tokenize_batch` but returns int32 numpy arrays ``(input_ids, labels)`` (the build's fast path).

    Tulu texts of a tokenizer converted from a SentencePiece model go through its exact, word-cached
    `qtulu.data.tokenizer.WordEncoder` (labels from each token's byte offsets, all texts at once in
    numpy); ``word_cache`` (an empty dict at first) keeps its distinct words across calls. Other texts
    call the Rust tokenizer directly and locate each supervised range with ``char_to_token`` (a few
    calls per reply) instead of materialising every token's offsets. Both follow `label_from_offsets`.
    """
    from qtulu.data.tokenizer import word_encoder

    texts, all_spans = [], []
    for msgs in conversations:
        if chat_format == "tulu":
            text, spans = render_tulu_with_spans(msgs, tokenizer.eos_token)
        elif chat_format == "tokenizer":
            text, spans = render_template_with_spans(msgs, tokenizer)
        else:
            raise ValueError(f"unknown chat_format {chat_format!r} (expected 'tulu' or 'tokenizer')")
        texts.append(text)
        all_spans.append(spans)
    if not texts:
        return []
    bos = bos_token_id(tokenizer) if add_bos else None
    out: list[tuple[np.ndarray, np.ndarray] | None] = [None] * len(texts)
    words = word_encoder(tokenizer) if chat_format == "tulu" else None
    if words is not None:
        mine = [k for k, t in enumerate(texts) if words.accepts(t)]
        if mine:
            encoded = _encode_words(words, [texts[k] for k in mine], [all_spans[k] for k in mine], bos, word_cache)
            for k, pair in zip(mine, encoded):
                out[k] = pair
    rest = [k for k, pair in enumerate(out) if pair is None]
    if rest:
        for k, pair in zip(rest, _encode_rust(tokenizer, [texts[k] for k in rest], [all_spans[k] for k in rest], bos)):
            out[k] = pair
    return out


def _encode_words(words, texts: list[str], all_spans: list, bos: int | None, cache: dict | None) -> list:
    """`encode_batch` through a `WordEncoder`: ``[(ids, labels) or None]`` (None: let the Rust tokenizer
    do that text; only if a token's byte length disagrees with the text, which the preconditions exclude)."""
    ids, nbytes, counts = words.encode(texts, cache)  # (T,), (T,), (N,)
    n = len(texts)
    text_bytes = np.empty(n, dtype=np.int64)  # (N,)
    rows = []  # (text, lo, a, b) in bytes from the text's start
    for k, (text, spans) in enumerate(zip(texts, all_spans)):
        ascii_ = text.isascii()
        text_bytes[k] = len(text) if ascii_ else len(text.encode("utf-8"))
        for a, b in spans:
            lo = _soft_start(text, a)
            if ascii_:
                rows.append((k, lo, a, b))
            else:
                rows.append((k, *(len(text[:x].encode("utf-8")) for x in (lo, a, b))))
    first = np.concatenate([[0], np.cumsum(counts)[:-1]])  # (N,) first token of each text
    ends = np.cumsum(nbytes)  # (T,) global byte offsets: texts laid end to end
    starts = ends - nbytes
    per_text = np.add.reduceat(nbytes, first)  # (N,)
    base = np.cumsum(per_text) - per_text  # (N,)
    labels = np.full_like(ids, IGNORE_INDEX)  # (T,)
    if rows:
        r = np.asarray(rows, dtype=np.int64).reshape(-1, 4)  # (S, 4)
        off = base[r[:, 0]]
        lo, a, b = r[:, 1] + off, r[:, 2] + off, r[:, 3] + off
        # the rule of label_from_offsets on sorted offsets: starts >= lo, ends > a, ends <= b
        s = np.maximum(np.searchsorted(starts, lo, "left"), np.searchsorted(ends, a, "right"))
        e = np.searchsorted(ends, b, "right")
        keep = e > s
        inside = np.zeros(len(ids) + 1, dtype=np.int32)
        np.add.at(inside, s[keep], 1)
        np.add.at(inside, e[keep], -1)
        mask = (np.cumsum(inside[:-1]) > 0) & (nbytes > 0)  # (T,)
        labels[mask] = ids[mask]
    if bos is not None:
        ids = np.insert(ids, first, bos)
        labels = np.insert(labels, first, IGNORE_INDEX)
        counts = counts + 1
    ends_ = np.cumsum(counts).tolist()
    good = (per_text == text_bytes).tolist()
    return [(ids[a:b], labels[a:b]) if g else None for a, b, g in zip([0] + ends_[:-1], ends_, good)]


def _encode_rust(tokenizer, texts: list[str], all_spans: list, bos: int | None) -> list:
    """`encode_batch` through the Rust tokenizer."""
    encs = tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=False)
    out = []
    for text, enc, spans in zip(texts, encs, all_spans):
        ids = np.asarray(enc.ids, dtype=np.int32)  # (T,)
        labels = np.full_like(ids, IGNORE_INDEX)  # (T,)
        for a, b in spans:
            lo = _soft_start(text, a)
            rng = _token_range(enc, lo, a, b)
            if rng is None:  # unusual alignment: fall back to every token's offsets
                offs = np.asarray(enc.offsets, dtype=np.int64).reshape(-1, 2)  # (T, 2)
                mask = label_from_offsets(offs, [(lo, a, b)])
                labels[mask] = ids[mask]
            else:
                labels[rng[0] : rng[1]] = ids[rng[0] : rng[1]]
        if bos is not None and (len(ids) == 0 or ids[0] != bos):
            ids = np.concatenate([np.asarray([bos], dtype=np.int32), ids])
            labels = np.concatenate([np.asarray([IGNORE_INDEX], dtype=np.int32), labels])
        out.append((ids, labels))
    return out


def _token_range(enc, lo: int, a: int, b: int) -> tuple[int, int] | None:
    """Tokens ``[s, e)`` supervised by the span ``(lo, a, b)`` (the rule of `label_from_offsets`), found
    with a few ``char_to_token`` calls; None when the ends cannot be located (the caller then uses
    every token's offsets)."""
    if b <= a:
        return (0, 0)
    s = enc.char_to_token(a)
    e = enc.char_to_token(b - 1)
    if s is None or e is None:
        return None

    def inside(i: int) -> bool:
        st, en = enc.token_to_chars(i)
        return st >= lo and en <= b and en > a and en > st

    n = len(enc.ids)
    if not inside(s):  # the first token straddles text before the reply: leave it unlabelled
        s += 1
    if not inside(e):
        e -= 1
    # byte-fallback tokens of one character share its span: take all of them at both ends
    while s > 0 and inside(s - 1):
        s -= 1
    while e + 1 < n and inside(e + 1):
        e += 1
    return (s, e + 1) if e >= s else (s, s)


def tokenize_batch(
    conversations: Sequence[Sequence[dict[str, str]]],
    tokenizer,
    chat_format: str = "tulu",
    *,
    add_bos: bool = True,
) -> list[tuple[list[int], list[int]]]:
    """Tokenize validated conversations in one batched call: ``[(input_ids, labels), ...]``.

    ``add_bos`` prepends the tokenizer's BOS (LLaMA-style) unless the rendered text already starts
    with it (chat templates usually include it).
    """
    return [(i.tolist(), l.tolist()) for i, l in encode_batch(conversations, tokenizer, chat_format, add_bos=add_bos)]


def tokenize_messages(messages, tokenizer, chat_format: str = "tulu", *, add_bos: bool = True) -> dict[str, list[int]]:
    """``{"input_ids", "labels"}`` of one conversation; labels -100 except assistant content + EOS.

    Raises `BadRow` when the conversation is malformed (see `validate_messages`).
    """
    msgs = validate_messages(messages, special_tokens_regex(tokenizer))
    ids, labels = tokenize_batch([msgs], tokenizer, chat_format, add_bos=add_bos)[0]
    return {"input_ids": ids, "labels": labels}


def message_token_counts(messages: Sequence[dict[str, str]], tokenizer, chat_format: str = "tulu") -> list[int]:
    """Tokens attributable to each message of the rendered conversation (tag + content + EOS/newline)."""
    if chat_format != "tulu":
        # template layouts vary; count the messages alone (an estimate, used only to choose split points)
        enc = tokenizer([m["content"] for m in messages], add_special_tokens=False)["input_ids"]
        return [len(e) + 4 for e in enc]
    text, _ = render_tulu_with_spans(messages, tokenizer.eos_token)
    bounds, pos = [], 0
    for m in messages:  # each message owns its tag, content (+ EOS) and the separator after it
        pos += len(TULU_TAGS[m["role"]]) + len(m["content"].strip()) + 1
        if m["role"] == "assistant":
            pos += len(tokenizer.eos_token)
        bounds.append(pos)
    offs = np.asarray(tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]).reshape(-1, 2)
    which = np.searchsorted(np.asarray(bounds), offs[:, 0], side="right")  # message index of each token
    counts = np.bincount(which, minlength=len(messages))[: len(messages)]
    return counts.tolist()


def split_conversation(messages: Sequence[dict[str, str]], counts: Sequence[int], budget: int) -> list[list[dict[str, str]]]:
    """Split a long conversation into chunks of whole turns that fit ``budget`` tokens (FastChat-style).

    A chunk starts at a user turn (a leading system turn stays with the first chunk) and ends with an
    assistant turn; a single turn pair over budget becomes its own chunk (truncated or dropped later,
    by policy).
    """
    chunks: list[list[dict[str, str]]] = []
    cur: list[dict[str, str]] = []
    cur_len = 0
    i = 0
    n = len(messages)
    while i < n:
        # a unit: optional system/user turns up to and including the next assistant turn
        j = i
        while j < n and messages[j]["role"] != "assistant":
            j += 1
        unit = list(messages[i : j + 1])
        unit_len = sum(counts[i : j + 1])
        i = j + 1
        if cur and cur_len + unit_len > budget and unit[0]["role"] != "assistant":
            chunks.append(cur)
            cur, cur_len = [], 0
        cur.extend(unit)
        cur_len += unit_len
    if cur:
        chunks.append(cur)
    return [c for c in chunks if any(m["role"] == "assistant" for m in c)]


def format_supervised(input_ids: Sequence[int], labels: Sequence[int], tokenizer, *, color: bool = False) -> str:
    """The decoded example with supervised spans made visible: ``⟦...⟧`` (or green when ``color``)."""
    open_, close = ("\x1b[32m", "\x1b[0m") if color else ("⟦", "⟧")
    out, run, run_sup = [], [], None
    for tok, lab in zip(input_ids, labels):
        sup = lab != IGNORE_INDEX
        if run and sup != run_sup:
            out.append(_decode_run(run, run_sup, tokenizer, open_, close))
            run = []
        run.append(tok)
        run_sup = sup
    if run:
        out.append(_decode_run(run, run_sup, tokenizer, open_, close))
    return "".join(out)


def _decode_run(ids, sup, tokenizer, open_, close) -> str:
    text = tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    return f"{open_}{text}{close}" if sup else text
