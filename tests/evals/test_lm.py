"""Batched generation and scoring: scores independent of the batch size, open-instruct's decoding."""

from __future__ import annotations

import random

import pytest
import torch

from qtulu.evals.lm import LM, cut_at_stop

PROMPTS = ["Q: 2+2?\nA:", "hi", "The quick brown fox jumps over the lazy", "x = 1\ny =", "a" * 37, "zz"]


def _varied_prompts(n=17, seed=0):
    rng = random.Random(seed)
    return ["".join(rng.choice("abcdefgh ijkl\nQ:?") for _ in range(rng.randint(3, 260))) for _ in range(n)]


def test_cut_at_stop():
    assert cut_at_stop("abc\n\ndef", ["\n\n", "d"]) == "abc"
    assert cut_at_stop("abc", ["x"]) == "abc" and cut_at_stop("abc", []) == "abc"


def test_greedy_generation_independent_of_batch_size(lora_pair):
    model, tok = lora_pair
    from qtulu.adapters.store import set_active

    for name in ("alpha", "base"):
        set_active(model, name)
        outs = [LM(model, tok, batch_size=bs, chat_format=None).generate(PROMPTS, max_new_tokens=8)
                for bs in (1, 8)]
        assert outs[0] == outs[1], name
        assert len({o[0] for o in outs[0]}) > 1  # not a degenerate constant output
    set_active(model, "alpha")


def _scores(model, tok, bs, prompts):
    lm = LM(model, tok, batch_size=bs, chat_format=None)
    nt = torch.tensor(lm.next_token_logprobs(prompts, [10, 20, 30, 40]), dtype=torch.float64)
    ll = torch.tensor([x for x, _ in lm.loglikelihood([(p, " yes it is") for p in prompts])], dtype=torch.float64)
    return nt, ll


@pytest.mark.parametrize("dtype,quantize", [(torch.float32, None), (torch.bfloat16, None), (torch.bfloat16, "nf4")])
def test_scores_bit_identical_at_any_batch_size_on_qtulu_attention(char_tokenizer, dtype, quantize):
    """A model as qtulu loads it (qtulu_varlen attention): right padding with the pad run as its own
    packed sequence gives every example the same attention at batch 1, 3 and 8. bf16 and NF4 scores
    come out bit-identical on the CPU; fp32 ones within 1e-5 (MKL's fp32 matmuls may round a row
    differently for another row count: 5e-7 measured)."""
    from qtulu.model.load import load_base
    from qtulu.model.tiny import build_tiny_llama

    base = build_tiny_llama(seed=1, dtype=torch.float32, hidden_size=128, intermediate_size=344,
                            num_attention_heads=4, num_key_value_heads=2)
    model, _ = load_base(base, quantize=quantize, compute_dtype=dtype, device="cpu", tokenizer=char_tokenizer)
    assert model.config._attn_implementation == "qtulu_varlen"
    prompts = _varied_prompts()
    ref = _scores(model, char_tokenizer, 1, prompts)
    for bs in (3, 8):
        got = _scores(model, char_tokenizer, bs, prompts)
        if dtype == torch.float32:
            assert max((got[i] - ref[i]).abs().max() for i in (0, 1)) <= 1e-5, bs
        else:
            assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1]), (dtype, quantize, bs)


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_scores_within_1e5_in_fp32_on_transformers_attention(impl, char_tokenizer):
    """Any other model: right padding and an attention mask; fp32 log-probabilities agree within 1e-5
    (in bf16 eager attention is bit-identical, SDPA's CPU kernel differs by up to ~1e-2)."""
    from qtulu.model.tiny import build_tiny_llama

    model = build_tiny_llama(seed=1, dtype=torch.float32, hidden_size=128, intermediate_size=344)
    model.set_attn_implementation(impl)
    prompts = _varied_prompts(seed=1)
    (nt1, ll1), (nt8, ll8) = (_scores(model, char_tokenizer, bs, prompts) for bs in (1, 8))
    assert (nt1 - nt8).abs().max() <= 1e-5 and (ll1 - ll8).abs().max() <= 1e-5


def test_loglikelihood_equals_manual_sum(tiny):
    model, tok = tiny
    lm = LM(model, tok, batch_size=2, chat_format=None)
    (got, _), = lm.loglikelihood([("The cat", " sat")])
    ids = torch.tensor([lm.encode("The cat sat")])  # char tokenizer: continuation = last 4 tokens
    with torch.no_grad():
        logp = model(input_ids=ids).logits.double().log_softmax(-1)[0]
    want = sum(float(logp[t - 1, ids[0, t]]) for t in range(ids.shape[1] - 4, ids.shape[1]))
    assert got == pytest.approx(want, abs=1e-4)
    # token_logprobs: the same sum from an explicit start; a start at the end scores nothing
    seq = lm.encode("The cat sat")
    (a, _), (b, greedy) = lm.token_logprobs([(seq, len(seq) - 4), (seq, len(seq))])
    assert a == pytest.approx(want, abs=1e-4) and (b, greedy) == (0.0, True)


def test_truncation_keeps_the_bos(char_tokenizer):
    lm = LM(None, char_tokenizer, chat_format=None, max_length=5)
    ids = lm.encode("abcdefgh")
    assert ids[0] == char_tokenizer.bos_token_id
    assert lm._truncate_left(ids) == [ids[0]] + ids[-4:]
    assert LM(None, char_tokenizer, max_length=None)._truncate_left(ids) == ids


def test_continuation_decoded_as_open_instruct_keeps_leading_spaces(llama_tok):
    """decode(prompt + new) minus decode(prompt): the indentation of a HumanEval completion survives,
    which decoding the new tokens alone (SentencePiece drops a leading space) would break."""
    lm = LM(None, llama_tok, chat_format=None)
    prompt = lm.encode('def f(x):\n    """Double x."""\n')
    whole = lm.encode('def f(x):\n    """Double x."""\n    return 2 * x\n')
    assert whole[: len(prompt)] == prompt
    new = whole[len(prompt):] + [llama_tok.eos_token_id, llama_tok.eos_token_id]
    assert lm.decode_continuation(prompt, new) == "    return 2 * x\n"
    assert not llama_tok.decode(whole[len(prompt):]).startswith("    return")  # what the old decode gave


def test_stop_strings_and_sampling(tiny):
    model, tok = tiny
    lm = LM(model, tok, batch_size=4, chat_format=None)
    free = lm.generate(PROMPTS[:4], max_new_tokens=12)
    stop_char = free[0][0][2]  # a character the model does produce: generation must stop before it
    cut = lm.generate(PROMPTS[:4], max_new_tokens=12, stop=[stop_char])
    assert cut[0][0] == free[0][0][:free[0][0].index(stop_char)]
    assert all(stop_char not in c[0] for c in cut)
    samples = lm.generate(PROMPTS[:2], max_new_tokens=6, temperature=0.8, top_p=0.95, top_k=50, num_samples=3, seed=1)
    assert [len(s) for s in samples] == [3, 3]
    assert samples == lm.generate(PROMPTS[:2], max_new_tokens=6, temperature=0.8, top_p=0.95, top_k=50, num_samples=3,
                                  seed=1)
    with pytest.raises(ValueError, match="greedy"):
        lm.generate(PROMPTS[:1], num_samples=2)


def test_chat_formats(char_tokenizer):
    tulu = LM(None, char_tokenizer, chat_format="tulu")
    assert tulu.chat("hi", "A:") == "<|user|>\nhi\n<|assistant|>\nA:"
    assert tulu.chat_then("hi", "A:") == "<|user|>\nhi\n<|assistant|>\nA:"  # the prompt ends in "\n": no space
    assert LM(None, char_tokenizer, chat_format=None).chat("hi", "\nA:") == "hi\nA:"
    with pytest.raises(ValueError):
        LM(None, char_tokenizer, chat_format="chatml")
