"""FSDP2 on CPU: a 2-process gloo run (torchrun, ``train.fsdp: full_shard``) gives the same per-step
losses and adapter as 1 process with the same global batch (2 packed rows per step), for plain LoRA
(fp32 base) and for QLoRA (NF4 base, whose packed uint8 codes are sharded like any other parameter
while their quant state stays replicated); plus the refusals (FSDP with checkpoints) and the schema."""

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


def test_fsdp_with_checkpoints_is_refused_before_loading(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    recipe = toy_recipe(train={"fsdp": "full_shard", "save_steps": 5})
    with pytest.raises(TrainError, match=r"save_steps=5.*save_steps=0.*DDP"):
        train(recipe, output_dir=tmp_path / "run", model=object(), progress=False)
    # `accelerate launch --use_fsdp` (no recipe key): FSDP1 (accelerate's default version) is refused,
    # FSDP2 with checkpoints too
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.delenv("FSDP_VERSION", raising=False)
    with pytest.raises(TrainError, match=r"FSDP version 1.*--fsdp_version 2"):
        train(toy_recipe(train={"save_steps": 0}), output_dir=tmp_path / "run", model=object(), progress=False)
    monkeypatch.setenv("FSDP_VERSION", "2")
    with pytest.raises(TrainError, match=r"accelerate launch --use_fsdp with train.save_steps=5"):
        train(toy_recipe(train={"save_steps": 5}), output_dir=tmp_path / "run", model=object(), progress=False)
    monkeypatch.setenv("WORLD_SIZE", "1")  # one process: nothing to shard, nothing refused
    check_fsdp(toy_recipe(train={"fsdp": "full_shard", "save_steps": 5}).train, 1)


def test_fsdp_settings_and_schema():
    t = toy_recipe(train={"fsdp": "full_shard"}).train
    assert fsdp_settings(t, 2) == (True, {"version": 2, "reshard_after_forward": True})
    assert fsdp_settings(toy_recipe(train={"fsdp": "shard_grad_op"}).train, 4)[1]["reshard_after_forward"] is False
    assert fsdp_settings(t, 1) == (False, None)  # one process: nothing to shard
    assert fsdp_settings(toy_recipe().train, 2) == (False, None)  # default: DDP
    with pytest.raises(RecipeError, match="fsdp"):
        toy_recipe(train={"fsdp": "hybrid_shard"})
