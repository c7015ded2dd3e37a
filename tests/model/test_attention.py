"""The qtulu_varlen attention implementation inside transformers' LLaMA (tiny, random, float64)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from qtulu.model.attention import (
    ATTN_IMPLEMENTATION,
    attention_backend,
    cu_seqlens_from_position_ids,
    register_attention,
)
from qtulu.model.tiny import build_tiny_llama

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


# ----------------------------------------------- other architectures: window, softcap, refusals

_COMMON = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=3)


def _arch_config(arch):
    import transformers as tf

    if arch == "llama":
        return tf.LlamaConfig(**_COMMON)
    if arch == "qwen2":  # layer 1 is a sliding-window layer, layer 0 full
        return tf.Qwen2Config(**_COMMON, use_sliding_window=True, sliding_window=5, max_window_layers=1)
    if arch == "mistral":  # every layer sliding
        return tf.MistralConfig(**_COMMON, sliding_window=5)
    if arch == "gemma2":  # sliding + full layers, and a softcap small enough to bend the scores
        return tf.Gemma2Config(**_COMMON, head_dim=16, sliding_window=5, attn_logit_softcapping=2.0,
                               query_pre_attn_scalar=16)
    if arch == "phi3":
        return tf.Phi3Config(**_COMMON, sliding_window=6)
    raise AssertionError(arch)


def _arch_model(arch, impl=ATTN_IMPLEMENTATION, dtype=torch.float64):
    from transformers import AutoModelForCausalLM

    register_attention()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(_arch_config(arch))
    with torch.no_grad():  # scores of a few units (random init gives ~0.1): softmax and softcap bite
        for name, p in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight", "qkv_proj.weight")):
                p.mul_(10.0)
    model = model.to(dtype).eval()
    model.set_attn_implementation(impl)
    return model


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral", "gemma2", "phi3"])
def test_three_packed_examples_equal_each_alone_across_architectures(arch):
    """Three examples packed in one row (default use_cache=True, the setting that used to leak
    through SDPA's mask for windowed models) give, example by example, the logits of transformers'
    own eager attention on that example alone: the window and the softcap are applied, and nothing
    crosses an example boundary."""
    lens = (7, 12, 9)  # every example longer than the window (5 / 6)
    examples = _examples(lens, seed=3)
    ids, pos = _pack(examples)
    model = _arch_model(arch)
    eager = _arch_model(arch, "eager")
    assert model.config.use_cache
    with torch.no_grad():
        packed = model(input_ids=ids, position_ids=pos).logits  # (1, total, V)
        for ex, got in zip(examples, _split(packed, lens)):
            alone = model(input_ids=ex[None]).logits[0]
            torch.testing.assert_close(got, alone, rtol=1e-12, atol=1e-12)
            # transformers' eager softmax runs in fp32 even for float64 models: ~1e-8 apart
            torch.testing.assert_close(got, eager(input_ids=ex[None]).logits[0], rtol=1e-6, atol=1e-6)


def test_window_and_softcap_change_the_result():
    """Guard against a vacuous comparison: dropping the window or the softcap changes the logits."""
    examples = _examples((12,), seed=4)
    ids = examples[0][None]
    with torch.no_grad():
        ref = _arch_model("gemma2")(input_ids=ids).logits
        for key, value in (("sliding_window", 4096), ("attn_logit_softcapping", None)):
            model = _arch_model("gemma2")
            model.config.__dict__[key] = value
            for layer in model.model.layers:
                if key == "sliding_window" and layer.self_attn.sliding_window is not None:
                    layer.self_attn.sliding_window = 4096
                if key == "attn_logit_softcapping":
                    layer.self_attn.attn_logit_softcapping = None
            assert (model(input_ids=ids).logits - ref).abs().max() > 1e-3, key


def test_gemma2_padded_batch_and_generation_match_eager():
    """The fallback for padded rows and decoding keeps the softcap (transformers' SDPA has none).
    fp32: transformers' eager softmax runs in fp32, where float64's mask value becomes -inf (NaN)."""
    ours, eager = _arch_model("gemma2", dtype=torch.float32), _arch_model("gemma2", "eager", dtype=torch.float32)
    gen = torch.Generator().manual_seed(5)
    ids = torch.randint(4, 128, (2, 11), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    with torch.no_grad():
        valid = mask.bool()
        torch.testing.assert_close(ours(input_ids=ids, attention_mask=mask).logits[valid],
                                   eager(input_ids=ids, attention_mask=mask).logits[valid], rtol=1e-5, atol=1e-5)
        kw = dict(max_new_tokens=5, do_sample=False, pad_token_id=3)
        assert torch.equal(ours.generate(ids, attention_mask=mask, **kw), eager.generate(ids, attention_mask=mask, **kw))


def test_gemma2_packed_gradients_triton_equal_eager_alone():
    """Window + softcap gradients through the model: the Triton kernels (interpreted on CPU, fp32)
    on the packed row against transformers' eager attention run on each example alone."""
    lens = (3, 14, 9)
    examples = _examples(lens, seed=6)
    ids, pos = _pack(examples)
    device = "cuda" if torch.cuda.is_available() else "cpu"

    model = _arch_model("gemma2", dtype=torch.float32).to(device)
    with attention_backend("triton"):
        logits = model(input_ids=ids.to(device), position_ids=pos.to(device), use_cache=False).logits
        sum(_sum_loss(lg, ex.to(device)) for lg, ex in zip(_split(logits, lens), examples)).backward()
    ours = _grads(model)

    eager = _arch_model("gemma2", "eager", dtype=torch.float32).to(device)
    for ex in examples:
        _sum_loss(eager(input_ids=ex[None].to(device)).logits[0], ex.to(device)).backward()
    want = _grads(eager)
    assert ours.keys() == want.keys() and len(ours) > 0
    for name in want:
        torch.testing.assert_close(ours[name], want[name], rtol=1e-3, atol=1e-5, msg=name)


def test_unsupported_attention_is_refused_by_name():
    from transformers import LlamaConfig

    from qtulu.model.attention import PackedAttentionError, check_packed_support
    from qtulu.errors import QtuluError

    for arch in ("llama", "qwen2", "mistral", "gemma2", "phi3"):
        check_packed_support(_arch_config(arch))
    chunked = LlamaConfig(**_COMMON)
    chunked.attention_chunk_size = 8  # Llama-4's chunked local attention
    with pytest.raises(PackedAttentionError, match="attention_chunk_size=8") as err:
        check_packed_support(chunked)
    assert isinstance(err.value, QtuluError)
    odd = LlamaConfig(**_COMMON)
    odd.layer_types = ["full_attention", "chunked_attention"]
    with pytest.raises(PackedAttentionError, match="chunked_attention"):
        check_packed_support(odd)
    # at run time too (a model switched with set_attn_implementation directly)
    model = _model()
    model.config.attention_chunk_size = 8
    ids, pos = _pack(_examples())
    with pytest.raises(PackedAttentionError, match="chunked"):
        model(input_ids=ids, position_ids=pos)


def test_cu_seqlens_agrees_with_transformers_helpers():
    """Issue 14, point 6: transformers' packed-sequence helpers give our answer where their rules
    apply (every example restarts at position 0; one row or rows restarting at 0) — and where
    prepare_fa_kwargs_from_position_ids does not (a row continuing the previous row's positions)
    it would let the rows attend to each other, which is why qtulu keeps its own."""
    from transformers.masking_utils import find_packed_sequence_indices
    from transformers.modeling_flash_attention_utils import prepare_fa_kwargs_from_position_ids

    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        rows = []
        for _ in range(int(torch.randint(1, 4, (1,), generator=gen))):
            lens = torch.randint(1, 9, (int(torch.randint(1, 5, (1,), generator=gen)),), generator=gen).tolist()
            rows.append(torch.cat([torch.arange(n) for n in lens]))
        width = max(len(r) for r in rows)
        # pad each row with one more example so that all rows have the same width
        pos = torch.stack([torch.cat([r, torch.arange(width - len(r))]) for r in rows])  # (B, T)
        cu, mx = cu_seqlens_from_position_ids(pos)
        (lib_cu, _), (lib_mx, _) = prepare_fa_kwargs_from_position_ids(pos)
        assert cu.tolist() == lib_cu.tolist() and mx == int(lib_mx)
        seq_idx = find_packed_sequence_indices(pos)
        if seq_idx is None:  # nothing packed: one example per row
            seq_idx = torch.zeros_like(pos)
        starts = torch.ones_like(pos, dtype=torch.bool)
        starts[:, 1:] = seq_idx[:, 1:] != seq_idx[:, :-1]
        assert cu[:-1].tolist() == starts.reshape(-1).nonzero().reshape(-1).tolist()
    continued = torch.tensor([[0, 1, 2], [3, 4, 0]])
    assert cu_seqlens_from_position_ids(continued)[0].tolist() == [0, 3, 5, 6]
    assert prepare_fa_kwargs_from_position_ids(continued)[0][0].tolist() == [0, 5, 6]  # rows merged


def _tiny(config_cls, **kw):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_config(config_cls(vocab_size=64, **kw))


def test_alibi_models_are_refused_naming_the_key():
    """Issue 25: Bloom (ALiBi always) trained with packing silently wrong, Falcon with alibi=True
    crashed with an AttributeError; both are refused through the loader's `set_attention`."""
    from transformers import BloomConfig, FalconConfig

    from qtulu.model.attention import PackedAttentionError
    from qtulu.model.load import set_attention

    bloom = _tiny(BloomConfig, hidden_size=32, n_layer=1, n_head=2)
    with pytest.raises(PackedAttentionError, match="model_type=bloom"):
        set_attention(bloom, "qtulu_varlen")
    falcon = _tiny(FalconConfig, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, alibi=True)
    with pytest.raises(PackedAttentionError, match="alibi=True"):
        set_attention(falcon, "qtulu_varlen")
    assert set_attention(bloom, "sdpa") == "sdpa"  # unpacked attention stays available


def test_attention_that_bypasses_the_interface_is_refused():
    """A model class that computes attention in its own code (transformers'
    ``_supports_attention_backend`` False) would ignore the kernel: packed rows would attend across
    documents. `check_attention_took_effect` refuses it even when its config passes."""
    from transformers import LlamaForCausalLM

    from qtulu.model.attention import PackedAttentionError, check_attention_took_effect, register_attention
    from qtulu.model.load import set_attention

    model = _model()
    assert set_attention(model, "qtulu_varlen") == "qtulu_varlen"  # LLaMA: took effect
    check_attention_took_effect(model)

    class OwnAttention(LlamaForCausalLM):
        _supports_attention_backend = False

    own = OwnAttention(model.config)
    own.config._attn_implementation_internal = register_attention()
    with pytest.raises(PackedAttentionError, match="OwnAttention computes attention in its own code"):
        check_attention_took_effect(own)
    model.config._attn_implementation_internal = "sdpa"  # a switch that did not happen is refused too
    with pytest.raises(PackedAttentionError, match="_attn_implementation is 'sdpa'"):
        check_attention_took_effect(model)
