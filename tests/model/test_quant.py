"""Linear4bit and quantize_model_: bnb interop, state dict round trip, peft LoRA (QLoRA parity)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from qtulu.kernels.nf4 import dequantize_nf4, quantize_nf4
from qtulu.model.quant import Linear4bit, MergeNotSupportedError, is_quantized, quantize_model_
from qtulu.model.tiny import build_tiny_llama

peft = pytest.importorskip("peft")


def _linear(k=64, n=96, bias=True, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    lin = nn.Linear(k, n, bias=bias).to(dtype)
    return lin


def test_from_linear_forward_equals_dequantized_linear():
    lin = _linear(dtype=torch.bfloat16)
    q = Linear4bit.from_linear(lin)
    assert (q.in_features, q.out_features) == (64, 96) and q.weight.dtype == torch.uint8
    assert not q.weight.requires_grad
    w = q.dequantize()
    assert w.shape == (96, 64) and w.dtype == torch.bfloat16
    packed, st = quantize_nf4(lin.weight.detach())
    assert torch.equal(q.weight, packed)
    x = torch.randn(4, 5, 64, dtype=torch.bfloat16)
    torch.testing.assert_close(q(x), nn.functional.linear(x, w, lin.bias), rtol=0, atol=0)
    # compute_dtype: fp32 input, bf16 matmul, fp32 output
    q.compute_dtype = torch.bfloat16
    y = q(x.float())
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, nn.functional.linear(x, w, lin.bias).float())


def test_from_bnb_holds_the_same_bits():
    bnb = pytest.importorskip("bitsandbytes")
    lin = _linear(bias=True)
    b4 = bnb.nn.Linear4bit(64, 96, bias=True, compute_dtype=torch.float32, quant_type="nf4")
    b4.load_state_dict(lin.state_dict())
    b4 = b4.to("cpu")  # bitsandbytes quantizes on the move
    q = Linear4bit.from_bnb(b4)
    ours = Linear4bit.from_linear(lin, compute_dtype=torch.float32)
    assert torch.equal(q.weight, ours.weight)
    assert torch.equal(q.quant_state.absmax, ours.quant_state.absmax)
    x = torch.randn(3, 64)
    torch.testing.assert_close(q(x), b4(x))
    with pytest.raises(ValueError, match="not quantized"):
        Linear4bit.from_bnb(bnb.nn.Linear4bit(64, 96, quant_type="nf4"))

    # a layer bitsandbytes repacked for its CPU GEMM (what its first eval forward does on an
    # AVX512-BF16 CPU; done here with its own function, so on any CPU): read as bnb now computes it
    assert not q.bnb_cpu_repacked
    b4.weight.data, b4.weight.quant_state = bnb.functional._convert_weight_packed_for_cpu(
        b4.weight.data, b4.weight.quant_state)
    r = Linear4bit.from_bnb(b4)
    assert r.bnb_cpu_repacked and torch.equal(r.weight, ours.weight)  # the same codes, standard layout
    from qtulu.kernels.nf4 import dequantize_absmax

    assert torch.equal(r.quant_state.absmax, dequantize_absmax(ours.quant_state).bfloat16().float())
    torch.testing.assert_close(r(x), q(x), rtol=2e-2, atol=2e-3)  # only the bf16 rounding of absmax
    if bnb.functional.has_avx512bf16():  # bnb's CPU kernel itself, where this CPU has it
        with torch.no_grad():
            torch.testing.assert_close(r(x), b4.eval()(x), rtol=2e-2, atol=2e-2)


def test_quantize_model_replaces_frees_and_matches():
    model = build_tiny_llama(0, torch.float32)
    ref = copy.deepcopy(model)
    old_q = model.model.layers[0].self_attn.q_proj
    quantize_model_(model, compute_dtype=torch.float32)
    assert old_q.weight.numel() == 0  # the float weight was freed right away
    names = [n for n, m in model.named_modules() if isinstance(m, Linear4bit)]
    assert len(names) == 2 * 7 and not isinstance(model.lm_head, Linear4bit)
    assert is_quantized(model) and model.qtulu_quantization["blocksize"] == 64
    # the reference: every Linear holds the dequantized weight
    for n, m in model.named_modules():
        if isinstance(m, Linear4bit):
            ref.get_submodule(n).weight.data = m.dequantize(torch.float32)
    ids = torch.randint(4, 100, (2, 11))
    torch.testing.assert_close(model(ids).logits, ref(ids).logits, rtol=1e-5, atol=1e-5)
    # skip by name / regex
    m2 = quantize_model_(build_tiny_llama(0), skip=("lm_head", r".*mlp\..*"))
    assert not any(isinstance(m, Linear4bit) for n, m in m2.named_modules() if ".mlp." in n)


def test_state_dict_safetensors_roundtrip(tmp_path):
    from safetensors.torch import load_file, save_file

    model = quantize_model_(build_tiny_llama(0, torch.float32))
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    assert sd["model.layers.0.self_attn.q_proj.weight"].dtype == torch.uint8
    assert "model.layers.0.self_attn.q_proj.weight.quant_state.bitsandbytes__nf4" in sd
    save_file(sd, tmp_path / "model.safetensors")
    # a skeleton with other random weights, quantized, then loaded
    other = quantize_model_(build_tiny_llama(1, torch.float32))
    missing, unexpected = other.load_state_dict(load_file(tmp_path / "model.safetensors"), strict=True)
    assert not missing and not unexpected
    ids = torch.randint(4, 100, (1, 9))
    torch.testing.assert_close(other(ids).logits, model(ids).logits, rtol=0, atol=0)
    # an empty Linear4bit skeleton loads one layer too, and a float checkpoint is refused clearly
    lin = Linear4bit(64, 64, bias=False, dtype=torch.float32)
    pre = "model.layers.0.self_attn.q_proj."
    lin.load_state_dict({k[len(pre):]: v for k, v in sd.items() if k.startswith(pre)})
    assert torch.equal(lin.dequantize(), model.model.layers[0].self_attn.q_proj.dequantize())
    with pytest.raises(RuntimeError, match="no NF4 quant state"):
        lin.load_state_dict({"weight": torch.zeros(64, 64)})


def test_device_moves_do_not_cast_the_state():
    q = Linear4bit.from_linear(_linear())
    q = q.to(torch.bfloat16)
    assert q.weight.dtype == torch.uint8 and q.quant_state.absmax.dtype == torch.uint8
    assert q.quant_state.absmax2.dtype == torch.float32 and q.bias.dtype == torch.bfloat16
    q.half()
    assert q.quant_state.offset.dtype == torch.float32


def _lora_pair(seed=0):
    """The same LoRA on (a) Linear4bit layers and (b) nn.Linear layers holding the dequantized
    weights (QLoRA is LoRA plus a flag)."""
    from peft import LoraConfig, get_peft_model

    base_q = quantize_model_(build_tiny_llama(seed, torch.float32), compute_dtype=torch.float32)
    base_f = build_tiny_llama(seed, torch.float32)
    for n, m in base_q.named_modules():
        if isinstance(m, Linear4bit):
            base_f.get_submodule(n).weight.data = m.dequantize(torch.float32)
    cfg = dict(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear", init_lora_weights=False)
    torch.manual_seed(123)
    pq = get_peft_model(base_q, LoraConfig(**cfg))
    torch.manual_seed(123)
    pf = get_peft_model(base_f, LoraConfig(**cfg))
    return pq, pf


def test_qlora_parity_and_training_step():
    pq, pf = _lora_pair()
    wrapped = [n for n, m in pq.named_modules() if isinstance(getattr(m, "base_layer", None), Linear4bit)]
    assert len(wrapped) == 14  # all-linear picked up every Linear4bit (lm_head excluded)
    ids = torch.randint(4, 100, (2, 13))
    outs = []
    for pm in (pq, pf):
        emb = pm.get_input_embeddings()(ids).detach().requires_grad_(True)
        out = pm(inputs_embeds=emb, labels=ids)
        out.loss.backward()
        grads = {n: p.grad for n, p in pm.named_parameters() if p.requires_grad}
        outs.append((out.loss, emb.grad, grads))
    (lq, eq, gq), (lf, ef, gf) = outs
    torch.testing.assert_close(lq, lf, rtol=1e-5, atol=1e-6)
    assert eq is not None and eq.abs().sum() > 0  # gradients reach the inputs through NF4 layers
    torch.testing.assert_close(eq, ef, rtol=1e-4, atol=1e-6)
    assert gq.keys() == gf.keys() and all("lora_" in n for n in gq)
    for n in gq:
        assert gq[n] is not None and gq[n].abs().sum() > 0, n
        torch.testing.assert_close(gq[n], gf[n], rtol=1e-4, atol=1e-6)
    # one optimizer step changes the LoRA weights and the loss
    opt = torch.optim.SGD([p for p in pq.parameters() if p.requires_grad], lr=0.5)
    opt.step()
    assert pq(input_ids=ids, labels=ids).loss.item() != lq.item()


def test_peft_explicit_targets_mixed_batch_and_merge_refused():
    from peft import LoraConfig, get_peft_model

    base = quantize_model_(build_tiny_llama(0, torch.float32), compute_dtype=torch.float32)
    pm = get_peft_model(
        base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    pm.add_adapter("other", LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    pm.eval()
    ids = torch.randint(4, 100, (2, 7))
    mixed = pm(input_ids=ids, adapter_names=["default", "other"]).logits
    pm.set_adapter("default")
    a = pm(input_ids=ids[:1]).logits
    pm.set_adapter("other")
    b = pm(input_ids=ids[1:]).logits
    torch.testing.assert_close(mixed, torch.cat([a, b]), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(a, pm(input_ids=ids[:1]).logits)  # "other" is active: the adapters differ
    with pytest.raises(MergeNotSupportedError, match="dequantize-then-merge"):
        pm.merge_and_unload()
    with pytest.raises(MergeNotSupportedError):
        pm.merge_and_unload(safe_merge=True)


def test_linear4bit_triton_backend_matches_torch():
    lin = _linear(k=64, n=72, dtype=torch.bfloat16)
    q_t = Linear4bit.from_linear(lin, backend="triton")
    q_r = Linear4bit.from_linear(lin, backend="torch")
    x = torch.randn(5, 64, dtype=torch.bfloat16)
    w = dequantize_nf4(q_r.weight, q_r.quant_state, torch.bfloat16).double()
    ref = x.double() @ w.T + lin.bias.double()
    err_t = (q_t(x).double() - ref).abs().max()
    err_r = (q_r(x).double() - ref).abs().max()
    assert err_t <= 2 * err_r + torch.finfo(torch.bfloat16).tiny


def test_deepcopy_keeps_the_merge_guard_and_compile_traces():
    q = Linear4bit.from_linear(_linear(k=32, n=24))
    q2 = copy.deepcopy(q)
    assert torch.equal(q2.weight, q.weight) and q2.quant_state.absmax is not q.quant_state.absmax
    with pytest.raises(MergeNotSupportedError):
        q2.weight.data += 1
    x = torch.randn(3, 32, requires_grad=True)
    eager = q(x)
    (g,) = torch.autograd.grad(eager.sum(), x)
    out = torch.compile(q, backend="aot_eager")(x)
    (cg,) = torch.autograd.grad(out.sum(), x)
    torch.testing.assert_close(out, eager)
    torch.testing.assert_close(cg, g)
