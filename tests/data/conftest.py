"""Fixtures of the data tests: the real LLaMA tokenizer (loaded once per process, cached)."""

from __future__ import annotations

import pytest


@pytest.fixture
def llama_tok(llama_tokenizer_path):
    from qtulu.data.tokenizer import load_tokenizer

    return load_tokenizer(llama_tokenizer_path)  # lru-cached: the conversion runs once


@pytest.fixture(scope="session")
def ref():
    """tests/data/open_instruct_ref.py: open-instruct's data code re-implemented (the oracle)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).with_name("open_instruct_ref.py")
    spec = importlib.util.spec_from_file_location("open_instruct_ref", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def slow_llama(ref, llama_tokenizer_path):
    """open-instruct's slow LLaMA tokenizer set-up, emulated on SentencePiece (see open_instruct_ref)."""
    return ref.SlowLlamaTokenizer(llama_tokenizer_path)
