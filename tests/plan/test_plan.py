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


def test_planned_peak_matches_the_cpu_allocator():
    # recipe defaults on a CPU (peft dropout, checkpointing, two micro-batches), with TRL's loss tiles
    # narrowed so that the layers' activations, not one loss tile, make the peak
    s = PlanSettings(**CPU, seq_len=192, loss_chunk_size=128)
    measured = measure_step(s)
    planned = plan_step(s)
    assert measured.events > 100 and measured.step_peak_bytes > 0
    assert planned.peak_bytes == pytest.approx(measured.peak_bytes, rel=0.10), (planned.breakdown, measured)


def test_planned_hf_trl_peak_matches_the_cpu_allocator():
    # the baseline as TRL's SFTTrainer builds it (bf16 adapters, fused LM head, bitsandbytes' CPU backend)
    s = PlanSettings(**CPU, seq_len=192).hf_baseline()
    measured = measure_step(s, stack="hf")
    planned = plan_step(s, stack="hf")
    assert planned.peak_bytes == pytest.approx(measured.peak_bytes, rel=0.10), (planned.breakdown, measured)


def test_nf4_skeleton_matches_quantize_model():
    """The meta-device NF4 layers have the tensors quantize_model_ gives a real model."""
    from transformers import AutoModelForCausalLM

    from qtulu.plan.models import nf4_layers_, quant_state_tensors
    from qtulu.model.quant import Linear4bit

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


def test_depth_extrapolation_equals_the_full_plan():
    cfg = resolve_config("tiny")
    cfg.num_hidden_layers = 4
    s = PlanSettings(shape="tiny", seq_len=128, lora_r=8, accumulation=1).hf_baseline()
    assert estimate_peak(s, cfg, stack="hf") == plan_step(s, config=cfg, stack="hf").peak_bytes


def test_depth_extrapolation_is_per_window(monkeypatch):
    """Where the peak moves between windows of the step with depth (transformers+peft+bnb at 65B: a
    backward window when shallow, the loss window, holding every fp32 layer input, when deep), the
    windows are extrapolated separately: extrapolating the peak itself would be wrong."""
    import types

    import qtulu.plan.search as search

    windows = {2: {"backward#0": 100, "loss#0": 90}, 3: {"backward#0": 105, "loss#0": 100}}
    fake = lambda settings, stack, config: types.SimpleNamespace(  # noqa: E731
        peak_bytes=max(windows[config.num_hidden_layers].values()), paged_bytes=0,
        phase_peaks=windows[config.num_hidden_layers], floor={"weights": 0}, host={})
    monkeypatch.setattr("qtulu.plan.planner.plan_step", fake)
    cfg = resolve_config("tiny")
    cfg.num_hidden_layers = 10
    assert search.estimate_peak(PlanSettings(shape="tiny"), cfg) == 90 + 8 * 10  # not 100 + 8 * 5


def test_offload_moves_the_checkpointed_inputs_to_the_host():
    cfg = resolve_config("tiny")
    s = PlanSettings(shape="tiny", seq_len=8192, lora_r=8, accumulation=1, loss_chunk_size=1024)
    off = plan_step(s.replace(activation_offload=True), config=cfg)
    per_layer = 8192 * cfg.hidden_size * 2  # one bf16 hidden state per checkpointed layer (1 MiB: offloaded)
    assert off.host_bytes == cfg.num_hidden_layers * per_layer


def test_optimize_keeps_only_what_lowers_the_peak(monkeypatch):
    import qtulu.plan.search as search

    # two candidates: one that lowers this tiny model's peak, one that cannot (its layer inputs are
    # below the offload threshold)
    monkeypatch.setattr(search, "REDUCTIONS",
                        {k: search.REDUCTIONS[k] for k in ("loss_chunk_size", "activation_offload")})
    cfg = resolve_config("tiny")
    s = PlanSettings(shape="tiny", seq_len=128, lora_r=8, accumulation=1, optimizer="adamw_torch")
    chosen, report = optimize(s, cfg)
    assert [(t["switch"], t["kept"]) for t in report["tried"]] == [("loss_chunk_size", True),
                                                                   ("activation_offload", False)]
    assert chosen.loss_chunk_size == 8192 and not chosen.activation_offload  # TRL's 32768-column tile dominated
    assert report["estimated_peak_bytes"] == report["tried"][0]["estimated_peak_bytes"]
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
    # no bf16 copy of a 4-bit weight in qtulu's CUDA step; bitsandbytes' backward makes one per layer
    assert summary["dequantized_weight_copies"] == 0 and summary["hf_dequantized_weight_copies"] > 0
    # HF as TRL 1.16's SFTTrainer sets it up: no prepare_model_for_kbit_training (embedding, head and norms
    # stay bf16, as qtulu's), bf16 adapters by TRL's cast, and the fp32-adapter variant beside it
    import trl

    assert summary["breakdown"]["weights"] == summary["hf_breakdown"]["weights"]
    # twice the bytes, give or take the CUDA allocator's 512-byte blocks
    assert summary["hf_float32_adapters_breakdown"]["lora"] == pytest.approx(2 * summary["hf_breakdown"]["lora"], rel=0.1)
    assert f"TRL {trl.__version__}" in summary["hf_setup"] and "prepare_model_for_kbit_training" in summary["hf_setup"]
    assert any(d.startswith("LoRA weights: fp32") for d in summary["hf_differences"])
    assert any(d.startswith("4-bit matmul") for d in summary["hf_differences"])
    assert "peak_over_hf_float32_adapters" in summary


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


@pytest.mark.parametrize("device", ["cuda", "cpu"])
def test_no_configuration_lands_under_its_floor(device):
    """The floor is the physical minimum (resident state + summed gradients + checkpointed layer inputs
    + the larger of one layer's recompute set and the loss tile): every switch combination, the
    best included, peaks at or above its own floor."""
    from itertools import product

    from qtulu.plan.planner import floor_total

    cfg = resolve_config("tiny")
    base = dict(shape="tiny", seq_len=512, lora_r=8, device=device)
    if device == "cpu":
        base.update(compute_dtype="float32", optimizer="adamw_torch")
    ratios = {}
    for (impl, chunk), offload, masters, acc in product((("peft", None), ("recompute", 256)), (False, True),
                                                       ("device", "host"), (1, 2)):
        if offload and device == "cpu":
            continue
        s = PlanSettings(**base, lora_dropout_impl=impl, loss_chunk_size=chunk, activation_offload=offload,
                         master_weights=masters, accumulation=acc)
        r = plan_step(s, config=cfg)
        assert r.floor_bytes == floor_total(r.floor)
        assert r.floor["weights"] > 0 and r.floor["recompute_set"] > 0 and r.floor["loss_tile"] > 0
        assert (r.floor["grads"] > 0) == (acc == 2 and masters == "device")
        ratios[(impl, chunk, offload, masters, acc)] = r.peak_bytes / r.floor_bytes
    assert min(ratios.values()) >= 1.0, min(ratios.items(), key=lambda kv: kv[1])


def test_floor_recompute_set_is_measured():
    """One layer's recompute set is what the layer's recomputation leaves alive: peft's dropout keeps
    a dropped copy per adapted linear that the recompute dropout does not."""
    cfg = resolve_config("tiny")
    s = PlanSettings(shape="tiny", seq_len=512, lora_r=8, accumulation=1)
    peft = plan_step(s, config=cfg).floor["recompute_set"]
    ours = plan_step(s.replace(lora_dropout_impl="recompute"), config=cfg).floor["recompute_set"]
    assert peft > ours > 0


def test_hf_baseline_is_trl_s_setup():
    """The transformers baseline is built as TRL's SFTTrainer builds it: fused LM head, bf16 (or fp32)
    trainable LoRA weights, bf16 embedding/head/norms (no k-bit preparation), input grads for checkpointing."""
    from qtulu.plan.models import build_hf

    cfg = resolve_config("tiny")
    for dt, want in (("bfloat16", torch.bfloat16), ("float32", torch.float32)):
        m = build_hf(cfg, PlanSettings(shape="tiny").hf_baseline(dt))
        trainable = [p for p in m.parameters() if p.requires_grad]
        assert trainable and all(p.dtype == want for p in trainable)
        frozen_float = [p for n, p in m.named_parameters() if not p.requires_grad and p.is_floating_point()]
        assert frozen_float and all(p.dtype == torch.bfloat16 for p in frozen_float)
        assert "fused_lm_head" in m.get_base_model().forward.__code__.co_varnames  # TRL's add_fused_lm_head
    with pytest.raises(ValueError):
        PlanSettings(shape="tiny").hf_baseline("float16")


def test_plan_shows_per_layer_progress():
    lines = []
    cfg = resolve_config("tiny")
    plan_step(PlanSettings(shape="tiny", seq_len=64, lora_r=8, accumulation=2), config=cfg, progress=lines.append)
    assert "forward 1/2: layer 2/2" in " ".join(lines) and "backward 2/2: layer 2/2" in " ".join(lines)


def test_offloading_plan_reports_host_bytes_and_cpu_optimizer(capsys):
    """train.master_weights=host: the GPU peak is printed beside the pinned and pageable host bytes and
    the measured CPU optimizer step (ZeRO-Offload); the host bytes follow HostMaster's buffers."""
    from qtulu.cli import main
    from qtulu.plan.host import cpu_optimizer_time

    rc = main(["plan", "--shape", "tiny", "--seq-len", "64", "--rank", "8", "--accumulation", "1",
               "--set", "train.master_weights=host"])
    out = capsys.readouterr().out.strip().splitlines()
    assert rc == 0
    s = json.loads(out[-1])
    h = s["host"]
    n = h["lora_params"]
    assert n > 0 and h["pinned_masters"] == 4 * n and h["pinned_staging"] == 2 * n and h["grad_sums"] == 4 * n
    assert h["optimizer_states"] > 0 and h["pinned_bytes"] == h["pinned_masters"] + h["pinned_staging"]
    assert s["cpu_optimizer"]["optimizer"] == "adamw_8bit" and s["cpu_optimizer"]["params"] == n  # unpaged on the host
    assert any("ZeRO-Offload" in line for line in out) and any("CPU optimizer:" in line for line in out)
    t = cpu_optimizer_time("adamw_torch", 10 ** 9, sample=1 << 12, steps=1)
    assert t["ns_per_param"] > 0 and t["seconds_per_step"] == pytest.approx(t["ns_per_param"], rel=0.02, abs=0.01)


def test_all_on_gpu_plan_prints_no_offload_block(capsys):
    from qtulu.cli import main

    assert main(["plan", "--shape", "tiny", "--seq-len", "64", "--rank", "8", "--accumulation", "1"]) == 0
    out = capsys.readouterr().out
    assert "ZeRO-Offload" not in out and json.loads(out.strip().splitlines()[-1])["cpu_optimizer"] is None


def test_depth_extrapolation_of_floor_and_host_bytes():
    """`estimate` extrapolates the floor's terms and the host bytes as the peak (the docs' 65B and 7B
    figures): equal to the full plan of a 4-layer model, offloading included."""
    from qtulu.plan.search import estimate

    cfg = resolve_config("tiny")
    cfg.num_hidden_layers = 4
    s = PlanSettings(shape="tiny", seq_len=128, lora_r=8, accumulation=2, lora_dropout_impl="recompute",
                     activation_offload=True, master_weights="host")
    full = plan_step(s, config=cfg)
    est = estimate(s, cfg)
    assert est["peak_bytes"] == full.peak_bytes
    assert est["floor"] == full.floor and est["floor_bytes"] == full.floor_bytes
    assert est["host"] == full.host and est["host"]["pinned_masters"] > 0
