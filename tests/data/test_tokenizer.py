"""load_tokenizer: a SentencePiece .model file, a folder, errors; equal to SentencePiece itself."""

from __future__ import annotations

import os

import pytest

from qtulu.data.tokenizer import TokenizerError, load_tokenizer


def test_model_file_matches_sentencepiece_and_folders_load(llama_tokenizer_path, tmp_path):
    import sentencepiece as spm

    tok = load_tokenizer(llama_tokenizer_path)
    assert tok.is_fast and len(tok) == 32000 and (tok.bos_token, tok.eos_token) == ("<s>", "</s>")
    assert tok.name_or_path == str(llama_tokenizer_path.resolve()) and tok.pad_token is not None
    sp = spm.SentencePieceProcessor(model_file=str(llama_tokenizer_path))
    for text in ["Hello world", "two  spaces\nnew line\ttab", "def f(x):\n    return x", "x\n  y", "naïve café 日本語 🙂", "1234.5678"]:
        assert tok(text, add_special_tokens=False)["input_ids"] == sp.encode(text), text
    only_model = tmp_path / "spdir"
    only_model.mkdir()
    os.symlink(llama_tokenizer_path, only_model / "tokenizer.model")
    assert load_tokenizer(only_model)("Hello world", add_special_tokens=False)["input_ids"] == sp.encode("Hello world")
    saved = tmp_path / "saved"
    tok.save_pretrained(saved)
    assert load_tokenizer(saved)("naïve café", add_special_tokens=False)["input_ids"] == sp.encode("naïve café")


def test_errors(tmp_path):
    (tmp_path / "vocab.txt").write_text("x")
    with pytest.raises(TokenizerError, match="expected a SentencePiece .model file"):
        load_tokenizer(tmp_path / "vocab.txt")
    with pytest.raises(TokenizerError, match="no tokenizer.json"):
        load_tokenizer(tmp_path)
    with pytest.raises(TokenizerError, match="tokenizer not found"):
        load_tokenizer(tmp_path / "missing" / "tokenizer.model")


def test_agrees_with_sentencepiece_on_real_text(llama_tokenizer_path, shared_data):
    """Every reply of the real Code-Alpaca and ShareGPT samples tokenizes exactly as SentencePiece does.
    (transformers' own conversion differs on whitespace runs: code indentation, double spaces.)
    Texts are stripped: the fast Metaspace adds no dummy prefix before leading spaces, which the
    Tulu rendering never produces (every text starts with a role tag)."""
    import json

    import sentencepiece as spm

    tok = load_tokenizer(llama_tokenizer_path)
    sp = spm.SentencePieceProcessor(model_file=str(llama_tokenizer_path))
    code = json.loads(shared_data("sources", "code_alpaca_2k.json").read_text())
    chats = json.loads(shared_data("sources", "sharegpt_format_sample.json").read_text())
    texts = [r["output"].strip() for r in code] + [t["value"].strip() for c in chats for t in c["conversations"]]
    texts = [t for t in texts if t]
    ours = [e.ids for e in tok.backend_tokenizer.encode_batch(texts, add_special_tokens=False)]
    theirs = sp.encode(texts)
    bad = [t for t, a, b in zip(texts, ours, theirs) if a != b]
    assert not bad, f"{len(bad)} of {len(texts)} texts differ from SentencePiece, e.g. {bad[0][:80]!r}"
    assert sum("    " in t for t in texts) > 100  # the sample has plenty of indentation to get wrong


def test_llama_adds_bos_as_in_2023_whatever_transformers_does(llama_tokenizer_path, tmp_path):
    """Issue 27: transformers 5.x converts a bare LLaMA tokenizer.model without a BOS ("Hello world" ->
    [15043, 3186]); LLaMA's tokenizer of 2023 (open-instruct's) gave [1, 15043, 3186], and decoding a
    clipped passage gave "<s> ..." (TyDi QA's prompts carry it). Pinned on the real tokenizer.model,
    as a file, a folder holding only it, and that tokenizer saved and loaded again."""
    only_model = tmp_path / "spdir"
    only_model.mkdir()
    os.symlink(llama_tokenizer_path, only_model / "tokenizer.model")
    saved = tmp_path / "saved"
    load_tokenizer(llama_tokenizer_path).save_pretrained(saved)
    for where in (llama_tokenizer_path, only_model, saved):
        tok = load_tokenizer(where)
        assert tok("Hello world")["input_ids"] == [1, 15043, 3186], where
        assert tok.encode("Hello world") == [1, 15043, 3186] and tok(["Hello", "world"])["input_ids"] == [[1, 15043], [1, 3186]]
        assert tok("Hello world", add_special_tokens=False)["input_ids"] == [15043, 3186]
        assert tok.decode(tok.encode("Hello world")[:2]) == "<s> Hello"
