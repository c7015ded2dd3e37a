"""Load a fast (Rust-backed) tokenizer from a SentencePiece ``.model`` file, a directory or a hub id.

The data pipeline needs a *fast* tokenizer: labels are placed from character offsets
(``return_offsets_mapping``), which only the Rust tokenizers provide.
"""

from __future__ import annotations

import functools
import os
import tempfile
from pathlib import Path


class TokenizerError(ValueError):
    """The tokenizer cannot be loaded or cannot be used by the data pipeline."""


def load_tokenizer(path_or_id: str | os.PathLike, *, revision: str | None = None, trust_remote_code: bool = False):
    """A fast tokenizer from ``path_or_id``.

    - a SentencePiece ``.model`` file (e.g. the LLaMA ``tokenizer.model``): converted to a fast
      `LlamaTokenizer` (BOS ``<s>``, EOS ``</s>``, byte fallback);
    - a directory: ``AutoTokenizer.from_pretrained`` (or the `LlamaTokenizer` conversion when it only
      holds a ``tokenizer.model``);
    - anything else: a hub id for ``AutoTokenizer.from_pretrained`` (``trust_remote_code`` off by default).

    A missing pad token is set to ``<unk>`` (or EOS) so that batched generation works; packing never pads.
    Loads are cached per (path, revision).
    """
    tok = _load_cached(str(path_or_id), revision, trust_remote_code)
    return tok


@functools.lru_cache(maxsize=8)
def _load_cached(spec: str, revision: str | None, trust_remote_code: bool):
    from transformers import AutoTokenizer, LlamaTokenizer

    p = Path(os.path.expanduser(spec))
    if p.is_file():
        if p.suffix != ".model":
            raise TokenizerError(f"{p}: expected a SentencePiece .model file or a tokenizer directory")
        # LlamaTokenizer.from_pretrained converts a directory's tokenizer.model to a fast tokenizer;
        # give it a directory that holds just this file (symlinked, nothing copied).
        with tempfile.TemporaryDirectory(prefix="qtulu-tok-") as d:
            os.symlink(p.resolve(), Path(d) / "tokenizer.model")
            tok = LlamaTokenizer.from_pretrained(d)
        tok.name_or_path = str(p.resolve())  # not the temporary folder
        _order_merges_by_sentencepiece_score(tok, p)
    elif p.is_dir():
        files = {f.name for f in p.iterdir()}
        if files & {"tokenizer.json", "tokenizer_config.json"}:
            tok = AutoTokenizer.from_pretrained(str(p), trust_remote_code=trust_remote_code)
        elif "tokenizer.model" in files:
            tok = LlamaTokenizer.from_pretrained(str(p))
            _order_merges_by_sentencepiece_score(tok, p / "tokenizer.model")
        else:
            raise TokenizerError(f"{p}: no tokenizer.json, tokenizer_config.json or tokenizer.model in this directory")
    elif spec.startswith((".", "/", "~")) or spec.endswith(".model"):
        raise TokenizerError(f"tokenizer not found: {p}")
    else:
        tok = AutoTokenizer.from_pretrained(spec, revision=revision, trust_remote_code=trust_remote_code)
    check_fast(tok, spec)
    if tok.pad_token is None:
        tok.pad_token = tok.unk_token if tok.unk_token is not None else tok.eos_token
    return tok


def _order_merges_by_sentencepiece_score(tok, model_file: Path) -> None:
    """Re-rank the converted BPE merges by the SentencePiece score of the merged piece.

    SentencePiece BPE applies the merge whose result has the highest score first. The
    transformers 5.x conversion ranks merges by piece id instead, which puts the whitespace pieces
    ("\u2581\u2581", score -1e9) first: "x\n  y" became "\u2581\u2581 y" instead of LLaMA's
    "\u2581 \u2581y", and 40% of the shared sources' examples were tokenized differently from the
    real LLaMA tokenizer. Sorting by score (stable, so equal scores keep their order) makes the
    fast tokenizer agree with SentencePiece (checked in tests/data/test_tokenizer.py).
    """
    import json

    import sentencepiece as spm
    from tokenizers import Tokenizer

    spec = json.loads(tok.backend_tokenizer.to_str())
    model = spec.get("model", {})
    if model.get("type") != "BPE" or not model.get("merges"):
        return
    sp = spm.SentencePieceProcessor(model_file=str(model_file))
    score = {sp.id_to_piece(i): sp.get_score(i) for i in range(sp.get_piece_size())}

    def merged_score(m) -> float:
        a, b = m if isinstance(m, list) else m.split(" ", 1)
        return -score.get(a + b, float("-inf"))

    model["merges"] = sorted(model["merges"], key=merged_score)
    tok._tokenizer = Tokenizer.from_str(json.dumps(spec))


def check_fast(tokenizer, name: str = "tokenizer") -> None:
    """Raise `TokenizerError` unless ``tokenizer`` is fast (offsets) and has an EOS token."""
    if not getattr(tokenizer, "is_fast", False):
        raise TokenizerError(f"{name}: a fast tokenizer is required (character offsets place the labels)")
    if tokenizer.eos_token is None:
        raise TokenizerError(f"{name}: the tokenizer has no EOS token; the Tulu format ends each reply with EOS")
