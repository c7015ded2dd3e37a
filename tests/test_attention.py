"""The qtulu_varlen attention implementation inside transformers' LLaMA (tiny, random, float64)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from qtulu.attention import (
    ATTN_IMPLEMENTATION,
    attention_backend,
    cu_seqlens_from_position_ids,
    register_attention,
)
from qtulu.tiny import build_tiny_llama

pytestmark = [
    pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:.*gradient_checkpointing.*:FutureWarning"),
    pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning"),
]

LENS = (5, 1, 17, 30)


def _model(impl=ATTN_IMPLEMENTATION, dtype=torch.float64, seed=0, **overrides):
    register_attention()
    model = build_tiny_llama(seed=seed, dtype=dtype, **overrides)
    model.set_attn_implementation(impl)
    return model


def _examples(lens=LENS, seed=0, vocab=128):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(4, vocab, (n,), generator=gen) for n in lens]


def _pack(examples):
    ids = torch.cat(examples)[None]  # (1, total)
    pos = torch.cat([torch.arange(len(e)) for e in examples])[None]  # (1, total)
    return ids, pos


def _split(t, lens):
    return torch.split(t[0], list(lens))


def _sum_loss(logits, ids):
    # next-token loss inside one example: (T-1) predictions
    return F.cross_entropy(logits[:-1], ids[1:], reduction="sum")


# ---------------------------------------------------------------------------------- helpers


def test_cu_seqlens_from_position_ids():
    cu, mx = cu_seqlens_from_position_ids(torch.tensor([[0, 1, 2, 0, 0, 1]]))
    assert cu.dtype == torch.int32 and cu.tolist() == [0, 3, 4, 6] and mx == 3
    cu, mx = cu_seqlens_from_position_ids(torch.tensor([0, 1, 2, 3]))
    assert cu.tolist() == [0, 4] and mx == 4
    # rows always start an example, even when positions run on
    cu, mx = cu_seqlens_from_position_ids(torch.tensor([[0, 1, 2], [3, 4, 0]]))
    assert cu.tolist() == [0, 3, 5, 6] and mx == 3
    with pytest.raises(ValueError, match="integers"):
        cu_seqlens_from_position_ids(torch.zeros(2, 3))
    with pytest.raises(ValueError, match=r"\(batch, seq\)"):
        cu_seqlens_from_position_ids(torch.zeros(1, 2, 3, dtype=torch.long))


def test_register_is_idempotent_and_config_route_works(tmp_path):
    from transformers import AttentionInterface, AutoModelForCausalLM, LlamaForCausalLM

    assert register_attention() == register_attention() == "qtulu_varlen"
    assert "qtulu_varlen" in AttentionInterface()
    ref = _model("sdpa")
    config = ref.config
    config._attn_implementation = ATTN_IMPLEMENTATION
    model = LlamaForCausalLM(config).to(torch.float64).eval()
    model.load_state_dict(ref.state_dict())
    assert model.config._attn_implementation == ATTN_IMPLEMENTATION
    ids, pos = _pack(_examples())
    torch.testing.assert_close(
        model(input_ids=ids, position_ids=pos).logits,
        _model()(input_ids=ids, position_ids=pos).logits,
        rtol=0, atol=0,
    )
    ref.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation=ATTN_IMPLEMENTATION)
    assert loaded.config._attn_implementation == ATTN_IMPLEMENTATION


# ------------------------------------------------------------------------------- exactness


def test_packed_logits_equal_each_example_alone():
    model = _model()
    examples = _examples()
    ids, pos = _pack(examples)
    with torch.no_grad():
        packed = model(input_ids=ids, position_ids=pos).logits  # (1, total, V)
        for ex, got in zip(examples, _split(packed, LENS)):
            alone = model(input_ids=ex[None]).logits[0]  # (T, V)
            torch.testing.assert_close(got, alone, rtol=1e-12, atol=1e-12)


def test_changing_one_example_leaves_the_others_bit_identical():
    model = _model()
    examples = _examples()
    changed = list(examples)
    changed[2] = (examples[2] + 7) % 120 + 4  # same length, other tokens
    with torch.no_grad():
        a = _split(model(input_ids=_pack(examples)[0], position_ids=_pack(examples)[1]).logits, LENS)
        b = _split(model(input_ids=_pack(changed)[0], position_ids=_pack(changed)[1]).logits, LENS)
    for i, (x, y) in enumerate(zip(a, b)):
        if i == 2:
            assert not torch.equal(x, y)
        else:
            assert torch.equal(x, y), f"example {i} changed when example 2 did"


def test_matches_transformers_own_packed_sdpa():
    """transformers' SDPA builds a dense packed mask (no cache); the varlen path must agree."""
    ids, pos = _pack(_examples())
    with torch.no_grad():
        ours = _model()(input_ids=ids, position_ids=pos, use_cache=False).logits
        sdpa = _model("sdpa")(input_ids=ids, position_ids=pos, use_cache=False).logits
    torch.testing.assert_close(ours, sdpa, rtol=1e-12, atol=1e-12)


def test_flash_style_cu_seq_lens_kwargs_are_honoured():
    model = _model()
    examples = _examples()
    ids, pos = _pack(examples)
    cu, mx = cu_seqlens_from_position_ids(pos)
    with torch.no_grad():
        ref = model(input_ids=ids, position_ids=pos).logits
        got = model(input_ids=ids, position_ids=pos, cu_seq_lens_q=cu, cu_seq_lens_k=cu,
                    max_length_q=mx, max_length_k=mx).logits
        torch.testing.assert_close(got, ref, rtol=0, atol=0)
        # qtulu.data.packing.collate_packed's names; position_ids alone would say "one example"
        flat = torch.arange(ids.shape[1])[None]
        got = model(input_ids=ids, position_ids=flat, cu_seqlens=cu, max_seqlen=mx).logits
        assert not torch.equal(got, model(input_ids=ids, position_ids=flat).logits)
        # ... but the boundaries come from cu_seqlens: each example as if alone (RoPE aside)
        alone = [model(input_ids=ex[None], position_ids=flat[:, o:o + len(ex)]).logits[0]
                 for ex, o in zip(examples, [0, 5, 6, 23])]
        torch.testing.assert_close(got[0], torch.cat(alone), rtol=1e-12, atol=1e-12)


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def test_packed_loss_and_gradients_equal_sum_over_examples():
    model = _model()
    examples = _examples()
    ids, pos = _pack(examples)
    model.zero_grad()
    logits = model(input_ids=ids, position_ids=pos).logits
    packed_loss = sum(_sum_loss(lg, ex) for lg, ex in zip(_split(logits, LENS), examples))
    packed_loss.backward()
    packed = _grads(model)

    model.zero_grad()
    alone_loss = 0.0
    for ex in examples:
        loss = _sum_loss(model(input_ids=ex[None]).logits[0], ex)
        loss.backward()
        alone_loss += loss.item()
    alone = _grads(model)

    assert packed_loss.item() == pytest.approx(alone_loss, rel=1e-12)
    assert packed.keys() == alone.keys() and len(packed) > 0
    for name in packed:
        torch.testing.assert_close(packed[name], alone[name], rtol=1e-10, atol=1e-12, msg=name)


# ------------------------------------------------------------------- behaves like SDPA otherwise


def test_padded_batch_and_generation_match_sdpa():
    ours, sdpa = _model(), _model("sdpa")
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(4, 128, (3, 12), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding
    mask[2, :1] = 0
    with torch.no_grad():
        torch.testing.assert_close(
            ours(input_ids=ids, attention_mask=mask).logits,
            sdpa(input_ids=ids, attention_mask=mask).logits, rtol=0, atol=0,
        )
        # an unpadded batch (no mask zeros) takes the varlen kernel, one example per row
        torch.testing.assert_close(
            ours(input_ids=ids).logits, sdpa(input_ids=ids).logits, rtol=1e-12, atol=1e-12,
        )
        kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=3)
        out_ours = ours.generate(ids, attention_mask=mask, **kw)
        out_sdpa = sdpa.generate(ids, attention_mask=mask, **kw)
        assert torch.equal(out_ours, out_sdpa)
        one = ids[:1]
        assert torch.equal(ours.generate(one, **kw), sdpa.generate(one, **kw))


def test_attention_dropout_is_refused_clearly():
    model = _model(attention_dropout=0.1).train()
    ids, pos = _pack(_examples())
    with pytest.raises(ValueError, match="attention dropout"):
        model(input_ids=ids, position_ids=pos)


# ----------------------------------------------------------- peft, checkpointing, Triton path


def test_peft_lora_and_gradient_checkpointing():
    from peft import LoraConfig, get_peft_model

    examples = _examples()
    ids, pos = _pack(examples)

    def run(checkpointing: bool):
        base = _model()
        if checkpointing:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        torch.manual_seed(0)  # the same random LoRA weights in both runs
        peft_model = get_peft_model(
            base, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear",
                             init_lora_weights=False)
        )
        peft_model.train()
        logits = peft_model(input_ids=ids, position_ids=pos, use_cache=False).logits
        loss = sum(_sum_loss(lg, ex) for lg, ex in zip(_split(logits, LENS), examples))
        loss.backward()
        grads = {n: p.grad for n, p in peft_model.named_parameters() if p.requires_grad}
        return peft_model, logits.detach(), loss.item(), grads

    peft_model, logits, loss, grads = run(checkpointing=False)
    assert grads and all("lora_" in n for n in grads)
    assert all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads.values())
    with torch.no_grad():
        for ex, got in zip(examples, _split(logits, LENS)):
            alone = peft_model(input_ids=ex[None]).logits[0]
            torch.testing.assert_close(got, alone, rtol=1e-12, atol=1e-12)

    _, logits_ckpt, loss_ckpt, grads_ckpt = run(checkpointing=True)
    torch.testing.assert_close(logits_ckpt, logits, rtol=0, atol=0)
    assert loss_ckpt == pytest.approx(loss, rel=1e-13)
    for name in grads:
        torch.testing.assert_close(grads_ckpt[name], grads[name], rtol=1e-10, atol=1e-12, msg=name)


def test_triton_backend_inside_the_model():
    """Forced Triton (interpreted on CPU) gives the torch path's logits and gradients (fp32)."""
    examples = _examples(lens=(3, 20, 9))
    ids, pos = _pack(examples)

    device = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: interpreted Triton

    def run(backend):
        model = _model(dtype=torch.float32).to(device)
        with attention_backend(backend):
            logits = model(input_ids=ids.to(device), position_ids=pos.to(device),
                           use_cache=False).logits
            logits.square().mean().backward()
        return logits.detach(), _grads(model)

    ref_logits, ref_grads = run("torch")
    logits, grads = run("triton")
    torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-5)
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-3, atol=1e-6, msg=name)
