"""Batched generation and scoring: left padding done right (batch size 1 == batch size 8)."""

from __future__ import annotations

import pytest
import torch

from qtulu.evals.lm import LM, cut_at_stop

PROMPTS = ["Q: 2+2?\nA:", "hi", "The quick brown fox jumps over the lazy", "x = 1\ny =", "a" * 37, "zz"]


def test_cut_at_stop():
    assert cut_at_stop("abc\n\ndef", ["\n\n", "d"]) == "abc"
    assert cut_at_stop("abc", ["x"]) == "abc" and cut_at_stop("abc", []) == "abc"


def test_greedy_generation_independent_of_batch_size(lora_pair):
    model, tok = lora_pair
    from qtulu.adapters import set_active

    for name in ("alpha", "base"):
        set_active(model, name)
        outs = [LM(model, tok, batch_size=bs, chat_format=None).generate(PROMPTS, max_new_tokens=8)
                for bs in (1, 8)]
        assert outs[0] == outs[1], name
        assert len({o[0] for o in outs[0]}) > 1  # not a degenerate constant output
    set_active(model, "alpha")


def test_scoring_independent_of_batch_size(lora_pair):
    model, tok = lora_pair
    lms = [LM(model, tok, batch_size=bs, chat_format=None) for bs in (1, 8)]
    ll = [lm.loglikelihood([(p, " yes it is") for p in PROMPTS]) for lm in lms]
    nt = [lm.next_token_logprobs(PROMPTS, [10, 20, 30, 40]) for lm in lms]
    for a, b in zip(ll[0], ll[1]):
        assert a[0] == pytest.approx(b[0], abs=1e-4) and a[1] == b[1]
    torch.testing.assert_close(torch.tensor(nt[0]), torch.tensor(nt[1]), rtol=0, atol=1e-4)


def test_loglikelihood_equals_manual_sum(tiny):
    model, tok = tiny
    lm = LM(model, tok, batch_size=2, chat_format=None)
    (got, _), = lm.loglikelihood([("The cat", " sat")])
    ids = torch.tensor([lm.encode("The cat sat")])  # char tokenizer: continuation = last 4 tokens
    with torch.no_grad():
        logp = model(input_ids=ids).logits.double().log_softmax(-1)[0]
    want = sum(float(logp[t - 1, ids[0, t]]) for t in range(ids.shape[1] - 4, ids.shape[1]))
    assert got == pytest.approx(want, abs=1e-4)


def test_stop_strings_and_sampling(tiny):
    model, tok = tiny
    lm = LM(model, tok, batch_size=4, chat_format=None)
    free = lm.generate(PROMPTS[:4], max_new_tokens=12)
    stop_char = free[0][0][2]  # a character the model does produce: generation must stop before it
    cut = lm.generate(PROMPTS[:4], max_new_tokens=12, stop=[stop_char])
    assert cut[0][0] == free[0][0][:free[0][0].index(stop_char)]
    assert all(stop_char not in c[0] for c in cut)
    samples = lm.generate(PROMPTS[:2], max_new_tokens=6, temperature=0.8, num_samples=3, seed=1)
    assert [len(s) for s in samples] == [3, 3]
    assert samples == lm.generate(PROMPTS[:2], max_new_tokens=6, temperature=0.8, num_samples=3, seed=1)
    with pytest.raises(ValueError, match="greedy"):
        lm.generate(PROMPTS[:1], num_samples=2)


def test_chat_formats(char_tokenizer):
    assert LM(None, char_tokenizer, chat_format="tulu").chat("hi", "A:") == "<|user|>\nhi\n<|assistant|>\nA:"
    assert LM(None, char_tokenizer, chat_format=None).chat("hi", "\nA:") == "hi\nA:"
    with pytest.raises(ValueError):
        LM(None, char_tokenizer, chat_format="chatml")
