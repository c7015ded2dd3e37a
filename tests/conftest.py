"""Shared test setup.

Triton kernels are tested on the CPU through the interpreter: TRITON_INTERPRET must be set
before triton is first imported, so it is set here, at collection time, unless a GPU is present.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("QTULU_SHARED_DATA", REPO.parent / "shared" / "data"))


def shared_path(*parts: str) -> Path:
    """Path under ../shared/data, or skip the test naming what is missing."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"real data not found: {path} (../shared/data is absent on this machine)")
    return path


@pytest.fixture
def shared_data():
    return shared_path


@pytest.fixture
def llama_tokenizer_path() -> Path:
    return shared_path("tokenizers", "llama", "tokenizer.model")


@pytest.fixture
def char_tokenizer():
    from qtulu.tiny import build_char_tokenizer

    return build_char_tokenizer()


class _Launcher:
    """Run a training script in one process, or in several under torchrun (gloo on the CPU)."""

    env = {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "CUDA_VISIBLE_DEVICES": ""}

    def _run(self, cmd: list[str]) -> None:
        import subprocess

        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **self.env}, timeout=600)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]

    def python(self, script, *args: str) -> None:
        import sys

        self._run([sys.executable, str(script), *map(str, args)])

    def torchrun(self, script, *args: str, nproc: int = 2) -> None:
        import socket
        import sys

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self._run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                   "--master_addr", "127.0.0.1", "--master_port", str(port), str(script), *map(str, args)])


@pytest.fixture(scope="session")
def launch() -> _Launcher:
    return _Launcher()
