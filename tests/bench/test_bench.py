"""`qtulu bench e2e`: shapes, FLOP accounting, real lengths and packing, the 4-bit build, and one
tiny end-to-end run of every configuration (qtulu, both A/B switches, the HF+peft+bnb baseline)
in forked processes, down to the final JSON line, the chart and the docs record."""

from __future__ import annotations

import io
import json
import random
import weakref

import pytest
import torch

from qtulu.bench import build as bench_build
from qtulu.bench.flops import mfu, peak_tflops, step_flops
from qtulu.bench.lengths import (
    pack_bfd,
    padded_microbatches,
    read_lengths_file,
    select_rows,
    token_lengths,
)
from qtulu.model.shapes import SHAPES, ShapeSpec, get_shape


@pytest.fixture(scope="module", autouse=True)
def bench_server():
    """The fork server of the end-to-end test, started first so that its imports (~10 s) overlap
    the other tests of this module on the second core."""
    from qtulu.bench.e2e import ForkServer

    with ForkServer(cpu=True) as server:
        yield server


# --- shapes and FLOPs -------------------------------------------------------------------------


def test_llama_shapes_have_the_published_sizes():
    # LLaMA-1 parameter counts (paper: 6.7B, 13.0B, 32.5B, 65.2B)
    expected = {"llama-7b": 6.74e9, "llama-13b": 13.02e9, "llama-30b": 32.53e9, "llama-65b": 65.29e9}
    for name, n in expected.items():
        assert abs(SHAPES[name].total_params() - n) / n < 0.005, name
    s = get_shape("llama-7b")
    assert s.head_dim == 128 and s.n_kv_heads == 32
    # the 7B decoder linears: 32 x (4 x 4096^2 + 3 x 4096 x 11008), plus the 32000 x 4096 head
    assert s.frozen_matmul_params() == 32 * (4 * 4096**2 + 3 * 4096 * 11008) + 32000 * 4096
    with pytest.raises(ValueError, match="llama-7b"):
        get_shape("llama-8b")


def test_step_flops_by_hand():
    s = ShapeSpec("t", hidden=8, layers=2, heads=2, intermediate=16, vocab=10)
    f = step_flops(s, [3, 1], lora_r=1)
    n_frozen = 2 * (4 * 64 + 3 * 128) + 80  # (q,k,v,o 8x8; gate, up, down 8x16) x 2 layers + head
    assert f["tokens"] == 4
    assert f["frozen"] == 4 * n_frozen * 4
    # causal pairs: 3*4/2 + 1*2/2 = 7; per pair and head: QK^T + PV = 2 x 2 x d forward, x3 with backward
    assert f["attention"] == 7 * 4 * 4 * 2 * 2 * 3
    assert f["lora"] == 6 * 4 * 2 * (4 * 16 + 3 * 24)  # r(d_in + d_out) per linear, 2 layers
    assert f["total"] == f["frozen"] + f["attention"] + f["lora"]
    # packing must not charge cross-document attention
    assert step_flops(s, [2, 2], 1)["attention"] < step_flops(s, [4], 1)["attention"]
    with pytest.raises(ValueError):
        step_flops(s, [0], 1)


def test_peaks_and_mfu():
    assert peak_tflops("NVIDIA H100 80GB HBM3") == 989.4
    assert peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert peak_tflops("NVIDIA L40S") == 362.05 and peak_tflops("NVIDIA L4") == 121.0
    assert peak_tflops("cpu") is None and peak_tflops(None) is None
    assert mfu(494.7e12, 989.4) == pytest.approx(0.5)
    assert mfu(1e12, None) is None


# --- lengths and batching -----------------------------------------------------------------------


def test_pack_bfd_and_padded_microbatches_invariants():
    rng = random.Random(0)
    lengths = [rng.choice([1, 7, 33, 129, 500, 1000, 3000]) for _ in range(300)]
    rows = pack_bfd(lengths, 1024)
    assert sorted(n for r in rows for n in r) == sorted(min(n, 1024) for n in lengths)
    assert all(0 < sum(r) <= 1024 for r in rows)
    assert sum(map(sum, rows)) / (1024 * len(rows)) > 0.95  # BFD packs tightly
    picked = select_rows(rows, 2 * len(rows) + 3, seed=1)
    assert len(picked) == 2 * len(rows) + 3 and all(r in rows for r in picked)
    row = [500, 7, 129, 33, 1, 300]
    batches = padded_microbatches(row, 512)
    assert sorted(i for b in batches for i in b) == list(range(len(row)))
    assert all(len(b) * max(row[i] for i in b) <= 512 for b in batches)
    with pytest.raises(ValueError, match="exceeds"):
        padded_microbatches([600], 512)


def test_read_lengths_file_names_the_bad_line(tmp_path):
    good = tmp_path / "l.txt"
    good.write_text("# doc lengths\n12\n\n300\n")
    assert read_lengths_file(good) == [12, 300]
    (tmp_path / "l.json").write_text("[5, 6]")
    assert read_lengths_file(tmp_path / "l.json") == [5, 6]
    bad = tmp_path / "bad.txt"
    bad.write_text("12\nabc\n")
    with pytest.raises(ValueError, match=r"bad.txt, line 2"):
        read_lengths_file(bad)
    (tmp_path / "neg.json").write_text("[3, 0]")
    with pytest.raises(ValueError, match=r"neg.json, item 1"):
        read_lengths_file(tmp_path / "neg.json")


def test_lengths_come_from_the_data_pipeline_for_any_format(shared_data, tmp_path):
    """Source layouts bench never had its own parser for (Dolly, SuperNI, Baize): the lengths are those
    of the examples `qtulu data build` makes, and a bad row is named by the pipeline (file:line)."""
    from qtulu.data.build import build_dataset
    from qtulu.recipes import recipe_from_dict
    from qtulu.model.tiny import build_char_tokenizer

    samples = shared_data("sources", "release_samples")
    recipe = recipe_from_dict({
        "name": "bench-formats",
        "sources": [{"name": "dolly", "format": "dolly", "path": str(samples / "dolly_sample.jsonl")},
                    {"name": "superni", "format": "superni", "count": 30,
                     "path": str(samples / "superni_task1149_item_check_edible.json")},
                    {"name": "baize", "format": "baize", "path": str(samples / "baize_quora_sample.json")}],
        "data": {"max_seq_len": 1024},
    })
    tok = build_char_tokenizer()
    lengths = token_lengths(recipe, tokenizer=tok, seed=3)
    built = build_dataset(recipe, tok, progress=False)
    assert sorted(lengths) == sorted(n for row in built.dataset["seq_lens"] for n in row)
    assert len(lengths) == built.manifest["examples"] > 30 and max(lengths) <= 1024
    assert token_lengths(recipe, tokenizer=tok, seed=3, max_docs=5) == lengths[:5]  # the head of one seeded order

    (tmp_path / "bad.jsonl").write_text('{"instruction": "a", "context": "", "response": "b"}\n{"prompt": 1}\n')
    bad = recipe_from_dict({"name": "bad", "sources": [{"name": "d", "format": "dolly", "path": str(tmp_path / "bad.jsonl")}]})
    with pytest.raises(Exception, match=r"bad.jsonl:2"):
        token_lengths(bad, tokenizer=tok)


def test_real_lengths_under_the_llama_tokenizer(shared_data, llama_tokenizer_path):
    shared_data("sources")
    lengths = token_lengths(seq_len=2048)  # the default recipe: every source of ../shared/data/sources
    assert len(lengths) > 3000
    assert min(lengths) >= 5 and max(lengths) == 2048  # long LIMA/ShareGPT conversations fill a row
    assert sorted(lengths)[len(lengths) // 2] < 400  # Self-Instruct and Code-Alpaca: short ones


# --- the 4-bit build ----------------------------------------------------------------------------


@pytest.mark.parametrize("stack", ["qtulu", "baseline"])
def test_build_quantizes_layer_by_layer(stack, monkeypatch):
    """No more than one decoder weight is ever alive in bf16, and none is left in the model."""
    import bitsandbytes as bnb

    from qtulu.model.quant import Linear4bit

    alive: list[int] = [0]
    most: list[int] = [0]
    real = bench_build._random_weight

    def tracked(*args, **kwargs):
        w = real(*args, **kwargs)
        alive[0] += 1
        most[0] = max(most[0], alive[0])
        weakref.finalize(w, lambda: alive.__setitem__(0, alive[0] - 1))
        return w

    monkeypatch.setattr(bench_build, "_random_weight", tracked)
    shape = ShapeSpec("t", hidden=64, layers=3, heads=4, kv_heads=2, intermediate=96, vocab=128)
    if stack == "qtulu":
        model = bench_build.build_qtulu_model(shape, device="cpu", dtype=torch.bfloat16, attn_implementation="sdpa", progress=False)
        cls = Linear4bit
    else:
        model = bench_build.build_bnb_model(shape, device="cpu", dtype=torch.bfloat16, progress=False)
        cls = bnb.nn.Linear4bit
    assert most[0] == 1 and alive[0] == 0  # one bf16 weight at a time, none left over
    quantized = [n for n, m in model.named_modules() if isinstance(m, cls)]
    assert len(quantized) == shape.layers * 7
    for m in model.model.layers.modules():
        if isinstance(m, torch.nn.Linear):
            assert isinstance(m, cls) and m.weight.dtype == torch.uint8
    assert not any(t.is_meta for t in list(model.parameters()) + list(model.buffers()))
    # nothing float of size left in the decoder: norms and the small NF4 scale tables only
    tensors = list(model.model.layers.parameters()) + list(model.model.layers.buffers())
    float_bytes = sum(t.numel() * t.element_size() for t in tensors if t.is_floating_point())
    assert float_bytes < 0.05 * 2 * shape.layers * shape.layer_linear_params()
    assert model.model.rotary_emb.inv_freq.dtype == torch.float32
    ids = torch.randint(3, 128, (1, 9))
    assert torch.isfinite(model(input_ids=ids).logits).all()


# --- one tiny end-to-end run ----------------------------------------------------------------------


def test_cli_parses_bench_e2e():
    import argparse

    from qtulu.bench import cli as bench_cli

    parser = argparse.ArgumentParser()
    bench_cli.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["bench", "e2e", "--shape", "llama-7b", "llama-65b", "--seq-len", "4096", "--configs", "qtulu,baseline"])
    assert args.shape == ["llama-7b", "llama-65b"] and args.seq_len == 4096 and args.configs == ["qtulu", "baseline"]
    with pytest.raises(SystemExit):
        parser.parse_args(["bench", "e2e", "--configs", "qtulu,nope"])


def test_e2e_tiny_all_configs(tmp_path, bench_server):
    from qtulu.bench.cli import emit
    from qtulu.bench.e2e import CONFIGS, default_data_dir, run_e2e

    # real lengths where ../shared/data is present (a few examples per source, through the pipeline);
    # the code path runs without it too
    if (default_data_dir() / "sources").exists():
        names = ("code_alpaca_2k", "lima", "sharegpt_sample", "self_instruct_seed", "self_instruct_user")
        data = {"max_docs": 200, "overrides": [f"sources.{n}.count=40" for n in names]}
    else:
        (tmp_path / "lengths.txt").write_text("40\n17\n64\n90\n5\n33\n")
        data = {"lengths_file": str(tmp_path / "lengths.txt")}
    docs = tmp_path / "docs" / "benchmarks.md"
    summary = run_e2e(
        ["tiny"], seq_len=64, steps=2, warmup=0, device="cpu", threads=1, **data,
        out_dir=tmp_path / "out", record=True, docs_path=docs, server=bench_server, log=lambda *a, **k: None,
    )
    # a configuration that fails is a result of its own, and the server goes on
    spec = json.loads(next((tmp_path / "out" / "configs").glob("*baseline.spec.json")).read_text())
    failed = bench_server.run({**spec, "stack": "nope"}, tmp_path)
    assert failed["status"] == "error" and "unknown stack 'nope'" in failed["error"]
    assert bench_server.run({**spec, "name": "again"}, tmp_path)["status"] == "ok"
    out = io.StringIO()
    rc = emit(summary, out)
    lines = out.getvalue().strip().splitlines()
    final = json.loads(lines[-1])
    assert rc == 0, lines[-1]
    assert final["device"] == "cpu" and final["seq_len"] == 64 and final["steps"] == 2
    results = {r["name"]: r for r in final["results"]}
    assert set(results) == set(CONFIGS)
    for r in results.values():
        assert r["status"] == "ok", r
        assert r["steps"] == 2 and r["tokens"] == sum(final["lengths"]["tokens_per_timed_step"])
        assert r["tokens_per_s"] > 0 and r["peak_mem_gb"] > 0 and r["mfu"] is None  # no CPU peak
        assert r["mem_kind"] == "cpu peak RSS growth"
        # what peft made trainable is what the FLOP count charges for LoRA
        assert r["trainable_params"] == get_shape("tiny").lora_params(64)
    assert results["baseline"]["speedup"] == 1.0
    assert results["qtulu"]["padding_frac"] == 0.0 and 0 <= results["baseline"]["padding_frac"] < 1
    # same shape, same weights, same tokens: every stack computes the same losses (fp32 on CPU),
    # so the table compares equal work
    ref = results["baseline"]["losses"]
    for r in results.values():
        assert r["losses"] == pytest.approx(ref, rel=2e-3)
    assert (tmp_path / "out" / "results.json").exists()
    png = (tmp_path / "out" / "bench_e2e.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    text = docs.read_text()
    assert "## End-to-end QLoRA training" in text and "| tiny | baseline |" in text and "no speed claim" in text
    assert list((tmp_path / "docs" / "img").glob("bench_e2e_*.png"))


def test_make_optimizer_steps_lora_params():
    from qtulu.bench.build import make_optimizer

    for name in ("adamw", "adamw_8bit"):
        p = torch.nn.Parameter(torch.zeros(64, 80, dtype=torch.bfloat16))  # >= 4096: 8-bit state
        opt = make_optimizer([p], name, lr=1e-2)
        p.grad = torch.ones_like(p)
        opt.step()
        assert (p < 0).all(), name  # moved against the gradient
    with pytest.raises(ValueError, match="adamw_8bit"):
        make_optimizer([p], "sgd")
