"""qtulu.model.load: loading (in-memory, safetensors dirs, streamed NF4), refusing pickles, base_info, QLoRA == LoRA parity."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from qtulu.model.load import ModelLoadError, attach_lora, base_info, load_base, state_dict_sha256
from qtulu.demo.synthetic import toy_recipe
from qtulu.model.tiny import build_char_tokenizer, build_tiny_llama


def _ids():
    return torch.tensor([[1, 5, 9, 33, 70, 12, 8, 2, 44, 61, 7]])


def _save_dir(tmp_path, model):
    d = tmp_path / "base"
    model.save_pretrained(d, safe_serialization=True)
    build_char_tokenizer().save_pretrained(d)
    return d


def test_in_memory_lora_base_keeps_weights_and_hashes_originals():
    model = build_tiny_llama(0)
    ref = build_tiny_llama(0).eval()
    sha = state_dict_sha256(model)
    out, tok = load_base(model, quantize=None, compute_dtype=torch.float32, tokenizer=build_char_tokenizer(),
                         attn_implementation="sdpa")
    assert out is model and tok is not None
    info = base_info(out)
    assert info["weights_sha256"] == sha and info["quantization"] is None
    with torch.no_grad():
        torch.testing.assert_close(out(input_ids=_ids()).logits, ref(input_ids=_ids()).logits)
    assert load_base(model, quantize=None, compute_dtype=torch.float32)[0] is model  # idempotent
    with pytest.raises(ModelLoadError, match="already loaded"):
        load_base(model, quantize="nf4", compute_dtype=torch.float32)


def test_in_memory_nf4_quantizes_every_linear_but_the_head():
    from qtulu.model.quant import Linear4bit

    model = build_tiny_llama(0)
    sha = state_dict_sha256(model)
    load_base(model, quantize="nf4", compute_dtype=torch.float32)
    linears = {n: type(m) for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    assert linears.pop("lm_head") is nn.Linear
    assert linears and all(t is Linear4bit for t in linears.values())
    info = base_info(model)
    # the hash is of what adapters train against: the NF4 bits, not the pre-quantization weights
    assert info["weights_sha256"] == state_dict_sha256(model) != sha
    assert info["quantization"] == {"method": "nf4", "blocksize": 64, "double_quant": True, "skip": ["lm_head"]}


def test_qlora_equals_lora_on_the_dequantized_weights():
    """QLoRA is LoRA plus a flag: same logits and same LoRA gradients as LoRA on a plain base whose
    weights are the dequantized NF4 weights."""
    from qtulu.model.quant import Linear4bit

    q = build_tiny_llama(0)
    load_base(q, quantize="nf4", compute_dtype=torch.float32, attn_implementation="sdpa")
    plain = build_tiny_llama(0)
    with torch.no_grad():
        for name, m in q.named_modules():
            if isinstance(m, Linear4bit):
                plain.get_submodule(name).weight.copy_(m.dequantize(torch.float32))
    load_base(plain, quantize=None, compute_dtype=torch.float32, attn_implementation="sdpa")
    lora = toy_recipe(lora={"r": 4, "alpha": 8, "dropout": 0.0}).lora
    outs = []
    for model in (q, plain):
        torch.manual_seed(0)
        peft = attach_lora(model, lora)
        torch.manual_seed(1)
        for n, p in peft.named_parameters():
            if "lora_B" in n:
                nn.init.normal_(p, std=0.05)  # non-zero B so that both LoRA factors get gradients
        out = peft(input_ids=_ids(), labels=_ids())
        out.loss.backward()
        grads = {n: p.grad.clone() for n, p in peft.named_parameters() if p.requires_grad}
        outs.append((out.logits.detach(), grads))
    torch.testing.assert_close(outs[0][0], outs[1][0], rtol=1e-5, atol=1e-5)
    assert outs[0][1].keys() == outs[1][1].keys() and len(outs[0][1]) > 0
    for k in outs[0][1]:
        torch.testing.assert_close(outs[0][1][k], outs[1][1][k], rtol=1e-4, atol=1e-6, msg=k)


def test_load_from_safetensors_dir_streamed(tmp_path):
    from qtulu.model.quant import Linear4bit

    model = build_tiny_llama(0)
    d = _save_dir(tmp_path, model)
    plain, tok = load_base(str(d), quantize=None, compute_dtype=torch.float32, attn_implementation="sdpa")
    assert tok is not None and len(tok) == len(build_char_tokenizer())
    ref = build_tiny_llama(0).eval()
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=_ids()).logits, ref(input_ids=_ids()).logits)
    info = base_info(plain)
    assert info["id"] == str(d) and info["quantization"] is None
    assert info["weights_sha256"] == state_dict_sha256(build_tiny_llama(0))  # the same values as in memory

    q, _ = load_base(str(d), quantize="nf4", compute_dtype=torch.float32, attn_implementation="sdpa")
    mem = build_tiny_llama(0)
    load_base(mem, quantize="nf4", compute_dtype=torch.float32, attn_implementation="sdpa")
    assert sum(isinstance(m, Linear4bit) for m in q.modules()) == 14
    with torch.no_grad():  # streamed quantization == quantizing the whole model in memory
        torch.testing.assert_close(q(input_ids=_ids()).logits, mem(input_ids=_ids()).logits)
    assert base_info(q)["weights_sha256"] == base_info(mem)["weights_sha256"] != info["weights_sha256"]


def test_refuses_pickle_checkpoints_and_missing_weights(tmp_path):
    d = tmp_path / "pickled"
    d.mkdir()
    build_tiny_llama(0).config.save_pretrained(d)
    (d / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(ModelLoadError, match="pickle.*safetensors"):
        load_base(str(d))
    (d / "pytorch_model.bin").unlink()
    with pytest.raises(ModelLoadError, match="no .*safetensors"):
        load_base(str(d))

    from safetensors.torch import save_file

    sd = {k: v for k, v in build_tiny_llama(0).state_dict().items() if "layers.1.mlp" not in k}
    save_file(sd, str(d / "model.safetensors"))
    with pytest.raises(ModelLoadError, match="layers.1.mlp"):
        load_base(str(d), quantize=None, compute_dtype=torch.float32)


def test_accepts_a_bitsandbytes_4bit_checkpoint(tmp_path, bnb_4bit_model):
    """A base quantized by bitsandbytes (NF4) loads with its layers converted to qtulu's Linear4bit."""
    from qtulu.model.quant import Linear4bit

    d = _save_dir(tmp_path, build_tiny_llama(0))
    bnb_model = bnb_4bit_model(d)
    qdir = tmp_path / "bnb"
    bnb_model.save_pretrained(qdir, safe_serialization=True)
    build_char_tokenizer().save_pretrained(qdir)
    model, _ = load_base(str(qdir), compute_dtype=torch.float32, attn_implementation="sdpa")
    assert sum(isinstance(m, Linear4bit) for m in model.modules()) == 14
    assert base_info(model)["quantization"]["method"] == "nf4"
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=_ids()).logits, bnb_model(input_ids=_ids()).logits,
                                   rtol=1e-4, atol=1e-4)


def test_same_nf4_bits_are_the_same_base_from_every_source(tmp_path, bnb_4bit_model):
    """Issue 14, point 2: a qtulu quantization, a bitsandbytes checkpoint and an in-memory
    bitsandbytes model of the same weights have one weights_sha256 (and one quantization record);
    another base has another. Point 3: load_base takes over the in-memory model's bits (no copy)."""
    from qtulu.model.quant import Linear4bit

    d = _save_dir(tmp_path, build_tiny_llama(0))
    ours, _ = load_base(str(d), compute_dtype=torch.float32, device="cpu", attn_implementation="sdpa")

    qdir = tmp_path / "bnb"
    bnb_4bit_model(d).save_pretrained(qdir, safe_serialization=True)
    from_ckpt, _ = load_base(str(qdir), compute_dtype=torch.float32, device="cpu", attn_implementation="sdpa")

    mem = bnb_4bit_model(d)
    with torch.no_grad():
        want = mem(input_ids=_ids()).logits
    bnb_layer = mem.model.layers[0].self_attn.q_proj
    assert type(bnb_layer).__module__.startswith("bitsandbytes")
    codes_ptr = bnb_layer.weight.data.data_ptr()
    assert base_info(mem)["weights_sha256"] == base_info(ours)["weights_sha256"]  # hashable as is
    taken, _ = load_base(mem, compute_dtype=torch.float32, device="cpu", attn_implementation="sdpa")
    assert taken is mem and sum(isinstance(m, Linear4bit) for m in taken.modules()) == 14
    assert taken.model.layers[0].self_attn.q_proj.weight.data_ptr() == codes_ptr  # the same bits, not a copy
    with torch.no_grad():
        torch.testing.assert_close(taken(input_ids=_ids()).logits, want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ours(input_ids=_ids()).logits, want, rtol=1e-5, atol=1e-5)

    infos = [base_info(m) for m in (ours, from_ckpt, taken)]
    assert len({i["weights_sha256"] for i in infos}) == 1, infos
    assert all(i["quantization"] == infos[0]["quantization"] for i in infos), infos
    other, _ = load_base(build_tiny_llama(1), compute_dtype=torch.float32, device="cpu", attn_implementation="sdpa")
    assert base_info(other)["weights_sha256"] != infos[0]["weights_sha256"]
    single, _ = load_base(bnb_4bit_model(d, double_quant=False), compute_dtype=torch.float32, device="cpu",
                          attn_implementation="sdpa")  # the same weights, other NF4 settings: another base
    assert base_info(single)["quantization"]["double_quant"] is False
    assert base_info(single)["weights_sha256"] != infos[0]["weights_sha256"]



def test_in_memory_bnb_model_repacked_for_the_cpu_is_taken_as_it_computes(tmp_path, bnb_4bit_model):
    """bitsandbytes on an AVX512-BF16 CPU repacks Linear4bit layers at their first eval forward
    (tests/conftest.py); done here with its own function on the layers it can repack, so on any
    CPU. load_base reads them back, warns that the absmax is now bnb's bf16 rounding, and the base
    is then another base (its bits differ from the checkpoint's)."""
    import bitsandbytes.functional as bnbF

    d = _save_dir(tmp_path, build_tiny_llama(0))
    plain, _ = load_base(bnb_4bit_model(d, double_quant=False), compute_dtype=torch.float32, device="cpu",
                         attn_implementation="sdpa")
    mem = bnb_4bit_model(d, double_quant=False)
    layers = [m for m in mem.modules() if hasattr(m, "support_avx512bf16_for_cpu")
              and m.out_features % 32 == 0 and m.in_features % 64 == 0]  # what bnb can repack
    for m in layers:
        m.weight.data, m.weight.quant_state = bnbF._convert_weight_packed_for_cpu(m.weight.data, m.weight.quant_state)
    with pytest.warns(UserWarning, match=f"{len(layers)} NF4 layers had been repacked by bitsandbytes"):
        taken, _ = load_base(mem, compute_dtype=torch.float32, device="cpu", attn_implementation="sdpa")
    with torch.no_grad():
        torch.testing.assert_close(taken(input_ids=_ids()).logits, plain(input_ids=_ids()).logits,
                                   rtol=2e-2, atol=2e-2)  # bf16 rounding of the repacked absmax only
    assert base_info(taken)["weights_sha256"] != base_info(plain)["weights_sha256"]


def test_bf16_values_hash_alike_in_any_compute_dtype(tmp_path):
    """A bf16 checkpoint loaded for bf16 or for fp32 compute holds the same values: one base."""
    d = _save_dir(tmp_path, build_tiny_llama(0, dtype=torch.bfloat16))
    a, _ = load_base(str(d), quantize=None, compute_dtype=torch.bfloat16, device="cpu", attn_implementation="sdpa")
    b, _ = load_base(str(d), quantize=None, compute_dtype=torch.float32, device="cpu", attn_implementation="sdpa")
    assert next(a.parameters()).dtype == torch.bfloat16 and next(b.parameters()).dtype == torch.float32
    assert base_info(a)["weights_sha256"] == base_info(b)["weights_sha256"]
    c, _ = load_base(build_tiny_llama(0), quantize=None, compute_dtype=torch.float32, device="cpu",
                     attn_implementation="sdpa")  # the fp32 originals are other values
    assert base_info(c)["weights_sha256"] != base_info(a)["weights_sha256"]


def test_a_missing_local_looking_path_says_not_found(tmp_path, monkeypatch):
    from qtulu.model.load import looks_local

    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    for name in ("./base", "../base", str(tmp_path / "base"), "~/no-such-model-qtulu", "runs/base", "a/b/c",
                 "bad name!"):
        assert looks_local(name), name
        with pytest.raises(ModelLoadError, match="not found"):
            load_base(name)
    for name in ("huggyllama/llama-7b", "gpt2", "meta-llama/Llama-2-7b-hf"):
        assert not looks_local(name), name


def test_attach_lora_turns_the_kv_cache_off_for_packed_training():
    model = build_tiny_llama(0)
    assert model.config.use_cache
    peft = attach_lora(model, toy_recipe(lora={"r": 4, "alpha": 8, "dropout": 0.0}).lora)
    assert peft.config.use_cache is False and model.config.use_cache is False


def test_unreadable_config_is_a_one_line_error_naming_the_file(tmp_path):
    import json

    d = _save_dir(tmp_path, build_tiny_llama(0))
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "model_type": "no-such-architecture"}))
    with pytest.raises(ModelLoadError, match=r"config\.json: .*no-such-architecture"):
        load_base(str(d))
