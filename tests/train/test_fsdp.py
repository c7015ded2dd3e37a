"""FSDP2 on CPU: a 2-process gloo run (torchrun, ``train.fsdp: full_shard``) gives the same per-step
losses and adapter as 1 process with the same global batch (2 packed rows per step), for plain LoRA
(fp32 base) and for QLoRA (NF4 base, whose packed uint8 codes are sharded like any other parameter
while their quant state stays replicated); FSDP2 checkpoints (torch.distributed.checkpoint) that
resume exactly and reshard; plus the refusal (FSDP1) and the schema."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from qtulu.recipes import RecipeError
from qtulu.demo.synthetic import toy_recipe
from qtulu.train.run import TrainError, check_fsdp, fsdp_settings, train

STEPS = 3
KINDS = ("lora", "qlora")

# One process trains both kinds in turn (one interpreter start and one process group for both).
_SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    import torch
    torch.set_num_threads(1)
    from qtulu.model.quant import Linear4bit
    from qtulu.demo.synthetic import packed_toy_dataset, toy_recipe
    from qtulu.model.tiny import build_char_tokenizer, build_tiny_llama
    from qtulu.train.run import train

    out, micro, fsdp = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    for kind in {kinds!r}:
        recipe = toy_recipe(
            train={{"max_steps": {steps}, "micro_batch_size": micro, "gradient_accumulation_steps": 1,
                    "learning_rate": 5e-3, "fsdp": None if fsdp == "none" else fsdp,
                    # the QLoRA run also covers activation checkpointing under FSDP
                    "gradient_checkpointing": kind == "qlora"}},
            model={{"quantize": "nf4" if kind == "qlora" else None}},
        )
        res = train(recipe, output_dir=os.path.join(out, kind), model=build_tiny_llama(0),
                    tokenizer=build_char_tokenizer(), data=packed_toy_dataset(12, 3, seed=5), resume="never",
                    progress=False)
        from torch.distributed.fsdp import FSDPModule
        from torch.distributed.tensor import DTensor
        nf4 = [m.weight for m in res.model.modules() if isinstance(m, Linear4bit)]
        record = {{
            "losses": res.losses,
            "world_size": int(os.environ.get("WORLD_SIZE", "1")),
            "fsdp_units": sum(isinstance(m, FSDPModule) for m in res.model.modules()),
            "nf4_layers": len(nf4),
            # every packed NF4 weight is a DTensor whose local shard is smaller than the whole
            "nf4_sharded": sum(isinstance(w, DTensor) and w.to_local().numel() < w.numel() for w in nf4),
        }}
        with open(os.path.join(out, kind, f"record-{{os.environ.get('RANK', '0')}}.json"), "w") as f:
            json.dump(record, f)
    """
)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, launch):
    tmp = tmp_path_factory.mktemp("fsdp")
    script = tmp / "fsdp_train.py"
    script.write_text(_SCRIPT.format(steps=STEPS, kinds=KINDS))
    launch.python(script, tmp / "one", "2", "none")
    launch.torchrun(script, tmp / "two", "1", "full_shard")
    return tmp


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_two_process_gloo_fsdp_matches_one_process(runs, kind):
    one = json.loads((runs / "one" / kind / "record-0.json").read_text())
    two = [json.loads((runs / "two" / kind / f"record-{r}.json").read_text()) for r in (0, 1)]
    assert one["world_size"] == 1 and one["fsdp_units"] == 0
    for rec in two:
        assert rec["world_size"] == 2
        assert rec["fsdp_units"] >= 3, rec  # decoder layers, embedding, head/norm, root: really sharded
        assert rec["losses"] == two[0]["losses"]
        if kind == "qlora":
            assert rec["nf4_layers"] > 0 and rec["nf4_sharded"] == rec["nf4_layers"], rec
    assert len(one["losses"]) == len(two[0]["losses"]) == STEPS
    for a, b in zip(one["losses"], two[0]["losses"]):
        assert abs(a - b) <= 1e-5 * max(1.0, abs(a)), (one["losses"], two[0]["losses"])
    wa = load_file(str(Path(runs / "one" / kind / "adapter" / "adapter_model.safetensors")))
    wb = load_file(str(Path(runs / "two" / kind / "adapter" / "adapter_model.safetensors")))
    assert sorted(wa) == sorted(wb) and wa
    for k in wa:
        assert wa[k].shape == wb[k].shape, k  # full tensors were gathered, not one rank's shard
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-5, msg=k)
    meta = json.loads((runs / "two" / kind / "adapter" / "qtulu.json").read_text())
    assert meta["extra"]["train"]["world_size"] == 2


def test_fsdp1_is_refused_before_loading(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    # `accelerate launch --use_fsdp` (no recipe key): FSDP1 (accelerate's default version) is refused
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.delenv("FSDP_VERSION", raising=False)
    with pytest.raises(TrainError, match=r"FSDP version 1.*--fsdp_version 2"):
        train(toy_recipe(train={"save_steps": 5}), output_dir=tmp_path / "run", model=object(), progress=False)
    # FSDP2, with checkpoints: accepted (they are written with torch.distributed.checkpoint)
    monkeypatch.setenv("FSDP_VERSION", "2")
    check_fsdp(toy_recipe(train={"save_steps": 5}).train, 2)
    check_fsdp(toy_recipe(train={"fsdp": "full_shard", "save_steps": 5}).train, 2)
    # keeping the best checkpoint's weights (loaded back after training) is refused under FSDP
    import dataclasses

    # (the recipe would also need data.validation: only the train section matters here)
    keep_best = dataclasses.replace(toy_recipe(train={"fsdp": "full_shard", "save_steps": 2}).train,
                                    keep_best_checkpoint=True)
    with pytest.raises(TrainError, match=r"train.fsdp=full_shard with train.keep_best_checkpoint: not supported under FSDP"):
        check_fsdp(keep_best, 2)
    monkeypatch.setenv("WORLD_SIZE", "1")  # one process: nothing to shard, nothing refused
    check_fsdp(toy_recipe(train={"fsdp": "full_shard", "save_steps": 5}).train, 1)
    check_fsdp(keep_best, 1)


def test_fsdp_settings_and_schema():
    t = toy_recipe(train={"fsdp": "full_shard"}).train
    assert fsdp_settings(t, 2) == (True, {"version": 2, "reshard_after_forward": True})
    assert fsdp_settings(toy_recipe(train={"fsdp": "shard_grad_op"}).train, 4)[1]["reshard_after_forward"] is False
    assert fsdp_settings(t, 1) == (False, None)  # one process: nothing to shard
    assert fsdp_settings(toy_recipe().train, 2) == (False, None)  # default: DDP
    with pytest.raises(RecipeError, match="fsdp"):
        toy_recipe(train={"fsdp": "hybrid_shard"})


# FSDP2 checkpoints: one process per mode, run under torchrun. "full" trains 4 steps uninterrupted;
# "kill" stops every rank hard (os._exit, no clean-up) once checkpoint-2 is committed; "resume" picks it
# up (optionally at another world size, forced). Every rank dumps the whole LoRA tensors and AdamW
# states it holds at the stop (kill) and right after the load (resume: on_train_begin follows HF's load).
_RESUME_SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    import torch
    torch.set_num_threads(1)
    from safetensors.torch import save_file
    from transformers import TrainerCallback
    from torch.distributed.tensor import DTensor
    from qtulu.demo.synthetic import packed_toy_dataset, toy_recipe
    from qtulu.model.tiny import build_char_tokenizer, build_tiny_llama
    from qtulu.train.run import train

    out, mode, force = sys.argv[1], sys.argv[2], sys.argv[3] == "force"
    rank = os.environ.get("RANK", "0")

    def whole(t):
        return t.full_tensor() if isinstance(t, DTensor) else t

    def dump(model, optimizer, path):  # collective: every rank gathers, rank 0 writes
        opt = getattr(optimizer, "optimizer", optimizer)
        out = {{}}
        for n, p in model.named_parameters():
            if p.requires_grad:
                out[n] = whole(p.detach()).clone()
                for k, v in opt.state.get(p, {{}}).items():
                    out[n + "/" + k] = whole(v).clone().reshape(-1)
        if rank == "0":
            save_file(out, path)

    class Probe(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, optimizer=None, **kw):
            if mode == "resume":
                dump(model, optimizer, os.path.join(out, "loaded.safetensors"))

        def on_step_begin(self, args, state, control, model=None, optimizer=None, **kw):
            if mode == "kill" and state.global_step == 2:
                dump(model, optimizer, os.path.join(out, "saved.safetensors"))
                os._exit(0)  # as a kill: no clean-up, no adapter

    recipe = toy_recipe(
        train={{"max_steps": {steps}, "save_steps": 2, "micro_batch_size": 1, "gradient_accumulation_steps": 1,
               "learning_rate": 5e-3, "fsdp": "{fsdp}"}},
        model={{"quantize": "nf4"}},
    )
    res = train(recipe, output_dir=out, model=build_tiny_llama(0), tokenizer=build_char_tokenizer(),
                data=packed_toy_dataset(12, 3, seed=5), resume="auto" if mode == "resume" else "never",
                force=force, progress=False, callbacks=[Probe()])
    with open(os.path.join(out, "record-" + rank + ".json"), "w") as f:
        json.dump({{"losses": res.losses, "resumed_from": res.resumed_from}}, f)
    """
)


def _resume_script(tmp, fsdp="full_shard", steps=4):
    script = tmp / f"fsdp_resume_{fsdp}_{steps}.py"
    script.write_text(_RESUME_SCRIPT.format(fsdp=fsdp, steps=steps))
    return script


@pytest.mark.slow
@pytest.mark.parametrize("nproc", [2, 4])
def test_fsdp_run_killed_after_its_first_checkpoint_resumes_exactly(tmp_path, launch, nproc):
    from qtulu.train import checkpoint as ck
    from qtulu.train.distributed import FSDP_MODEL_DIR, FSDP_OPTIM_DIR

    script = _resume_script(tmp_path)
    launch.torchrun(script, tmp_path / "full", "full", "-", nproc=nproc)
    launch.torchrun(script, tmp_path / "cut", "kill", "-", nproc=nproc)
    ckpt = tmp_path / "cut" / "checkpoints" / "checkpoint-2"
    manifest = ck.check_complete(ckpt)  # staged, renamed, every shard listed in the manifest
    assert manifest["fsdp"] is True and manifest["world_size"] == nproc
    for sub in (FSDP_MODEL_DIR, FSDP_OPTIM_DIR):  # one shard file per rank, DCP's metadata
        assert {f"{sub}/__{r}_0.distcp" for r in range(nproc)} | {f"{sub}/.metadata"} <= set(manifest["files"])
    assert not [p for p in ckpt.parent.iterdir() if p.name.startswith(ck.STAGE_PREFIX)]
    assert not (tmp_path / "cut" / "adapter").exists()
    launch.torchrun(script, tmp_path / "cut", "resume", "-", nproc=nproc)

    full = json.loads((tmp_path / "full" / "record-0.json").read_text())
    cut = json.loads((tmp_path / "cut" / "record-0.json").read_text())
    assert cut["resumed_from"] == str(ckpt)
    assert cut["losses"] == full["losses"] and len(full["losses"]) == 4
    saved = load_file(str(tmp_path / "cut" / "saved.safetensors"))
    loaded = load_file(str(tmp_path / "cut" / "loaded.safetensors"))
    assert sorted(saved) == sorted(loaded) and any(k.endswith("/exp_avg_sq") for k in saved)
    for k in saved:  # weights and AdamW states (step included) came back bit for bit
        assert torch.equal(saved[k], loaded[k]), k
    wa = load_file(str(tmp_path / "full" / "adapter" / "adapter_model.safetensors"))
    wb = load_file(str(tmp_path / "cut" / "adapter" / "adapter_model.safetensors"))
    assert sorted(wa) == sorted(wb) and wa
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


@pytest.mark.slow
def test_fsdp_checkpoint_reshards_to_another_world_size_or_is_refused(tmp_path, launch):
    """Written by 2 ranks: 4 ranks refuse it (world size is part of the run identity: the data order
    changes) unless forced, and then load the same tensors (DCP reshards); a single process (no FSDP)
    refuses it in one line even when forced."""
    script = _resume_script(tmp_path, steps=3)
    launch.torchrun(script, tmp_path / "run", "kill", "-")
    with pytest.raises(AssertionError, match=r"written by an FSDP run.*resume it with FSDP"):
        launch.python(script, tmp_path / "run", "resume", "force")
    with pytest.raises(AssertionError, match=r"world_size: 2 -> 4"):
        launch.torchrun(script, tmp_path / "run", "resume", "-", nproc=4)
    launch.torchrun(script, tmp_path / "run", "resume", "force", nproc=4)
    saved = load_file(str(tmp_path / "run" / "saved.safetensors"))
    loaded = load_file(str(tmp_path / "run" / "loaded.safetensors"))
    assert sorted(saved) == sorted(loaded)
    for k in saved:
        assert torch.equal(saved[k], loaded[k]), k
    assert json.loads((tmp_path / "run" / "record-0.json").read_text())["resumed_from"].endswith("checkpoint-2")


def _readme_fsdp_commands() -> list[str]:
    """The FSDP2 launch lines of the README's multi-GPU section, as written there."""
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    lines = [ln.strip() for ln in readme.splitlines()]
    return [ln for ln in lines if ln.startswith(("torchrun ", "accelerate launch ")) and "fsdp" in ln]


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["torchrun", "accelerate"])
def test_readme_fsdp_commands_run_as_written(tmp_path, launcher):
    """The README's command, in a subprocess, with its recipe (`dolly`) swapped for the demo recipe on a
    tiny saved base: it trains under FSDP2, writes sharded checkpoints and the adapter."""
    import os
    import shlex
    import socket
    import subprocess

    from qtulu.demo.synthetic import make_examples, write_jsonl
    from qtulu.model.tiny import build_char_tokenizer, build_tiny_llama, save_base
    from qtulu.recipes import REPO_RECIPES_DIR
    from qtulu.train import checkpoint as ck
    from qtulu.train.distributed import FSDP_MODEL_DIR

    (cmd,) = [c for c in _readme_fsdp_commands() if c.startswith(launcher)]
    save_base(build_tiny_llama(0), build_char_tokenizer(), tmp_path / "base")
    write_jsonl(make_examples("upper", 24, split="train", seed=0), tmp_path / "upper.jsonl")
    argv = shlex.split(cmd)
    argv[argv.index("dolly")] = str(REPO_RECIPES_DIR / "demo.yaml")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    at = 1 if launcher == "torchrun" else 2  # after `torchrun` / `accelerate launch`: a free port
    argv[at:at] = ["--master_port", port] if launcher == "torchrun" else ["--main_process_port", port]
    argv += ["--set", f"model.base={tmp_path / 'base'}", "--set", f"sources.skill.path={tmp_path / 'upper.jsonl'}",
             "--set", "train.max_steps=2", "--set", "train.save_steps=1", "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    out = tmp_path / "runs" / "dolly"
    for step in (1, 2):
        manifest = ck.check_complete(out / "checkpoints" / f"checkpoint-{step}")
        assert manifest["fsdp"] is True and manifest["world_size"] == 2, manifest
        assert f"{FSDP_MODEL_DIR}/__1_0.distcp" in manifest["files"]
    meta = json.loads((out / "adapter" / "qtulu.json").read_text())
    assert meta["extra"]["train"]["world_size"] == 2 and meta["extra"]["train"]["global_step"] == 2


def test_rank_local_optimizer_states_are_kept_per_rank_and_pinned_to_the_world_size(tmp_path, monkeypatch):
    """An optimizer state that is a plain tensor beside a sharded parameter (an 8-bit optimizer's block
    scales) is saved under its rank's own key (DCP would keep rank 0's copy for every rank), and loading
    it on another number of ranks is refused in one line; DTensor states and step counts are shared."""
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    from qtulu.train.checkpoint import CheckpointError
    from qtulu.train.distributed import FSDP_OPTIM_DIR, load_fsdp_optimizer, save_fsdp_optimizer

    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        model = fully_shard(torch.nn.Sequential(torch.nn.Linear(4, 4)))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        model(torch.randn(2, 4)).sum().backward()
        opt.step()
        w = model[0].weight
        opt.state[w]["scales"] = torch.arange(3.0)  # rank-local, as bitsandbytes' absmax of a shard
        save_fsdp_optimizer(model, opt, tmp_path)
        import torch.distributed.checkpoint as dcp

        keys = set(dcp.FileSystemReader(str(tmp_path / FSDP_OPTIM_DIR)).read_metadata().state_dict_metadata)
        assert {"0.weight/exp_avg", "0.weight/step", "0.weight/scales@rank0"} <= keys, keys
        saved = {k: v.full_tensor().clone() if hasattr(v, "full_tensor") else v.clone()
                 for k, v in opt.state[w].items()}
        for v in opt.state[w].values():
            v.zero_() if v.dim() else v.fill_(0)
        load_fsdp_optimizer(model, opt, tmp_path)  # same world size: every state back
        for k, v in opt.state[w].items():
            assert torch.equal(v.full_tensor() if hasattr(v, "full_tensor") else v, saved[k]), k
        monkeypatch.setenv("WORLD_SIZE", "2")
        with pytest.raises(CheckpointError, match=r"written by 1 ranks.*resumes on 1 ranks only, not 2"):
            load_fsdp_optimizer(model, opt, tmp_path)
    finally:
        dist.destroy_process_group()


def test_dcp_metadata_is_read_without_arbitrary_unpickling(tmp_path):
    """DCP keeps its checkpoint metadata as a pickle; qtulu reads it with an allow-list: a real
    checkpoint loads back exactly, a planted `.metadata` that would run code is refused, one line."""
    import os
    import pickle
    import warnings

    import torch
    import torch.distributed.checkpoint as dcp

    from qtulu.train.checkpoint import CheckpointError
    from qtulu.train.distributed import _safe_reader

    state = {"a.lora_A.weight": torch.randn(3, 5), "b": torch.arange(4, dtype=torch.int64)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no process group: DCP says so and saves as one rank
        dcp.save(state, checkpoint_id=str(tmp_path / "ok"))
        back = {k: torch.zeros_like(v) for k, v in state.items()}
        dcp.load(back, storage_reader=_safe_reader(tmp_path / "ok"))
    assert all(torch.equal(back[k], state[k]) for k in state)

    class Boom:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / ".metadata").write_bytes(pickle.dumps(Boom()))
    with pytest.raises(CheckpointError, match=r"refers to (posix|os)\.system"):
        _safe_reader(tmp_path / "bad").read_metadata()
    assert not (tmp_path / "pwned").exists()
