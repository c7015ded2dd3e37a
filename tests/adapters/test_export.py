"""Dequantize-then-merge export: merged logits == base + adapter logits, streamed shards, provenance."""

from __future__ import annotations

import json

import pytest
import torch

from qtulu.adapters.store import AdapterError, save_adapter
from qtulu.adapters.export import ExportError, export_merged, parse_size

IDS = torch.tensor([[1, 40, 41, 42, 17, 60, 61, 5, 9, 33, 70, 71], [1, 80, 81, 9, 9, 10, 22, 23, 24, 25, 26, 2]])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A base dir (fp32 safetensors), an NF4 base loaded from it, and an adapter 'trained' on that."""
    from peft import LoraConfig, get_peft_model

    from qtulu.model.load import base_info, load_base
    from qtulu.model.tiny import build_char_tokenizer, build_tiny_llama

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

    from qtulu.model.tiny import build_char_tokenizer

    tok, want = AutoTokenizer.from_pretrained(str(tmp_path / "m32")), build_char_tokenizer()
    text = "<|user|>\n2+2?\n<|assistant|>\n4"
    assert tok(text)["input_ids"] == want(text)["input_ids"]
    meta = json.loads((tmp_path / "m32" / "qtulu_merge.json").read_text())
    assert meta["recipe"]["name"] == "t" and meta["adapter"]["sha256"]


def test_classic_trap_merging_into_original_weights_is_worse(trained, tmp_path):
    """Merging into the original (unquantized) weights puts the adapter on weights it never saw."""
    from peft import PeftModel

    from qtulu.model.tiny import build_tiny_llama

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
    from qtulu.model.load import load_base
    from qtulu.model.quant import Linear4bit

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

    from qtulu.model.load import load_base
    from qtulu.model.tiny import build_tiny_llama

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
    from qtulu.model.tiny import build_tiny_llama

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
    with pytest.raises(AdapterError, match="plain PEFT adapter.*--trained-on"):
        export_merged(trained["base_dir"], plain, tmp_path / "x", force=True)
    assert not (tmp_path / "x").exists()
    assert parse_size("5GB") == 5 * 10**9 and parse_size("500KB") == 500_000 and parse_size(7) == 7
    for bad in ("five", "5GiB", "5 bytes"):
        with pytest.raises(ExportError, match="max_shard_size"):
            parse_size(bad)


# ------------------------------------------- plain PEFT adapters (--trained-on) and the libraries


def test_plain_peft_adapter_merges_as_told(trained, tmp_path):
    """--trained-on nf4: dequant(NF4(W)) + delta, the same merge as the qtulu-saved adapter with the
    same factors; --trained-on fp32: W + delta, what peft's own merge_and_unload gives on W."""
    import shutil

    from peft import PeftModel
    from safetensors.torch import load_file

    from qtulu.model.tiny import build_tiny_llama

    plain = tmp_path / "plain"
    shutil.copytree(trained["adapter"], plain)
    (plain / "qtulu.json").unlink()

    def tensors(d):
        out = {}
        for f in sorted(d.glob("*.safetensors")):
            out.update(load_file(str(f)))
        return out

    export_merged(trained["base_dir"], trained["adapter"], tmp_path / "q", dtype="float32", progress=False)
    rep = export_merged(trained["base_dir"], plain, tmp_path / "p4", dtype="float32", progress=False,
                        trained_on="nf4", compute_dtype="float32")
    assert rep["adapter"]["trained_on"] == "nf4" and rep["merged_layers"] == 14
    want, got = tensors(tmp_path / "q"), tensors(tmp_path / "p4")
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)

    export_merged(trained["base_dir"], plain, tmp_path / "p32", dtype="float32", progress=False, trained_on="fp32")
    peft_merged = PeftModel.from_pretrained(build_tiny_llama(seed=0, dtype=torch.float32), str(plain)).merge_and_unload()
    got = tensors(tmp_path / "p32")
    for k, v in peft_merged.state_dict().items():
        torch.testing.assert_close(got[k], v, rtol=1e-6, atol=1e-7, msg=k)


def _old_delta(b, a, scale):  # qtulu's formula before it called peft (export.py, commit 4c709b7)
    return (b.float() @ a.float()) * scale


@pytest.mark.parametrize("kind", ["plain", "rslora", "patterns"])
def test_delta_is_pefts_get_delta_weight_and_equals_the_old_formula(tmp_path, kind):
    from peft import LoraConfig, get_peft_model

    from qtulu.adapters.export import LoraDeltas
    from qtulu.model.tiny import build_tiny_llama

    extra = {"plain": {}, "rslora": {"use_rslora": True},
             "patterns": {"rank_pattern": {"v_proj": 2}, "alpha_pattern": {"down_proj": 3}}}[kind]
    torch.manual_seed(7)
    pm = get_peft_model(build_tiny_llama(seed=0, dtype=torch.float32),
                        LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0,
                                   init_lora_weights=False, **extra))
    pm.save_pretrained(tmp_path)
    deltas = LoraDeltas(tmp_path)
    layers = {n[len("base_model.model."):]: m for n, m in pm.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A}
    assert len(layers) == 14 and set(layers) == set(deltas.factors)
    for name, layer in layers.items():
        a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        new = deltas.delta(name)
        assert torch.equal(new, _old_delta(b, a, deltas.scale(name))), name  # bit for bit
        assert torch.equal(new, layer.get_delta_weight("default")), name  # = peft's model-level answer
    assert deltas.rank_alpha("model.layers.0.self_attn.v_proj")[0] == (2 if kind == "patterns" else 4)


def test_shard_plan_is_huggingface_hubs_and_the_old_greedy_split(trained, tmp_path):
    """The shards are huggingface_hub's plan (read back: the same names and index as its
    split_torch_state_dict_into_shards on the written tensors), and where no tensor exceeds the
    limit that plan equals qtulu's former greedy split (re-implemented below from export.py at
    4c709b7). Two deliberate differences: a tensor over the limit gets its own shard without
    closing the current one, and a single shard is model.safetensors without an index, as
    transformers' save_pretrained writes them."""
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors import safe_open

    rep = export_merged(trained["base_dir"], trained["adapter"], tmp_path / "m", dtype="bfloat16",
                        max_shard_size="60KB", progress=False)
    index = json.loads((tmp_path / "m" / "model.safetensors.index.json").read_text())
    written = {}
    for shard in rep["shards"]:
        with safe_open(str(tmp_path / "m" / shard), framework="pt") as f:
            written.update({k: f.get_slice(k) for k in f.keys()})
    # the export streams the model's state dict in its order (bf16 here, nothing tied)
    from qtulu.model.tiny import build_tiny_llama

    meta = {k: torch.empty(v.shape, dtype=torch.bfloat16, device="meta")
            for k, v in build_tiny_llama(seed=0).state_dict().items()}
    assert set(meta) == set(written) and all(list(written[k].get_shape()) == list(meta[k].shape) for k in meta)
    lib = split_torch_state_dict_into_shards(meta, filename_pattern="model{suffix}.safetensors", max_shard_size=60_000)
    assert lib.tensor_to_filename == index["weight_map"]
    assert max(t.numel() * t.element_size() for t in meta.values()) <= 60_000  # no oversize tensor here

    def old_split(sizes, max_bytes):
        shards, cur, size = [], [], 0
        for name, nbytes in sizes:
            if cur and size + nbytes > max_bytes:
                shards.append(cur)
                cur, size = [], 0
            cur.append(name)
            size += nbytes
        return shards + ([cur] if cur else [])

    old = old_split([(k, t.numel() * t.element_size()) for k, t in meta.items()], 60_000)
    assert [sorted(g) for g in old] == [sorted(lib.filename_to_tensors[f]) for f in lib.filename_to_tensors]
    assert len(rep["shards"]) == len(old) > 1


def test_parse_size_is_huggingface_hubs_and_equals_the_old_parser():
    import re

    from huggingface_hub.serialization._base import parse_size_to_int

    def old(size):  # export.parse_size before it called huggingface_hub (commit 4c709b7)
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)?\s*", str(size), flags=re.I)
        unit = (m.group(2) or "B").upper().replace("I", "")
        return int(float(m.group(1)) * {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}[unit])

    for text in ("5GB", "500MB", "1.5GB", "7KB", "2TB", " 60KB ", "10gb"):
        assert parse_size(text) == parse_size_to_int(text) == old(text), text
    assert parse_size("1000") == old("1000") == 1000
    assert old("5GiB") == 5 * 10**9  # the old parser read GiB as GB (wrong by 7%): now refused
