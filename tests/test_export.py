"""Dequantize-then-merge export: merged logits == base + adapter logits, streamed shards, provenance."""

from __future__ import annotations

import json

import pytest
import torch

from qtulu.adapters import AdapterError, save_adapter
from qtulu.export import ExportError, export_merged, parse_size

IDS = torch.tensor([[1, 40, 41, 42, 17, 60, 61, 5, 9, 33, 70, 71], [1, 80, 81, 9, 9, 10, 22, 23, 24, 25, 26, 2]])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A base dir (fp32 safetensors), an NF4 base loaded from it, and an adapter 'trained' on that."""
    from peft import LoraConfig, get_peft_model

    from qtulu.model import base_info, load_base
    from qtulu.tiny import build_char_tokenizer, build_tiny_llama

    root = tmp_path_factory.mktemp("export")
    base_dir = root / "base"
    build_tiny_llama(seed=0, dtype=torch.float32).save_pretrained(base_dir)
    build_char_tokenizer().save_pretrained(base_dir)
    model, _tok = load_base(str(base_dir), quantize="nf4", compute_dtype=torch.float32, device="cpu",
                            attn_implementation="sdpa")
    torch.manual_seed(3)
    cfg = LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", exclude_modules=["lm_head"],
                     lora_dropout=0.0, init_lora_weights=False)
    pm = get_peft_model(model, cfg).eval()
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.mul_(4.0)  # a delta big enough to move the logits visibly
        ref = pm(IDS).logits  # (B, T, V) fp32 compute, NF4 base + adapter
        with pm.disable_adapter():
            base_logits = pm(IDS).logits
    adapter = save_adapter(pm, root / "adapter", base_info=base_info(pm),
                           recipe={"name": "t", "model": {"compute_dtype": "float32"}})
    return {"root": root, "base_dir": base_dir, "adapter": adapter, "ref": ref, "base_logits": base_logits,
            "model": pm}


def _logits(path, dtype=torch.float32):
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, attn_implementation="sdpa").eval()
    with torch.no_grad():
        return m, m(IDS).logits.float()


def test_merged_fp32_equals_base_plus_adapter(trained, tmp_path):
    from peft.tuners.tuners_utils import BaseTunerLayer

    ref, base_logits = trained["ref"], trained["base_logits"]
    scale = ref.abs().max()
    assert (ref - base_logits).abs().max() > 0.05 * scale  # the adapter matters
    report = export_merged(trained["base_dir"], trained["adapter"], tmp_path / "m32", dtype="float32",
                           max_shard_size="60KB", progress=False)
    assert report["merged_layers"] == 14 and report["compute_dtype"] == "float32"
    assert len(report["shards"]) > 1  # streamed into several shards, with an index
    index = json.loads((tmp_path / "m32" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(report["shards"])
    model, logits = _logits(tmp_path / "m32")
    diff = (logits - ref).abs().max()
    print(f"fp32 export: max |logit diff| = {diff:.2e}, logit scale {scale:.3f}")
    assert diff <= 1e-4 * scale, f"merged vs base+adapter: {diff:.3e} (logit scale {scale:.3f})"
    assert not any(isinstance(m, BaseTunerLayer) for m in model.modules())
    assert not any("lora" in n for n, _ in model.named_parameters())
    assert all(p.dtype == torch.float32 for p in model.parameters())
    # tokenizer and provenance travel with the model
    from transformers import AutoTokenizer

    from qtulu.tiny import build_char_tokenizer

    tok, want = AutoTokenizer.from_pretrained(str(tmp_path / "m32")), build_char_tokenizer()
    text = "<|user|>\n2+2?\n<|assistant|>\n4"
    assert tok(text)["input_ids"] == want(text)["input_ids"]
    meta = json.loads((tmp_path / "m32" / "qtulu_merge.json").read_text())
    assert meta["recipe"]["name"] == "t" and meta["adapter"]["sha256"]


def test_classic_trap_merging_into_original_weights_is_worse(trained, tmp_path):
    """Merging into the original (unquantized) weights puts the adapter on weights it never saw."""
    from peft import PeftModel

    from qtulu.tiny import build_tiny_llama

    ref = trained["ref"]
    naive = PeftModel.from_pretrained(build_tiny_llama(seed=0, dtype=torch.float32), str(trained["adapter"]))
    naive = naive.merge_and_unload().eval()
    with torch.no_grad():
        naive_err = (naive(IDS).logits - ref).abs().max()
    export_merged(trained["base_dir"], trained["adapter"], tmp_path / "m", dtype="float32", progress=False)
    ours_err = (_logits(tmp_path / "m")[1] - ref).abs().max()
    print(f"merge into original weights: max |logit diff| {naive_err:.2e}; dequantize-then-merge {ours_err:.2e}")
    assert naive_err > 100 * ours_err, (naive_err, ours_err)


def test_bf16_export_is_the_rounded_exact_merge(trained, tmp_path):
    from safetensors.torch import load_file

    export_merged(trained["base_dir"], trained["adapter"], tmp_path / "m32", dtype="float32", progress=False)
    rep = export_merged(trained["base_dir"], trained["adapter"], tmp_path / "m16", dtype="bfloat16", progress=False)

    def tensors(d):
        out = {}
        for f in sorted(d.glob("*.safetensors")):
            out.update(load_file(str(f)))
        return out

    t32, t16 = tensors(tmp_path / "m32"), tensors(tmp_path / "m16")
    assert set(t32) == set(t16)
    for k in t32:
        assert t16[k].dtype == torch.bfloat16
        assert torch.equal(t16[k], t32[k].to(torch.bfloat16)), k
    assert 0 < rep["weight_rounding_rel_error_max"] < 2**-7
    _, logits = _logits(tmp_path / "m16")
    err = (logits - trained["ref"]).abs().max() / trained["ref"].abs().max()
    print(f"bf16 export: max |logit diff| / logit scale = {err:.2e}")
    assert err < 0.05


def test_requantized_nf4_export_loads_and_reports_its_logit_error(trained, tmp_path):
    from qtulu.model import load_base
    from qtulu.quant import Linear4bit

    rep = export_merged(trained["base_dir"], trained["adapter"], tmp_path / "q", dtype="float32", quantize="nf4",
                        progress=False)
    rq = rep["requantize"]
    assert 0.01 < rq["weight_rel_error_max"] < 0.2  # NF4 is ~4 bits: ~10% relative per weight
    # a tiny random model has small logits, so ~9% weight noise is a large relative logit error
    assert rq["logits"]["max_abs"] > 1e-4 and 0 < rq["logits"]["rel"] < 10
    print(f"nf4 re-quantized export: weight rel err {rq['weight_rel_error_max']:.3f}, logits {rq['logits']}")
    cfg = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "bitsandbytes" and cfg["bnb_4bit_quant_type"] == "nf4"
    model, _ = load_base(str(tmp_path / "q"), compute_dtype=torch.float32, device="cpu", attn_implementation="sdpa")
    assert sum(isinstance(m, Linear4bit) for m in model.modules()) == 14
    with torch.no_grad():
        err = (model(IDS).logits - trained["ref"]).abs().max()
    assert torch.isfinite(err) and err > 1e-4  # the re-quantized weights are loaded, not the exact merge


def test_in_memory_base_gives_the_same_weights(trained, tmp_path):
    from safetensors.torch import load_file

    from qtulu.model import load_base
    from qtulu.tiny import build_tiny_llama

    model, _ = load_base(build_tiny_llama(seed=0, dtype=torch.float32), quantize="nf4",
                         compute_dtype=torch.float32, device="cpu", attn_implementation="sdpa")
    # same weights as the files, but the in-memory hash is over tensors, not file bytes
    export_merged(model, trained["adapter"], tmp_path / "mem", dtype="float32", force=True, progress=False)
    export_merged(trained["base_dir"], trained["adapter"], tmp_path / "dir", dtype="float32", progress=False)
    a = load_file(str(next((tmp_path / "mem").glob("*.safetensors"))))
    b = load_file(str(next((tmp_path / "dir").glob("*.safetensors"))))
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_other_base_refused_and_bad_args(trained, tmp_path):
    from qtulu.tiny import build_tiny_llama

    other = tmp_path / "other"
    build_tiny_llama(seed=1, dtype=torch.float32).save_pretrained(other)
    with pytest.raises(AdapterError, match="other base"):
        export_merged(other, trained["adapter"], tmp_path / "x", progress=False)
    assert not (tmp_path / "x").exists()
    with pytest.raises(ExportError, match="dtype"):
        export_merged(trained["base_dir"], trained["adapter"], tmp_path / "x", dtype="int8")
    import shutil

    plain = tmp_path / "plain"
    shutil.copytree(trained["adapter"], plain)
    (plain / "qtulu.json").unlink()
    with pytest.raises(ExportError, match="qtulu.json: missing"):
        export_merged(trained["base_dir"], plain, tmp_path / "x", force=True)
    assert parse_size("5GB") == 5 * 10**9 and parse_size("500KB") == 500_000 and parse_size(7) == 7
    with pytest.raises(ExportError, match="max_shard_size"):
        parse_size("five")
