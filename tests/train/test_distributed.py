"""DDP on CPU: a 2-process gloo run (torchrun) gives the same per-step losses and adapter as 1 process
with the same global batch (2 packed rows per step: 1 row per rank vs 2 rows in one process)."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

STEPS = 3

_SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    import torch
    torch.set_num_threads(1)
    from qtulu.demo.synthetic import packed_toy_dataset, toy_recipe
    from qtulu.model.tiny import build_char_tokenizer, build_tiny_llama
    from qtulu.train.run import train

    out, micro = sys.argv[1], int(sys.argv[2])
    recipe = toy_recipe(train={{"max_steps": {steps}, "micro_batch_size": micro, "gradient_accumulation_steps": 1,
                                "learning_rate": 5e-3}})
    res = train(recipe, output_dir=out, model=build_tiny_llama(0), tokenizer=build_char_tokenizer(),
                data=packed_toy_dataset(12, 3, seed=5), resume="never", progress=False)
    if int(os.environ.get("RANK", "0")) == 0:
        with open(os.path.join(out, "losses.json"), "w") as f:
            json.dump({{"losses": res.losses, "world_size": int(os.environ.get("WORLD_SIZE", "1"))}}, f)
    """
)


@pytest.mark.slow
def test_two_process_gloo_ddp_matches_one_process(tmp_path, launch):
    script = tmp_path / "ddp_train.py"
    script.write_text(_SCRIPT.format(steps=STEPS))
    launch.python(script, tmp_path / "one", "2")
    launch.torchrun(script, tmp_path / "two", "1")

    one = json.loads((tmp_path / "one" / "losses.json").read_text())
    two = json.loads((tmp_path / "two" / "losses.json").read_text())
    assert one["world_size"] == 1 and two["world_size"] == 2
    assert len(one["losses"]) == len(two["losses"]) == STEPS
    for a, b in zip(one["losses"], two["losses"]):
        assert abs(a - b) <= 1e-5 * max(1.0, abs(a)), (one["losses"], two["losses"])
    wa = load_file(str(Path(tmp_path / "one" / "adapter" / "adapter_model.safetensors")))
    wb = load_file(str(Path(tmp_path / "two" / "adapter" / "adapter_model.safetensors")))
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-5, msg=k)


_EVAL_SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    import torch
    torch.set_num_threads(1)
    from qtulu.demo.synthetic import packed_toy_dataset, toy_recipe
    from qtulu.model.tiny import build_char_tokenizer, build_tiny_llama
    from qtulu.recipes import recipe_from_dict
    from qtulu.train.run import train

    out, micro = sys.argv[1], int(sys.argv[2])
    d = toy_recipe(train={"max_steps": 2, "micro_batch_size": micro, "gradient_accumulation_steps": 1,
                          "learning_rate": 5e-3}).to_dict()
    d["data"].update(validation=0.25, max_seq_len=40)
    d["train"]["eval_steps"] = 1
    res = train(recipe_from_dict(d), output_dir=out, model=build_tiny_llama(0), tokenizer=build_char_tokenizer(),
                data=packed_toy_dataset(16, 2, seed=6), resume="never", progress=False)
    if int(os.environ.get("RANK", "0")) == 0:
        with open(os.path.join(out, "evals.json"), "w") as f:
            json.dump({"evals": res.evals, "world_size": int(os.environ.get("WORLD_SIZE", "1"))}, f)
    """
)


@pytest.mark.slow
def test_two_process_validation_loss_matches_one_process(tmp_path, launch):
    """The validation rows are not split across ranks (accelerate would repeat rows to even the ranks out, counting
    their tokens twice): 2 DDP ranks report the same eval_loss and token count as 1 process."""
    from qtulu.demo.synthetic import packed_toy_dataset
    from qtulu.train.validation import split_fraction

    _, val_rows, _ = split_fraction(packed_toy_dataset(16, 2, seed=6), 0.25, 42, 40)
    assert len(val_rows) % 2 == 1  # an odd number of rows: sharding would pad one rank
    script = tmp_path / "ddp_eval.py"
    script.write_text(_EVAL_SCRIPT)
    launch.python(script, tmp_path / "one", "2")
    launch.torchrun(script, tmp_path / "two", "1")
    one = json.loads((tmp_path / "one" / "evals.json").read_text())
    two = json.loads((tmp_path / "two" / "evals.json").read_text())
    assert one["world_size"] == 1 and two["world_size"] == 2
    assert [e["step"] for e in one["evals"]] == [e["step"] for e in two["evals"]] == [1, 2]
    for a, b in zip(one["evals"], two["evals"]):
        assert a["eval_tokens"] == b["eval_tokens"]
        assert abs(a["eval_loss"] - b["eval_loss"]) <= 1e-5 * abs(a["eval_loss"]), (one, two)
