"""qtulu.files: what qtulu writes to be shared follows the user's umask (issue 28).

safetensors (>= 0.6) writes its file through a private temp file and leaves it 0600, so adapters and
exported models were unreadable by another account while the JSON beside them was 0644. Tested from
the outside: real `qtulu merge` / `qtulu merge --full` runs in a process started under each umask,
then every file they (and the library writers before them) wrote is stat'ed.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent("""
    import sys
    from pathlib import Path

    import torch
    from peft import LoraConfig, get_peft_model

    from qtulu.adapters.store import save_adapter
    from qtulu.cli import main
    from qtulu.model.load import base_info, load_base
    from qtulu.model.tiny import build_char_tokenizer, build_tiny_llama, save_base

    root = Path(sys.argv[1])
    save_base(build_tiny_llama(seed=0, dtype=torch.float32), build_char_tokenizer(), root / "base")
    model, _ = load_base(str(root / "base"), compute_dtype=torch.float32, device="cpu", attn_implementation="sdpa")
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", exclude_modules=["lm_head"],
                     lora_dropout=0.0, init_lora_weights=False)
    pm = get_peft_model(model, cfg, adapter_name="first")
    pm.add_adapter("second", cfg)
    for n in ("first", "second"):
        save_adapter(pm, root / n, adapter_name=n, base_info=base_info(pm))
    base, a, b = str(root / "base"), str(root / "first"), str(root / "second")
    assert main(["merge", "--model", base, "--adapter", a, "--adapter", b, "--out", str(root / "merged")]) == 0
    assert main(["merge", "--model", base, "--adapter", a, "--full", "--dtype", "float32",
                 "--out", str(root / "release")]) == 0
""")


def _modes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): stat.S_IMODE(p.stat().st_mode) for p in [root, *root.rglob("*")]}


@pytest.mark.parametrize("umask", [0o022, 0o077], ids=["umask022", "umask077"])
def test_adapters_and_exports_follow_the_umask(tmp_path, umask):
    root = tmp_path / "w"
    root.mkdir()
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "XDG_STATE_HOME": str(tmp_path / "state")}
    proc = subprocess.run(["sh", "-c", f'umask {umask:03o} && exec "$0" -c "$1" "$2"', sys.executable, SCRIPT,
                           str(root)], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    modes = _modes(root)
    weights = [n for n in modes if n.endswith(".safetensors")]
    # the base, both adapters, the merged adapter and the release: each has its weights
    assert {n.split("/")[0] for n in weights} == {"base", "first", "second", "merged", "release"}, weights
    want_file, want_dir = 0o666 & ~umask, 0o777 & ~umask
    wrong = {n: oct(m) for n, m in modes.items()
             if m != (want_dir if (root / n).is_dir() else want_file) and n != "."}
    assert not wrong, f"umask {umask:03o}: {wrong}"


def test_share_modes_keeps_exec_bits_and_follows_the_mask(tmp_path):
    from qtulu.files import current_umask, share_modes

    old = os.umask(0o027)
    try:
        assert current_umask() == 0o027
        d = tmp_path / "stage"
        (d / "sub").mkdir(parents=True)
        (d / "w.safetensors").write_bytes(b"x")
        os.chmod(d / "w.safetensors", 0o600)  # as safetensors leaves it
        (d / "run.sh").write_text("#!/bin/sh\n")
        os.chmod(d / "run.sh", 0o700)
        os.chmod(d / "sub", 0o700)
        share_modes(d)
    finally:
        os.umask(old)
    assert stat.S_IMODE((d / "w.safetensors").stat().st_mode) == 0o640
    assert stat.S_IMODE((d / "run.sh").stat().st_mode) == 0o750
    assert stat.S_IMODE((d / "sub").stat().st_mode) == 0o750
    assert stat.S_IMODE(d.stat().st_mode) == 0o750
