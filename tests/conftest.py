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
