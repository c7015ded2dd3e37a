"""Fixtures of the data tests: the real LLaMA tokenizer (loaded once per process, cached)."""

from __future__ import annotations

import pytest


@pytest.fixture
def llama_tok(llama_tokenizer_path):
    from qtulu.data.tokenizer import load_tokenizer

    return load_tokenizer(llama_tokenizer_path)  # lru-cached: the conversion runs once
