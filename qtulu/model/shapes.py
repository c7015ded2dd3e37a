"""Model shapes for the end-to-end benchmark: the LLaMA-1 family plus a tiny CPU shape.

Only the dimensions matter here (weights are random): the benchmark measures throughput and
memory, never quality.
"""

from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass(frozen=True)
class ShapeSpec:
    """Dimensions of a LLaMA-style decoder (no biases, SwiGLU MLP, RMSNorm, RoPE)."""

    name: str
    hidden: int
    layers: int
    heads: int
    intermediate: int
    vocab: int = 32000
    kv_heads: int | None = None  # None = heads (LLaMA-1 has no grouped-query attention)
    rms_norm_eps: float = 1e-6

    @property
    def n_kv_heads(self) -> int:
        return self.kv_heads or self.heads

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(in_features, out_features) of each linear layer of one decoder layer."""
        h, d, i = self.hidden, self.head_dim, self.intermediate
        kv = self.n_kv_heads * d
        return {
            "q_proj": (h, self.heads * d),
            "k_proj": (h, kv),
            "v_proj": (h, kv),
            "o_proj": (self.heads * d, h),
            "gate_proj": (h, i),
            "up_proj": (h, i),
            "down_proj": (i, h),
        }

    def layer_linear_params(self) -> int:
        return sum(a * b for a, b in self.linear_shapes().values())

    def frozen_matmul_params(self) -> int:
        """Weights that take part in a matmul and stay frozen: every decoder linear (NF4) plus
        the lm_head (kept in bf16, as QLoRA does). The embedding is a lookup: no FLOPs."""
        return self.layers * self.layer_linear_params() + self.vocab * self.hidden

    def total_params(self) -> int:
        norms = (2 * self.layers + 1) * self.hidden
        return self.frozen_matmul_params() + self.vocab * self.hidden + norms

    def lora_params(self, r: int) -> int:
        """LoRA parameters with rank r on every decoder linear ("all-linear": lm_head excluded)."""
        return self.layers * sum(r * (a + b) for a, b in self.linear_shapes().values())

    def llama_config(self, *, max_position_embeddings: int = 2048, **overrides: Any):
        """A `transformers.LlamaConfig` with these dimensions."""
        from transformers import LlamaConfig

        kwargs: dict[str, Any] = dict(
            vocab_size=self.vocab,
            hidden_size=self.hidden,
            intermediate_size=self.intermediate,
            num_hidden_layers=self.layers,
            num_attention_heads=self.heads,
            num_key_value_heads=self.n_kv_heads,
            max_position_embeddings=max_position_embeddings,
            rms_norm_eps=self.rms_norm_eps,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=0,
            tie_word_embeddings=False,
            use_cache=False,
        )
        kwargs.update(overrides)
        return LlamaConfig(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


SHAPES: dict[str, ShapeSpec] = {
    # LLaMA-1 (Touvron et al. 2023, table 2); "30b" is the model released as 33B.
    "llama-7b": ShapeSpec("llama-7b", hidden=4096, layers=32, heads=32, intermediate=11008),
    "llama-13b": ShapeSpec("llama-13b", hidden=5120, layers=40, heads=40, intermediate=13824),
    "llama-30b": ShapeSpec("llama-30b", hidden=6656, layers=60, heads=52, intermediate=17920),
    "llama-65b": ShapeSpec("llama-65b", hidden=8192, layers=80, heads=64, intermediate=22016),
    # CPU smoke shape: exercises every code path (GQA included) in seconds; no speed claim.
    "tiny": ShapeSpec(
        "tiny", hidden=64, layers=2, heads=4, kv_heads=2, intermediate=176, vocab=1024, rms_norm_eps=1e-5
    ),
}


def get_shape(name: str) -> ShapeSpec:
    """The shape called ``name``; ``ValueError`` naming the known ones otherwise."""
    try:
        return SHAPES[name]
    except KeyError:
        raise ValueError(f"unknown shape {name!r}; known: {', '.join(SHAPES)}") from None


def shape_from_dict(d: dict[str, Any]) -> ShapeSpec:
    return ShapeSpec(**d)
