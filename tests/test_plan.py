"""qtulu.plan: the planner against the CPU allocator, its model skeletons, its CUDA emulation, the CLI.

The planner runs the real step on fake tensors and counts storages; `qtulu.plan.measure` runs the
same step on real tensors under ``torch.profiler`` (``profile_memory=True``: the CPU allocator's own
allocation and free events). Both must agree within 10% (they agree within 1% today), so a change
to the model code, the loss, LoRA or the optimizer that the planner misses fails here.
"""

from __future__ import annotations

import json

import pytest
import torch

from qtulu.plan import PlanSettings, estimate_peak, optimize, plan_step, resolve_config
from qtulu.plan.measure import measure_step

CPU = dict(shape="tiny", device="cpu", compute_dtype="float32", optimizer="adamw_torch", lora_r=8)


@pytest.mark.parametrize("changes", [
    # recipe defaults on a CPU: peft dropout, checkpointing, two micro-batches; TRL's loss tiles narrowed
    # so that the activations, not one loss tile, make the peak
    dict(seq_len=256, loss_chunk_size=128),
    # every switch that runs on a CPU: dropout mask regenerated, host master weights, no checkpointing
    dict(seq_len=256, lora_dropout_impl="recompute", master_weights="host", gradient_checkpointing=False,
         loss_chunk_size=512),
], ids=["defaults", "switches"])
def test_planned_peak_matches_the_cpu_allocator(changes):
    s = PlanSettings(**CPU, **changes)
    measured = measure_step(s)
    planned = plan_step(s)
    assert measured.events > 100 and measured.step_peak_bytes > 0
    assert planned.peak_bytes == pytest.approx(measured.peak_bytes, rel=0.10), (planned.breakdown, measured)


def test_nf4_skeleton_matches_quantize_model():
    """The meta-device NF4 layers have the tensors quantize_model_ gives a real model."""
    from transformers import AutoModelForCausalLM

    from qtulu.plan.models import nf4_layers_, quant_state_tensors
    from qtulu.quant import Linear4bit

    cfg = resolve_config("tiny")
    real = AutoModelForCausalLM.from_config(cfg)
    nf4_layers_(real, blocksize=64, double_quant=True, compute_dtype=torch.bfloat16)
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(cfg)
    nf4_layers_(meta, blocksize=64, double_quant=True, compute_dtype=torch.bfloat16)

    def sig(model):
        named = list(model.named_parameters()) + list(model.named_buffers())
        out = {n: (tuple(t.shape), t.dtype) for n, t in named}
        out["#4bit"] = sum(isinstance(m, Linear4bit) for m in model.modules())
        out["#state"] = [(tuple(t.shape), t.dtype) for t in quant_state_tensors(model)]
        return out

    assert sig(meta) == sig(real)


@pytest.mark.parametrize("stack", ["qtulu", "hf"])
def test_depth_extrapolation_equals_the_full_plan(stack):
    cfg = resolve_config("tiny")
    cfg.num_hidden_layers = 5
    s = PlanSettings(shape="tiny", seq_len=128, lora_r=8, loss_chunk_size=256)
    if stack == "hf":
        s = s.hf_baseline()
    assert estimate_peak(s, cfg, stack=stack) == plan_step(s, config=cfg, stack=stack).peak_bytes


def test_cuda_plan_has_no_dequantized_weight_and_bnb_does():
    s = PlanSettings(shape="tiny", seq_len=128, lora_r=8, accumulation=1)
    ours = plan_step(s)
    hf = plan_step(s.hf_baseline(), stack="hf")
    assert ours.dequantized_weight_copies == []
    # the same model planned for this machine's CPU: the torch backend dequantizes inside the op
    cpu = plan_step(s.replace(device="cpu", compute_dtype="float32", optimizer="adamw_torch"))
    assert any(t["op"] == "qtulu::nf4_matmul (workspace)" for t in cpu.largest_transients)
    assert hf.dequantized_weight_copies, "bitsandbytes' backward dequantizes each weight"
    assert hf.dequantized_weight_copies[0]["op"] == "bitsandbytes::dequantize_4bit"
    # bf16 base on the GPU: the weights are NF4 codes (half a byte each) + the bf16 embedding and head
    assert ours.breakdown["weights"] < hf.breakdown["weights"]  # peft upcasts the non-4-bit weights to fp32


def test_offload_moves_the_checkpointed_inputs_to_the_host():
    cfg = resolve_config("tiny")
    s = PlanSettings(shape="tiny", seq_len=8192, lora_r=8, accumulation=1, loss_chunk_size=1024)
    off = plan_step(s.replace(activation_offload=True), config=cfg)
    per_layer = 8192 * cfg.hidden_size * 2  # one bf16 hidden state per checkpointed layer (1 MiB: offloaded)
    assert off.host_bytes == cfg.num_hidden_layers * per_layer


def test_optimize_keeps_only_what_lowers_the_peak():
    cfg = resolve_config("tiny")
    s = PlanSettings(shape="tiny", seq_len=128, lora_r=8, accumulation=1, optimizer="adamw_torch")
    chosen, report = optimize(s, cfg)
    assert report["estimated_peak_bytes"] <= estimate_peak(s, cfg)
    assert chosen.loss_chunk_size == 8192  # TRL's 32768-column tile dominates a tiny model's step
    assert {t["switch"] for t in report["tried"]} >= {"lora_dropout_impl", "loss_chunk_size"}
    assert report["not_applied"][0]["switch"] == "optimizer"  # 8-bit moments: reported, not applied


def test_cli_prints_table_json_and_png(tmp_path, capsys):
    from qtulu.cli import main

    png = tmp_path / "plan.png"
    rc = main(["plan", "--shape", "tiny", "--seq-len", "128", "--rank", "8", "--accumulation", "1",
               "--compare-hf", "--plot", str(png)])
    out = capsys.readouterr().out.strip().splitlines()
    assert rc == 0
    summary = json.loads(out[-1])
    assert summary["peak_bytes"] > 0 and summary["hf_peak_bytes"] > 0
    assert summary["settings"]["lora_r"] == 8 and summary["settings"]["seq_len"] == 128
    assert set(summary["breakdown"]) == {"weights", "quant_state", "lora", "grads", "optimizer", "activations",
                                         "loss", "transient"}
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert any(line.startswith("floor") for line in out)


@pytest.mark.parametrize("argv, needle", [
    (["plan", "--shape", "llama-99b"], "unknown shape"),
    (["plan", "--shape", "tiny", "--seq-len", "0"], "--seq-len"),
    (["plan", "--shape", "tiny", "--optimizer", "sgd_nonsense"], "--optimizer"),
    (["plan", "--shape", "tiny", "--activation-offload", "--no-gradient-checkpointing"], "checkpointing"),
    (["plan"], "--shape"),
])
def test_cli_errors_are_one_line(argv, needle, capsys):
    from qtulu.cli import main

    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0]
