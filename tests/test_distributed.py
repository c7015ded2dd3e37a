"""DDP on CPU: a 2-process gloo run (torchrun) gives the same per-step losses and adapter as 1 process
with the same global batch (2 packed rows per step: 1 row per rank vs 2 rows in one process)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
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
    from qtulu.synthetic import packed_toy_dataset, toy_recipe
    from qtulu.tiny import build_char_tokenizer, build_tiny_llama
    from qtulu.train import train

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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(cmd, env):
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]


@pytest.mark.slow
def test_two_process_gloo_ddp_matches_one_process(tmp_path):
    script = tmp_path / "ddp_train.py"
    script.write_text(_SCRIPT.format(steps=STEPS))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "CUDA_VISIBLE_DEVICES": ""}
    _run([sys.executable, str(script), str(tmp_path / "one"), "2"], env)
    _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
          "--master_port", str(_free_port()), str(script), str(tmp_path / "two"), "1"], env)

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
