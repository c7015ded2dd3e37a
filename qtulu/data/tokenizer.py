"""Load a fast (Rust-backed) tokenizer from a SentencePiece ``.model`` file, a directory or a hub id.

The data pipeline needs a *fast* tokenizer: labels are placed from character offsets
(``return_offsets_mapping``), which only the Rust tokenizers provide.
"""

from __future__ import annotations

import functools
import os
import tempfile
from pathlib import Path

from qtulu.errors import QtuluError


class TokenizerError(QtuluError, ValueError):
    """The tokenizer cannot be loaded or cannot be used by the data pipeline."""


def load_tokenizer(path_or_id: str | os.PathLike, *, revision: str | None = None, trust_remote_code: bool = False):
    """A fast tokenizer from ``path_or_id``.

    - a SentencePiece ``.model`` file (e.g. the LLaMA ``tokenizer.model``): converted to a fast
      `LlamaTokenizer` (BOS ``<s>``, EOS ``</s>``, byte fallback);
    - a directory: ``AutoTokenizer.from_pretrained`` (or the `LlamaTokenizer` conversion when it only
      holds a ``tokenizer.model``);
    - anything else: a hub id for ``AutoTokenizer.from_pretrained`` (``trust_remote_code`` off by default).

    A missing pad token is set to ``<unk>`` (or EOS) so that batched generation works; packing never pads.
    A LLaMA SentencePiece tokenizer adds a BOS as it did in 2023 (see `_LLAMA_2023`).
    Loads are cached per (path, revision).
    """
    tok = _load_cached(str(path_or_id), revision, trust_remote_code)
    return tok


def load_gguf_tokenizer(path: Path, *, trust_remote_code: bool = False):
    """The tokenizer inside a GGUF file (transformers' GGUF reader, the ``gguf`` package), with the
    header's ``tokenizer.ggml.add_bos_token`` kept as ``add_bos_token`` (transformers drops it):
    SmolLM2 names ``<|im_start|>`` its BOS but never starts a prompt with it
    (qtulu.data.chat.bos_token_id reads it)."""
    from transformers import AutoTokenizer

    try:
        import gguf
    except ImportError:
        raise TokenizerError(f"{path}: reading a .gguf tokenizer needs the gguf package: pip install 'qtulu[gguf]'") from None
    try:
        field = gguf.GGUFReader(str(path)).fields.get("tokenizer.ggml.add_bos_token")
        tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, trust_remote_code=trust_remote_code)
    except (ValueError, KeyError, OSError) as e:
        raise TokenizerError(f"{path}: cannot read its tokenizer ({type(e).__name__}: {str(e).splitlines()[0]})") from None
    if field is not None:
        tok.init_kwargs["add_bos_token"] = bool(field.parts[field.data[0]][0])
    return tok


# LLaMA's tokenizer as open-instruct used it (transformers 4.3x, 2023): ``LlamaTokenizer(add_bos_token=
# True)``, so ``tok("Hello world")`` gave [1, 15043, 3186] and ``decode`` of a clipped passage began
# "<s> ". transformers 5.x converts a bare tokenizer.model with no BOS ([15043, 3186]), which changes
# TyDi QA's clipped passages and TruthfulQA's scored sequences; the tokenizer is loaded with the
# 2023 default instead, whatever the installed transformers does (tests/data/test_tokenizer.py).
_LLAMA_2023 = {"add_bos_token": True, "add_eos_token": False}


@functools.lru_cache(maxsize=8)
def _load_cached(spec: str, revision: str | None, trust_remote_code: bool):
    from transformers import AutoTokenizer, LlamaTokenizer

    p = Path(os.path.expanduser(spec))
    if p.is_file() and p.suffix.lower() == ".gguf":
        tok = load_gguf_tokenizer(p, trust_remote_code=trust_remote_code)
    elif p.is_file():
        if p.suffix != ".model":
            raise TokenizerError(f"{p}: expected a SentencePiece .model file or a tokenizer directory")
        # LlamaTokenizer.from_pretrained converts a directory's tokenizer.model to a fast tokenizer;
        # give it a directory that holds just this file (symlinked, nothing copied).
        with tempfile.TemporaryDirectory(prefix="qtulu-tok-") as d:
            os.symlink(p.resolve(), Path(d) / "tokenizer.model")
            tok = LlamaTokenizer.from_pretrained(d, **_LLAMA_2023)
        tok.name_or_path = str(p.resolve())  # not the temporary folder
        _order_merges_by_sentencepiece_score(tok, p)
        tok._qtulu_sentencepiece_model = (str(p.resolve()), tok.backend_tokenizer)  # for `word_encoder`
    elif p.is_dir():
        files = {f.name for f in p.iterdir()}
        if files & {"tokenizer.json", "tokenizer_config.json"}:
            tok = AutoTokenizer.from_pretrained(str(p), trust_remote_code=trust_remote_code)
        elif "tokenizer.model" in files:
            tok = LlamaTokenizer.from_pretrained(str(p), **_LLAMA_2023)
            _order_merges_by_sentencepiece_score(tok, p / "tokenizer.model")
            tok._qtulu_sentencepiece_model = (str((p / "tokenizer.model").resolve()), tok.backend_tokenizer)
        else:
            raise TokenizerError(f"{p}: no tokenizer.json, tokenizer_config.json or tokenizer.model in this directory")
    elif spec.startswith((".", "/", "~")) or spec.endswith(".model"):
        raise TokenizerError(f"tokenizer not found: {p}")
    else:
        from qtulu.hub import offline_reason, unreachable

        offline = offline_reason()  # offline: the hub cache only, and a miss fails at once (no retries)
        try:
            tok = AutoTokenizer.from_pretrained(spec, revision=revision, trust_remote_code=trust_remote_code,
                                                local_files_only=offline is not None)
        except OSError as e:
            if offline:
                raise unreachable(f"tokenizer {spec!r}", offline) from e
            raise
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


def count_tokens(tokenizer, texts: list[str], *, add_bos: bool = True) -> list[int]:
    """Tokens in each of ``texts`` as the tokenizer's own ``tokenizer(text)`` counts them (BOS included
    when ``add_bos``). A tokenizer converted from a SentencePiece model counts with SentencePiece
    itself: that is what the slow LLaMA tokenizer of open-instruct's scripts did, and it differs from
    the fast conversion on a text that starts with a space (one dummy-prefix token)."""
    if not texts:
        return []
    model_file, _ = getattr(tokenizer, "_qtulu_sentencepiece_model", (None, None))
    bos = 1 if add_bos and tokenizer.bos_token_id is not None else 0
    if model_file is not None:
        return [len(ids) + bos for ids in _sentencepiece(model_file).encode(texts)]
    encs = tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=False)
    return [len(e.ids) + bos for e in encs]


@functools.lru_cache(maxsize=4)
def _sentencepiece(model_file: str):
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_file=model_file)


def check_fast(tokenizer, name: str = "tokenizer") -> None:
    """Raise `TokenizerError` unless ``tokenizer`` is fast (offsets) and has an EOS token."""
    if not getattr(tokenizer, "is_fast", False):
        raise TokenizerError(f"{name}: a fast tokenizer is required (character offsets place the labels)")
    if tokenizer.eos_token is None:
        raise TokenizerError(f"{name}: the tokenizer has no EOS token; the Tulu format ends each reply with EOS")


# --------------------------------------------------------------------------------------------
# exact word-cached encoding for tokenizers converted from a SentencePiece BPE model


class WordEncoder:
    """Encode texts exactly as the fast tokenizer converted from a SentencePiece BPE ``.model`` does,
    with each token's length in bytes (for label offsets). On the shared sources (3,971 Tulu texts,
    1.04M tokens, 2 cores, GC paused) `qtulu.data.chat.encode_batch` through it takes 0.49 s wall /
    0.56 CPU-s, where the Rust tokenizer's ``encode_batch`` alone takes 0.84 s / 1.46 CPU-s.

    Why by hand: the Rust tokenizer runs one BPE over each whole text (the LLaMA conversion has no
    pre-split, so its word cache never hits; a Split pre-tokenizer measured slower still), and
    SentencePiece caches nothing; yet the 707k words of the shared sources are only 75k distinct.
    When no piece of the vocabulary contains a newline or a non-space character followed by
    ``\u2581``, no BPE merge can cross the start of a word (a run of spaces and the non-space
    characters after it) or a newline, so each word tokenizes on its own: the text is split into
    words with one regex, every distinct word is encoded once by SentencePiece (dummy prefix off;
    the text's own dummy prefix is a space before its first word), and the ids are gathered with
    numpy. The EOS string is a word of its own, as the fast tokenizer's added token is.
    `word_encoder` builds one only when every such precondition holds, and `accepts` names the
    texts it encodes exactly; tests/data/test_chat.py asserts ids and labels equal to the Rust
    tokenizer's on every example of the shared sources.
    """

    def __init__(self, tokenizer, model_file: str):
        import re

        import numpy as np
        import sentencepiece as spm
        from sentencepiece import sentencepiece_model_pb2

        proto = sentencepiece_model_pb2.ModelProto()
        proto.ParseFromString(Path(model_file).read_bytes())
        proto.normalizer_spec.add_dummy_prefix = False  # added per text, before its first word
        self._sp = spm.SentencePieceProcessor()
        self._sp.LoadFromSerializedProto(proto.SerializeToString())
        self.eos, self.eos_id, self.bos_id = tokenizer.eos_token, tokenizer.eos_token_id, tokenizer.bos_token_id
        n = self._sp.get_piece_size()
        pieces = [self._sp.id_to_piece(i) for i in range(n)]
        nbytes = np.zeros(n, dtype=np.int64)  # bytes of the original text each piece stands for
        for i, piece in enumerate(pieces):
            if self._sp.is_byte(i):
                nbytes[i] = 1
            elif not (self._sp.is_control(i) or self._sp.is_unknown(i)):
                nbytes[i] = len(piece.replace("\u2581", " ").encode("utf-8"))
        nbytes[self.eos_id] = len(self.eos.encode("utf-8"))  # control ids never come out of encode
        if self.bos_id is not None:
            nbytes[self.bos_id] = 0
        self.piece_bytes = nbytes
        specials = [t for t in (tokenizer.all_special_tokens or []) if t and t != self.eos]
        self._other_special = re.compile("|".join(map(re.escape, sorted(specials, key=len, reverse=True)))) if specials else None
        e, first, rest = re.escape(self.eos), re.escape(self.eos[0]), re.escape(self.eos[1:])
        # a word: the EOS string | spaces + the characters up to the next space, newline or EOS |
        # trailing spaces | a newline
        self._words = re.compile(rf"{e}| *(?:[^ \n{first}]+|{first}(?!{rest}))+| +|\n")

    @staticmethod
    def preconditions(tokenizer, model_file: str) -> str | None:
        """Why `WordEncoder` would not be exact for ``tokenizer`` (None when it is)."""
        import json
        import re

        import sentencepiece as spm
        from sentencepiece import sentencepiece_model_pb2

        proto = sentencepiece_model_pb2.ModelProto()
        proto.ParseFromString(Path(model_file).read_bytes())
        ns, ts = proto.normalizer_spec, proto.trainer_spec
        if ts.model_type != sentencepiece_model_pb2.TrainerSpec.BPE or not ts.byte_fallback:
            return "not a byte-fallback BPE model"
        if ns.name != "identity" or ns.precompiled_charsmap or ns.remove_extra_whitespaces or not ns.add_dummy_prefix \
                or not ns.escape_whitespaces or ts.treat_whitespace_as_suffix:
            return "normalizer is not identity + dummy prefix + escaped spaces"
        if any(p.type == p.USER_DEFINED for p in proto.pieces):
            return "user-defined pieces"
        sp = spm.SentencePieceProcessor(model_file=model_file)
        pieces = [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
        if any("\n" in p for p in pieces) or any(re.search("[^\u2581]\u2581", p) for p in pieces):
            return "a piece can merge across a word start or a newline"
        vocab = tokenizer.backend_tokenizer.get_vocab(with_added_tokens=True)
        if len(tokenizer) != len(pieces) or len(vocab) != len(pieces) or any(vocab.get(p) != i for i, p in enumerate(pieces)):
            return "the fast tokenizer's vocabulary differs from the model's pieces"
        ids = [tokenizer.eos_token_id] + ([tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else [])
        if tokenizer.eos_token_id is None or not all(sp.is_control(i) for i in ids):
            return "BOS/EOS are not control pieces"
        spec = json.loads(tokenizer.backend_tokenizer.to_str())
        pre = spec.get("pre_tokenizer") or {}
        if spec.get("normalizer") is not None or pre.get("type") != "Metaspace" or pre.get("split") \
                or pre.get("prepend_scheme") != "first" or pre.get("replacement") != "\u2581":
            return "the fast tokenizer's pipeline is not the SentencePiece conversion"
        model = spec.get("model") or {}
        if model.get("type") != "BPE" or not model.get("byte_fallback") or model.get("dropout") or model.get("ignore_merges"):
            return "the fast tokenizer's model is not a plain byte-fallback BPE"
        return None

    def accepts(self, text: str) -> bool:
        """Whether `encode` gives exactly the fast tokenizer's ids for ``text``."""
        return (bool(text) and not text.startswith((" ", self.eos)) and "\u2581" not in text
                and (self._other_special is None or self._other_special.search(text) is None))

    def encode(self, texts, cache: dict | None = None):
        """``(ids, nbytes, counts)``: int32 ids of all ``texts`` concatenated, each token's length in
        bytes of its text (0 for the dummy prefix), and the number of tokens per text. Texts must be
        `accepts`-ed. ``cache`` (a dict, empty at first) keeps distinct words across calls."""
        import itertools

        import numpy as np

        if not texts:
            return np.zeros(0, dtype=np.int32), np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
        cache = {} if cache is None else cache
        if not cache:  # word number -> its ids: flat[starts[w] : starts[w] + lens[w]]; EOS is word 0
            cache.update(index=_Index({self.eos: 0}), flat=np.asarray([self.eos_id], dtype=np.int32),
                         lens=np.ones(1, dtype=np.int64), starts=np.zeros(1, dtype=np.int64))
        index = cache["index"]
        lookup = index.__getitem__  # a new word gets the next number
        occ: list[int] = []
        n_words = np.empty(len(texts), dtype=np.int64)
        findall = self._words.findall
        for k, text in enumerate(texts):
            words = findall(text)
            words[0] = " " + words[0]  # the dummy prefix
            occ += map(lookup, words)
            n_words[k] = len(words)
        if len(index) > len(cache["lens"]):
            encoded = self._sp.encode(list(itertools.islice(index, len(cache["lens"]), None)))
            new_lens = np.fromiter(map(len, encoded), dtype=np.int64, count=len(encoded))
            new_flat = np.fromiter(itertools.chain.from_iterable(encoded), dtype=np.int32, count=int(new_lens.sum()))
            cache["starts"] = np.concatenate([cache["starts"], len(cache["flat"]) + np.cumsum(new_lens) - new_lens])
            cache["flat"] = np.concatenate([cache["flat"], new_flat])
            cache["lens"] = np.concatenate([cache["lens"], new_lens])
        flat, lens, starts = cache["flat"], cache["lens"], cache["starts"]
        occ_arr = np.asarray(occ, dtype=np.int64)  # (W,)
        occ_lens = lens[occ_arr]  # (W,) tokens per word occurrence
        ends = np.cumsum(occ_lens)
        gather = np.arange(int(ends[-1]) if len(ends) else 0) + np.repeat(starts[occ_arr] - (ends - occ_lens), occ_lens)
        ids = flat[gather]  # (T,)
        word_bounds = np.concatenate([[0], np.cumsum(n_words)])
        counts = np.diff(np.concatenate([[0], ends])[word_bounds])  # (len(texts),)
        nbytes = self.piece_bytes[ids]  # (T,)
        first = np.concatenate([[0], np.cumsum(counts)[:-1]])
        nbytes[first] -= 1  # the dummy prefix is not in the text
        return ids, nbytes, counts


class _Index(dict):
    """word -> number, numbering new words in order of first sight."""

    def __missing__(self, word: str) -> int:
        n = self[word] = len(self)
        return n


def word_encoder(tokenizer) -> WordEncoder | None:
    """The `WordEncoder` of a tokenizer that `load_tokenizer` converted from a SentencePiece model
    (built once and kept on it), or None when there is none or it would not be exact (checked again
    whenever the tokenizer's size, special tokens or pipeline change; a replaced backend never has one)."""
    model_file, backend = getattr(tokenizer, "_qtulu_sentencepiece_model", (None, None))
    if model_file is None or tokenizer.backend_tokenizer is not backend:
        return None
    key = (len(tokenizer), tokenizer.eos_token, tokenizer.bos_token_id, tuple(tokenizer.all_special_tokens),
           str(backend.normalizer), str(backend.pre_tokenizer))
    held = getattr(tokenizer, "_qtulu_word_encoder", None)
    if held is None or held[0] != key:  # first use, or the tokenizer was changed since
        exact = WordEncoder.preconditions(tokenizer, model_file) is None
        held = (key, WordEncoder(tokenizer, model_file) if exact else None)
        tokenizer._qtulu_word_encoder = held
    return held[1]
