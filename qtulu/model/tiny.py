"""Tiny LLaMA-architecture models and a character tokenizer, built in-process.

Used by `qtulu demo`, the CPU benchmarks and the tests: nothing is downloaded. The tokenizer is
character-level (printable ASCII plus newline and tab) with the Tulu chat markers as special
tokens, so that arithmetic and string tasks are learnable by a model of a few hundred thousand
parameters.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

TULU_SPECIAL_TOKENS = ("<|user|>", "<|assistant|>", "<|system|>")
_BASE_SPECIALS = ("<unk>", "<s>", "</s>", "<pad>")


def build_char_tokenizer():
    """A `PreTrainedTokenizerFast` over single characters; `save_pretrained` round-trips it."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = [chr(i) for i in range(32, 127)] + ["\n", "\t"]
    vocab = {tok: i for i, tok in enumerate(list(_BASE_SPECIALS) + chars)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    # one token per character, whitespace included ([\s\S] also matches newlines)
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    core.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
    )
    tok.add_special_tokens({"additional_special_tokens": list(TULU_SPECIAL_TOKENS)})
    return tok


def tiny_llama_config(vocab_size: int = 128, **overrides: Any):
    """A LlamaConfig small enough for CPU tests (defaults: 2 layers, hidden 64, GQA 4/2 heads)."""
    from transformers import LlamaConfig

    kwargs: dict[str, Any] = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=176,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rms_norm_eps=1e-5,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
        tie_word_embeddings=False,
    )
    kwargs.update(overrides)
    return LlamaConfig(**kwargs)


def build_tiny_llama(seed: int = 0, dtype=None, **config_overrides: Any):
    """A randomly initialised `LlamaForCausalLM` from `tiny_llama_config` (deterministic in seed)."""
    import torch
    from transformers import LlamaForCausalLM

    config = tiny_llama_config(**config_overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    if dtype is not None:
        model = model.to(dtype)
    return model.eval()


def save_base(model, tokenizer, out_dir) -> Path:
    """Write ``model`` (safetensors + config) and ``tokenizer`` to ``out_dir``, loadable by
    `qtulu.model.load.load_base` (and so by ``qtulu train/chat/eval/merge --model out_dir``).

    Written into a staging directory beside ``out_dir`` and renamed into place last, so that a kill
    never leaves a half-written base that a later command would load; an existing ``out_dir`` is
    replaced.
    """
    import shutil
    import uuid

    from qtulu.files import replace_dir

    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    stage = out_dir.with_name(f".{out_dir.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        model.save_pretrained(stage, safe_serialization=True)
        tokenizer.save_pretrained(stage)
        replace_dir(stage, out_dir)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    return out_dir
