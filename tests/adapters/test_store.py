"""Adapter format: save/verify (corruption, other base/quantization), load, swap, mixed batches."""

from __future__ import annotations

import json
import struct
import warnings

import pytest
import torch

from qtulu.adapters.store import (
    META_NAME,
    WEIGHTS_NAME,
    AdapterError,
    save_adapter,
    verify_adapter,
)

BASE_INFO = {
    "id": "tiny-llama-seed0",
    "revision": None,
    "weights_sha256": "a" * 64,
    "quantization": {"method": "nf4", "blocksize": 64, "double_quant": True, "compute_dtype": "float32"},
}


def lora_model(seed: int = 0, names=("default",), r: int = 4):
    """Tiny llama with LoRA adapters whose B is non-zero (so each adapter changes the logits)."""
    from peft import LoraConfig, get_peft_model

    from qtulu.model.tiny import build_tiny_llama

    model = build_tiny_llama(seed=0, dtype=torch.float32)
    torch.manual_seed(seed)
    cfg = LoraConfig(r=r, lora_alpha=2 * r, target_modules="all-linear", lora_dropout=0.0, init_lora_weights=False)
    peft_model = get_peft_model(model, cfg, adapter_name=names[0])
    for name in names[1:]:
        peft_model.add_adapter(name, cfg)
    return peft_model.eval()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    model = lora_model()
    out = save_adapter(model, root / "a", base_info=BASE_INFO, recipe={"name": "demo"}, manifest={"rows": 3})
    return out


def _copy(src, tmp_path):
    import shutil

    dst = tmp_path / "copy"
    shutil.copytree(src, dst)
    return dst


def test_save_layout_and_vanilla_peft_loads(saved):
    from peft import PeftModel

    from qtulu.model.tiny import build_tiny_llama

    names = sorted(p.name for p in saved.iterdir())
    assert {"adapter_config.json", WEIGHTS_NAME, META_NAME} <= set(names)
    assert not any(n.startswith(".") for n in saved.parent.iterdir() if n.name != saved.name)
    meta = verify_adapter(saved, base_info=BASE_INFO)
    assert meta["recipe"] == {"name": "demo"} and meta["data_manifest"] == {"rows": 3}
    assert meta["quantization"] == BASE_INFO["quantization"]
    assert set(meta["files"]) >= {"adapter_config.json", WEIGHTS_NAME}
    # vanilla peft loads it and reproduces the saved model's logits
    ref = lora_model()
    ids = torch.tensor([[5, 9, 17, 33, 2]])
    loaded = PeftModel.from_pretrained(build_tiny_llama(seed=0, dtype=torch.float32), str(saved)).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, ref(ids).logits, rtol=0, atol=1e-6)


def test_non_default_adapter_name_saved_flat(tmp_path):
    model = lora_model(names=("x", "y"))
    out = save_adapter(model, tmp_path / "y", adapter_name="y", base_info=BASE_INFO)
    assert (out / WEIGHTS_NAME).is_file() and not (out / "y").exists()
    assert verify_adapter(out)["adapter_name"] == "y"
    with pytest.raises(AdapterError, match="no adapter named 'z'"):
        save_adapter(model, tmp_path / "z", adapter_name="z", base_info=BASE_INFO)


def test_save_refuses_nonfinite_and_leaves_nothing(tmp_path):
    model = lora_model()
    with torch.no_grad():
        next(p for n, p in model.named_parameters() if "lora_B" in n).view(-1)[0] = float("nan")
    with pytest.raises(AdapterError, match="non-finite"):
        save_adapter(model, tmp_path / "bad", base_info=BASE_INFO)
    assert list(tmp_path.iterdir()) == []


def test_save_replaces_existing_dir(tmp_path, saved):
    model = lora_model(seed=1)
    out = tmp_path / "a"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    save_adapter(model, out, base_info=BASE_INFO)
    assert not (out / "stale.txt").exists()
    verify_adapter(out)
    assert [p.name for p in tmp_path.iterdir()] == ["a"]


def test_truncated_file_refused(saved, tmp_path):
    d = _copy(saved, tmp_path)
    data = (d / WEIGHTS_NAME).read_bytes()
    (d / WEIGHTS_NAME).write_bytes(data[: len(data) - 100])
    with pytest.raises(AdapterError, match="truncated"):
        verify_adapter(d)


def test_flipped_byte_refused_by_checksum(saved, tmp_path):
    from safetensors.torch import load_file

    d = _copy(saved, tmp_path)
    data = bytearray((d / WEIGHTS_NAME).read_bytes())
    data[-5] ^= 0x01  # inside the last tensor's data
    (d / WEIGHTS_NAME).write_bytes(bytes(data))
    load_file(str(d / WEIGHTS_NAME))  # safetensors alone accepts it ...
    with pytest.raises(AdapterError, match="checksum mismatch"):  # ... the manifest does not
        verify_adapter(d)


def _rewrite_header(path, edit):
    """Edit a safetensors JSON header in place, keeping the tensor bytes."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    edit(header)
    new = json.dumps(header).encode()
    new += b" " * ((8 - len(new) % 8) % 8)
    path.write_bytes(struct.pack("<Q", len(new)) + new + raw[8 + n :])


def test_renamed_key_refused(saved, tmp_path):
    d = _copy(saved, tmp_path)

    def rename(h):
        key = next(k for k in h if k != "__metadata__")
        h[key.replace("lora_A", "lora_Z")] = h.pop(key)

    _rewrite_header(d / WEIGHTS_NAME, rename)
    with pytest.raises(AdapterError, match="renamed key"):
        verify_adapter(d)


def test_changed_shape_refused(saved, tmp_path):
    d = _copy(saved, tmp_path)

    def reshape(h):
        key = next(k for k in h if "lora_A" in k)
        a, b = h[key]["shape"]
        h[key]["shape"] = [b, a]  # same byte count, transposed shape

    _rewrite_header(d / WEIGHTS_NAME, reshape)
    with pytest.raises(AdapterError, match="changed shape"):
        verify_adapter(d)


def test_missing_manifest_and_missing_file(saved, tmp_path):
    """A plain PEFT adapter (no qtulu.json) needs --trained-on; force does not replace it."""
    d = _copy(saved, tmp_path)
    (d / META_NAME).unlink()
    for force in (False, True):
        with pytest.raises(AdapterError, match="plain PEFT adapter.*--trained-on nf4.bf16.fp16.fp32"):
            verify_adapter(d, force=force)
    rec = verify_adapter(d, trained_on="fp32", base_info=dict(BASE_INFO, quantization=None))
    assert rec["trained_on"] == "fp32" and rec["quantization"] is None and rec["compute_dtype"] == "float32"
    with pytest.raises(AdapterError, match="trained against nf4 .*unquantized base"):
        verify_adapter(d, trained_on="nf4", base_info=dict(BASE_INFO, quantization=None))
    with pytest.raises(AdapterError, match="trained_on must be one of"):
        verify_adapter(d, trained_on="int8")
    (d / "adapter_config.json").unlink()
    with pytest.raises(AdapterError, match="adapter_config.json: missing"):
        verify_adapter(d, force=True)


def test_other_base_refused_unless_forced(saved):
    other = dict(BASE_INFO, weights_sha256="b" * 64, id="other")
    with pytest.raises(AdapterError, match="other base"):
        verify_adapter(saved, base_info=other)
    with pytest.warns(UserWarning, match="other base"):
        verify_adapter(saved, base_info=other, force=True)


def test_other_quantization_refused_unless_forced(saved):
    for q in ({**BASE_INFO["quantization"], "blocksize": 128}, None):
        other = dict(BASE_INFO, quantization=q)
        with pytest.raises(AdapterError, match="other quantization"):
            verify_adapter(saved, base_info=other)
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            verify_adapter(saved, base_info=other, force=True)
        assert any("other quantization" in str(x.message) for x in w)


# ------------------------------------------------------------------ loading, swapping, mixed batches


@pytest.fixture(scope="module")
def two_adapters(tmp_path_factory):
    root = tmp_path_factory.mktemp("two")
    a = save_adapter(lora_model(seed=1), root / "first", base_info=BASE_INFO)
    b = save_adapter(lora_model(seed=2, r=8), root / "bdir", base_info=BASE_INFO)
    return a, b


def _batch():
    ids = torch.tensor([[5, 9, 17, 33, 40, 2], [3, 3, 12, 8, 70, 90], [44, 45, 46, 47, 48, 49], [7, 8, 9, 10, 11, 12]])
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # left padding in row 1
    return ids, mask


def test_attach_swap_and_mixed_batch_equals_per_row(two_adapters):
    from qtulu.adapters.store import adapters_disabled, attach_adapters, forward_mixed, set_active
    from qtulu.model.tiny import build_tiny_llama

    a, b = two_adapters
    model = attach_adapters(build_tiny_llama(seed=0, dtype=torch.float32), [a, f"b={b}"], base_info=BASE_INFO)
    assert set(model.peft_config) == {"first", "b"} and model.active_adapter == "first"
    assert not any(p.requires_grad for p in model.parameters())
    ids, mask = _batch()
    per = {}
    with torch.no_grad():
        for name in ("first", "b", "base"):
            set_active(model, name)
            per[name] = model(input_ids=ids, attention_mask=mask).logits
    assert adapters_disabled(model)
    assert (per["first"] - per["b"]).abs().max() > 1e-2 and (per["first"] - per["base"]).abs().max() > 1e-2
    rows = ["b", "first", "base", "b"]
    mixed = forward_mixed(model, ids, mask, rows)
    assert adapters_disabled(model)  # "base" mode restored after the mixed batch
    for i, name in enumerate(rows):
        valid = mask[i].bool()
        torch.testing.assert_close(mixed[i][valid], per[name][i][valid], rtol=0, atol=1e-5)
    with pytest.raises(AdapterError, match="no adapter named 'c'"):
        forward_mixed(model, ids, mask, ["first", "b", "c", "first"])


def test_attach_refuses_duplicates_reserved_other_base(two_adapters):
    from qtulu.adapters.store import attach_adapters
    from qtulu.model.tiny import build_tiny_llama

    a, _ = two_adapters
    with pytest.raises(AdapterError, match="unique"):
        attach_adapters(build_tiny_llama(seed=0), [a, a])
    with pytest.raises(AdapterError, match="reserved"):
        attach_adapters(build_tiny_llama(seed=0), [f"base={a}"])
    with pytest.raises(AdapterError, match="'lora_' prefix"):
        attach_adapters(build_tiny_llama(seed=0), [f"a={a}"])
    with pytest.raises(AdapterError, match="other base"):
        attach_adapters(build_tiny_llama(seed=0), [a], base_info=dict(BASE_INFO, weights_sha256="c" * 64))


def test_attach_refuses_keys_not_matching_model(two_adapters):
    from qtulu.adapters.store import attach_adapters
    from qtulu.model.tiny import build_tiny_llama

    a, _ = two_adapters
    # a base with one layer: the adapter's layer-1 keys have no module to go to
    with pytest.raises(AdapterError, match="do not match the base model"):
        attach_adapters(build_tiny_llama(seed=0, num_hidden_layers=1), [a])


def test_mixed_batch_on_nf4_base_and_generate(two_adapters):
    """The same on qtulu's Linear4bit base layers (QLoRA), plus mixed-adapter generate."""
    from qtulu.adapters.store import attach_adapters, forward_mixed, generate_mixed, set_active
    from qtulu.model.load import load_base
    from qtulu.model.quant import Linear4bit
    from qtulu.model.tiny import build_tiny_llama

    a, b = two_adapters
    base, _ = load_base(build_tiny_llama(seed=0, dtype=torch.float32), quantize="nf4", compute_dtype=torch.float32,
                        device="cpu", attn_implementation="sdpa")
    model = attach_adapters(base, [a, f"b={b}"])
    assert sum(isinstance(m, Linear4bit) for m in model.modules()) == 14
    ids, mask = _batch()
    rows = ["first", "b", "b", "base"]
    mixed = forward_mixed(model, ids, mask, rows)
    with torch.no_grad():
        for i, name in enumerate(rows):
            set_active(model, name)
            one = model(input_ids=ids[i : i + 1], attention_mask=mask[i : i + 1]).logits[0]
            valid = mask[i].bool()
            torch.testing.assert_close(mixed[i][valid], one[valid], rtol=0, atol=1e-5)
    set_active(model, "first")
    gen = generate_mixed(model, ids[[0, 2]], mask[[0, 2]], ["b", "base"], max_new_tokens=4, do_sample=False,
                         pad_token_id=3)
    for j, (i, name) in enumerate(zip([0, 2], ["b", "base"])):
        set_active(model, name)
        one = model.generate(input_ids=ids[i : i + 1], attention_mask=mask[i : i + 1], max_new_tokens=4,
                             do_sample=False, pad_token_id=3)
        assert torch.equal(gen[j], one[0])


# ------------------------------------------------------------------ plain PEFT adapters, --trained-on


@pytest.fixture(scope="module")
def plain_peft(tmp_path_factory):
    """A base dir (fp32) and a plain peft adapter made on it by peft alone (no qtulu.json)."""
    from qtulu.model.tiny import build_char_tokenizer, build_tiny_llama

    root = tmp_path_factory.mktemp("plain")
    base_dir = root / "base"
    build_tiny_llama(seed=0, dtype=torch.float32).save_pretrained(base_dir)
    build_char_tokenizer().save_pretrained(base_dir)
    pm = lora_model(seed=4)
    pm.save_pretrained(root / "peft")
    assert not (root / "peft" / META_NAME).exists()
    with torch.no_grad():
        ref = pm(_batch()[0]).logits
    return base_dir, root / "peft", ref


def test_plain_peft_adapter_needs_trained_on_before_the_base_loads(plain_peft, monkeypatch):
    import qtulu.model.load
    from qtulu.adapters.store import load_model

    base_dir, adir, _ = plain_peft
    monkeypatch.setattr(qtulu.model.load, "load_base", lambda *a, **k: pytest.fail("base loaded before the refusal"))
    with pytest.raises(AdapterError, match="--trained-on"):
        load_model(str(base_dir), [adir], device="cpu")
    with pytest.raises(AdapterError, match="--trained-on"):
        load_model(str(base_dir), [adir], device="cpu", force=True)
    with pytest.raises(AdapterError, match="adapter directory not found"):
        load_model(str(base_dir), [adir.parent / "nope"], trained_on="fp32", device="cpu")


def test_plain_peft_adapter_loads_as_told(plain_peft):
    """trained_on=fp32: unquantized fp32 base, the logits of the adapter's author; nf4: an NF4 base."""
    from qtulu.adapters.store import load_model
    from qtulu.model.quant import Linear4bit

    base_dir, adir, ref = plain_peft
    model, _ = load_model(str(base_dir), [adir], trained_on="fp32", device="cpu", attn_implementation="sdpa")
    assert not any(isinstance(m, Linear4bit) for m in model.modules())
    with torch.no_grad():
        torch.testing.assert_close(model(_batch()[0]).logits, ref, rtol=0, atol=1e-5)
    q, _ = load_model(str(base_dir), [adir], trained_on="nf4", compute_dtype="float32", device="cpu",
                      attn_implementation="sdpa")
    assert sum(isinstance(m, Linear4bit) for m in q.modules()) == 14
    with torch.no_grad():
        assert (q(_batch()[0]).logits - ref).abs().max() > 1e-3  # NF4 is another base: told, not guessed
    with pytest.raises(AdapterError, match="trained against nf4 .*unquantized base"):
        load_model(str(base_dir), [adir], trained_on="nf4", quantize=None, device="cpu")
    with pytest.raises(AdapterError, match="compute_dtype bfloat16 was asked for"):
        load_model(str(base_dir), [adir], trained_on="fp32", compute_dtype="bfloat16", device="cpu")


def test_trained_on_contradicting_qtulu_json_is_refused(two_adapters):
    from qtulu.adapters.store import adapter_record

    a, _ = two_adapters
    assert adapter_record(a, "nf4")["quantization"] == BASE_INFO["quantization"]
    with pytest.raises(AdapterError, match="trained against nf4, but --trained-on/trained_on says bf16"):
        adapter_record(a, "bf16")


def test_adapter_saved_before_weights_hash_is_checked_against_the_files(tmp_path):
    """Adapters saved by an older qtulu recorded a hash of the checkpoint files: still checked."""
    from qtulu.adapters.store import load_model
    from qtulu.model.load import _safetensor_files, files_sha256
    from qtulu.model.tiny import build_tiny_llama

    base_dir = tmp_path / "base"
    build_tiny_llama(seed=0, dtype=torch.float32).save_pretrained(base_dir)
    legacy = {"id": str(base_dir), "revision": None, "weights_sha256": files_sha256(_safetensor_files(base_dir)),
              "quantization": None}
    good = save_adapter(lora_model(seed=5), tmp_path / "good", base_info=legacy, recipe={"model": {"compute_dtype": "float32"}})
    load_model(str(base_dir), [good], device="cpu", attn_implementation="sdpa")
    bad = save_adapter(lora_model(seed=5), tmp_path / "bad", base_info=dict(legacy, weights_sha256="d" * 64),
                       recipe={"model": {"compute_dtype": "float32"}})
    with pytest.raises(AdapterError, match="other base"):
        load_model(str(base_dir), [bad], device="cpu", attn_implementation="sdpa")
