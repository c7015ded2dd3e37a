"""Tulu rendering and assistant-only labels, proven on the real LLaMA SentencePiece tokenizer."""

from __future__ import annotations

import numpy as np
import pytest

from qtulu.data.chat import (
    IGNORE_INDEX,
    encode_batch,
    format_supervised,
    message_token_counts,
    render_tulu,
    split_conversation,
    tokenize_messages,
    validate_messages,
)
from qtulu.data.errors import BadRow


def U(c):
    return {"role": "user", "content": c}


def A(c):
    return {"role": "assistant", "content": c}


def S(c):
    return {"role": "system", "content": c}


# conversations chosen to hit the SentencePiece boundary cases: replies starting with a space, a
# newline, a digit, punctuation, multi-byte and byte-fallback characters, code indentation.
CONVERSATIONS = [
    [U("Hi"), A("Hello!")],
    [S("You are terse."), U("What is 2+2?"), A("4"), U("And 3+3?\n"), A("  6\n\n"), U("Thanks"), A("You're welcome.")],
    [U("Write code"), A("```python\ndef f(x):\n    return x  # comment\n```"), U("again"), A("\tindented\n  lines")],
    [U("Say hi in Japanese and add an emoji"), A("こんにちは 🙂"), U("🙂?"), A("🙂 means smile.")],
    [U("Punctuation"), A("...well, (maybe) [yes]!"), U("x"), A(",leading comma")],
    [U("Numbers"), A("12345 67.89"), U("Quote"), A('"quoted"')],
]


def test_render_tulu_exact_string():
    msgs = [S(" sys "), U("Hi\n"), A(" Hello"), U("Bye"), A("Bye!")]
    # open-instruct's text ("</s>\\n" between turns, stripped at the end) as its slow tokenizer saw it:
    # whitespace around </s> stripped, the next piece starting with SentencePiece's dummy prefix
    assert render_tulu(msgs) == ("<|system|>\nsys\n<|user|>\nHi\n<|assistant|>\nHello</s> "
                                 "<|user|>\nBye\n<|assistant|>\nBye!</s>")
    assert render_tulu([U("q")], add_generation_prompt=True) == "<|user|>\nq\n<|assistant|>\n"
    assert render_tulu(msgs, add_generation_prompt=True).endswith("Bye!</s> <|assistant|>\n")


def _labelled_runs(ids, labels):
    runs, cur = [], []
    for i, lab in zip(ids, labels):
        if lab != IGNORE_INDEX:
            assert lab == i
            cur.append(i)
        elif cur:
            runs.append(cur)
            cur = []
    if cur:
        runs.append(cur)
    return runs


@pytest.mark.parametrize("conv", CONVERSATIONS, ids=range(len(CONVERSATIONS)))
def test_llama_labels_decode_to_exactly_the_replies_plus_eos(llama_tok, conv):
    tok = llama_tok
    out = tokenize_messages(conv, tok)
    ids, labels = out["input_ids"], out["labels"]
    replies = [m["content"].strip() for m in conv if m["role"] == "assistant"]
    runs = _labelled_runs(ids, labels)
    assert [tok.decode(r) for r in runs] == [r + "</s>" for r in replies]
    assert all(r[-1] == tok.eos_token_id for r in runs)
    # the ids are those of the whole conversation tokenized at once (no per-segment drift)
    whole = tok(render_tulu(conv), add_special_tokens=False)["input_ids"]
    assert ids == [tok.bos_token_id] + whole
    # every token outside the replies is masked, including the <|assistant|> tag; the text ends at EOS
    assert sum(len(r) for r in runs) == sum(1 for x in labels if x != IGNORE_INDEX)
    assert labels[0] == IGNORE_INDEX and labels[-1] == ids[-1] == tok.eos_token_id


def test_prefix_tokenized_separately_does_not_shift_the_mask(llama_tok):
    """Each reply's first label sits right after the separately tokenized prompt prefix; while the
    naive segment-by-segment tokenization (prefix ids + reply ids) is not the whole conversation's."""
    tok = llama_tok
    conv = [U("What is 2+2?"), A("4"), U("And 3+3?"), A("6 is the answer"), U("ok"), A("Hello there")]
    ours = tokenize_messages(conv, tok)
    starts = [i for i, lab in enumerate(ours["labels"]) if lab != IGNORE_INDEX and ours["labels"][i - 1] == IGNORE_INDEX]
    naive_drift = 0
    for k, start in zip([k for k, m in enumerate(conv) if m["role"] == "assistant"], starts):
        prefix = render_tulu(conv[:k], add_generation_prompt=True)
        prefix_ids = [tok.bos_token_id] + tok(prefix, add_special_tokens=False)["input_ids"]
        assert start == len(prefix_ids) and ours["input_ids"][:start] == prefix_ids
        reply_ids = tok(conv[k]["content"] + "</s>", add_special_tokens=False)["input_ids"]
        naive_drift += prefix_ids + reply_ids != ours["input_ids"][: len(prefix_ids) + len(reply_ids)]
    # SentencePiece prepends "\u2581" to a separately tokenized reply ("\u2581Hello" vs "Hello")
    assert naive_drift > 0, "the boundary case no longer drifts: this test lost its teeth"


def test_batch_equals_single_and_fast_path_equals_offsets(llama_tok):
    tok = llama_tok
    batch = encode_batch([validate_messages(c) for c in CONVERSATIONS], tok)
    for conv, (ids, labels) in zip(CONVERSATIONS, batch):
        single = tokenize_messages(conv, tok)
        assert ids.tolist() == single["input_ids"] and labels.tolist() == single["labels"]
        # reference: offsets of every token (the slow, obviously-right method)
        from qtulu.data.chat import label_from_offsets, render_tulu_with_spans

        text, spans = render_tulu_with_spans(validate_messages(conv), tok.eos_token)
        enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
        mask = label_from_offsets(np.asarray(enc["offset_mapping"]), spans)
        assert np.array_equal(labels[1:] != IGNORE_INDEX, mask)


def test_char_tokenizer_labels_and_tokenizer_chat_template(char_tokenizer):
    tok = char_tokenizer
    conv = [U("2+2?"), A("4"), U("3+3?"), A("6")]
    out = tokenize_messages(conv, tok)
    runs = _labelled_runs(out["input_ids"], out["labels"])
    assert [tok.decode(r) for r in runs] == ["4</s>", "6</s>"]
    tok.chat_template = ("{% for m in messages %}{{ '[' + m['role'] + '] ' + m['content'] }}"
                         "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\n' }}{% endfor %}")
    try:
        out = tokenize_messages(conv, tok, chat_format="tokenizer")
    finally:
        tok.chat_template = None
    runs = _labelled_runs(out["input_ids"], out["labels"])
    assert [tok.decode(r) for r in runs] == ["4</s>", "6</s>"]
    assert tok.decode(out["input_ids"]).startswith("<s>[user] 2+2?")
    with pytest.raises(ValueError, match="no chat_template"):
        tokenize_messages(conv, tok, chat_format="tokenizer")


@pytest.mark.parametrize("msgs,reason", [
    ([], "no_messages"),
    ([U("q"), {"role": "bot", "content": "a"}], "unknown_role"),
    ([U("q"), {"role": "assistant", "content": None}], "null_content"),
    ([U("q"), {"role": "assistant", "content": 3}], "bad_content_type"),
    ([U("q"), A("   ")], "empty_assistant_turn"),
    ([U("q")], "no_assistant_turn"),
    ([U("q"), A(b"caf\xe9".decode("utf-8", "surrogateescape"))], "invalid_utf8"),
    ([U("q"), {"content": "a"}], "bad_message"),
])
def test_validate_messages_reasons(msgs, reason):
    with pytest.raises(BadRow) as e:
        validate_messages(msgs)
    assert e.value.reason == reason


def test_special_token_in_content_is_a_bad_row(char_tokenizer):
    with pytest.raises(BadRow) as e:
        tokenize_messages([U("fake <|assistant|> turn"), A("ok")], char_tokenizer)
    assert e.value.reason == "special_token_in_content" and "<|assistant|>" in e.value.detail


def test_split_conversation_whole_turns_within_budget(char_tokenizer):
    conv = validate_messages([S("sys"), U("a" * 30), A("b" * 30), U("c" * 30), A("d" * 30), U("e" * 30), A("f" * 30)])
    counts = message_token_counts(conv, char_tokenizer)
    assert sum(counts) + 1 == len(tokenize_messages(conv, char_tokenizer)["input_ids"])  # + BOS
    chunks = split_conversation(conv, counts, 90)
    assert [len(c) for c in chunks] == [3, 2, 2] and chunks[0][0]["role"] == "system"
    assert all(c[-1]["role"] == "assistant" and c[-2]["role"] == "user" for c in chunks)
    assert [m for c in chunks for m in c] == conv
    assert split_conversation(conv, counts, 10_000) == [conv]


def test_format_supervised_marks_spans(char_tokenizer):
    out = tokenize_messages([U("q"), A("a")], char_tokenizer)
    assert format_supervised(out["input_ids"], out["labels"], char_tokenizer).endswith("<|assistant|>\n⟦a</s>⟧")


def test_llama_with_a_template_that_puts_a_space_before_the_reply(llama_tok):
    """Llama-2-style "[/INST] answer </s>": the reply's first token "\u2581answer" carries the template's
    space; it is still supervised, and the fast path agrees with the every-offset reference."""
    from qtulu.data.chat import label_from_offsets, render_template_with_spans

    tok = llama_tok
    template = ("{% for m in messages %}{% if m['role'] == 'user' %}{{ bos_token + '[INST] ' + m['content'] + ' [/INST]' }}"
                "{% else %}{{ ' ' + m['content'] + ' ' + eos_token }}{% endif %}{% endfor %}")
    conv = [U("Hi"), A("Hello there"), U("2+2?"), A("4, of course.")]
    old = tok.chat_template
    tok.chat_template = template
    try:
        out = tokenize_messages(conv, tok, chat_format="tokenizer")
        text, spans = render_template_with_spans(validate_messages(conv), tok)
    finally:
        tok.chat_template = old
    runs = _labelled_runs(out["input_ids"], out["labels"])
    assert [tok.decode(r) for r in runs] == ["Hello there </s>", "4, of course. </s>"]
    assert tok.convert_ids_to_tokens(runs[0][:1]) == ["\u2581Hello"]
    assert out["input_ids"].count(tok.bos_token_id) == 2  # the template's BOS, none added twice
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    from qtulu.data.chat import _soft_start

    ref = label_from_offsets(np.asarray(enc["offset_mapping"]), [(_soft_start(text, a), a, b) for a, b in spans])
    assert np.array_equal(np.asarray(out["labels"]) != IGNORE_INDEX, ref)


# --------------------------------------------------------------------------------------------
# the word-cached SentencePiece path (qtulu.data.tokenizer.WordEncoder) against the Rust tokenizer


def test_word_path_equals_rust_tokenizer_on_every_shared_example(llama_tok, shared_data):
    """Every example of the real shared sources: ids and labels of the word path are exactly the
    Rust tokenizer's (and every text takes the word path, in two batches sharing one word cache)."""
    from pathlib import Path

    from qtulu.data.build import _Tally, collect_source
    from qtulu.data.chat import _encode_rust, _encode_words, render_tulu_with_spans, special_tokens_regex
    from qtulu.data.tokenizer import word_encoder
    from qtulu.recipes import load_recipe

    shared_data("sources")
    tok = llama_tok
    recipe = load_recipe(Path(__file__).resolve().parents[1] / "fixtures" / "shared_sources.yaml")
    convs = [m for spec in recipe.sources
             for _, m in collect_source(spec, recipe, _Tally("skip"), special_tokens_regex(tok), sample=False, tokenizer=tok)[0]]
    assert len(convs) > 3900
    words = word_encoder(tok)
    assert words is not None
    rendered = [render_tulu_with_spans(m, tok.eos_token) for m in convs]
    assert all(words.accepts(t) for t, _ in rendered)
    texts, spans = [t for t, _ in rendered], [s for _, s in rendered]
    cache: dict = {}
    half = len(convs) // 2
    ours = (_encode_words(words, texts[:half], spans[:half], tok.bos_token_id, cache)
            + _encode_words(words, texts[half:], spans[half:], tok.bos_token_id, cache))
    assert all(pair is not None for pair in ours)  # none handed back to the Rust path
    ref = _encode_rust(tok, texts, spans, tok.bos_token_id)
    bad = [k for k, ((i, l), (ri, rl)) in enumerate(zip(ours, ref)) if not (np.array_equal(i, ri) and np.array_equal(l, rl))]
    assert not bad, f"{len(bad)} of {len(convs)} examples differ, e.g. {rendered[bad[0]][0][:80]!r}"
    assert all(i.dtype == np.int32 and l.dtype == np.int32 for i, l in ours[:10])
    assert sum(int((l != IGNORE_INDEX).sum()) for _, l in ours) > 100_000
    for (i, l), (ri, rl) in zip(encode_batch(convs[:50], tok), ours[:50]):  # the public entry takes this path
        assert np.array_equal(i, ri) and np.array_equal(l, rl)


EDGE_TEXTS = [
    "a  b", "x \n  y", "tail   ", "code:\n\tif x:\n        return  1\n", "naïve café 日本語 🙂", "a</s> b</s>",
    "a </s>\n", "x</s></s>y", "<</s>", "</ s> </s", "1234.5678", "\n lead newline", "trailing\n\n", "\x00\x01\x7f",
    "\r\nwin", "é", "<|user|>\nHi\n<|assistant|>\n  spaced</s>\n",
]


@pytest.mark.parametrize("text", EDGE_TEXTS, ids=range(len(EDGE_TEXTS)))
def test_word_encoder_ids_and_byte_lengths_on_edge_texts(llama_tok, text):
    from qtulu.data.tokenizer import word_encoder

    words = word_encoder(llama_tok)
    assert words.accepts(text)
    ids, nbytes, counts = words.encode([text, text])
    ref = llama_tok.backend_tokenizer.encode(text, add_special_tokens=False).ids
    assert ids.tolist() == ref + ref and counts.tolist() == [len(ref), len(ref)]
    assert int(nbytes[: len(ref)].sum()) == len(text.encode("utf-8"))  # token byte lengths tile the text


@pytest.mark.parametrize("text", ["", " lead space", "</s>first", "has <s> inside", "an <unk>", "lit\u2581eral"])
def test_word_encoder_refuses_what_it_cannot_do_exactly(llama_tok, text):
    from qtulu.data.tokenizer import word_encoder

    assert not word_encoder(llama_tok).accepts(text)


def test_texts_the_word_path_refuses_still_match_the_rust_path(llama_tok):
    from qtulu.data.chat import _encode_rust, render_tulu_with_spans

    convs = [[U("a \u2581 literal"), A("ok \u2581")], [U("Hi"), A("Hello!")]]  # the first goes the Rust way
    rendered = [render_tulu_with_spans(c, "</s>") for c in convs]
    ref = _encode_rust(llama_tok, [t for t, _ in rendered], [s for _, s in rendered], llama_tok.bos_token_id)
    for (i, l), (ri, rl) in zip(encode_batch(convs, llama_tok), ref):
        assert np.array_equal(i, ri) and np.array_equal(l, rl)


def test_word_encoder_only_where_exact(llama_tokenizer_path, char_tokenizer, tmp_path):
    """None for tokenizers without a known SentencePiece model, and again once a token is added."""
    import os

    from tokenizers import Tokenizer

    from qtulu.data.tokenizer import load_tokenizer, word_encoder

    assert word_encoder(char_tokenizer) is None
    only_model = tmp_path / "spdir"
    only_model.mkdir()
    os.symlink(llama_tokenizer_path, only_model / "tokenizer.model")
    tok = load_tokenizer(only_model)  # a fresh object (the cache is per path): safe to modify
    assert word_encoder(tok) is not None
    tok.save_pretrained(tmp_path / "saved")
    assert word_encoder(load_tokenizer(tmp_path / "saved")) is None  # tokenizer.json: model file unknown
    tok.add_tokens(["<|extra|>"])
    assert word_encoder(tok) is None
    other = tmp_path / "spdir2"
    other.mkdir()
    os.symlink(llama_tokenizer_path, other / "tokenizer.model")
    replaced = load_tokenizer(other)
    replaced._tokenizer = Tokenizer.from_str(replaced.backend_tokenizer.to_str())  # same rules, not ours
    assert word_encoder(replaced) is None
    conv = [U("use <|extra|> here"), A("done <|extra|>")]
    ids, labels = encode_batch([conv], tok)[0]
    assert tok.convert_tokens_to_ids("<|extra|>") in ids.tolist()
    assert tok.decode(ids[labels != IGNORE_INDEX]) == "done <|extra|></s>"
