"""Model FLOPs of one QLoRA training step, and the bf16 peak of known GPUs (for MFU).

Counted as "model FLOPs" (PaLM's MFU convention): the work the math needs, not what an
implementation happens to do, so gradient-checkpointing recompute and padding are NOT counted
and every stack is divided by the same number. For T real tokens in documents of lengths L_j:

- frozen matmuls (NF4 decoder linears + bf16 lm_head, N weights): forward 2·N·T plus backward
  through the input 2·N·T (frozen: no weight gradient) = 4·N·T;
- attention, causal and per document (packed rows never attend across documents): per layer and
  document, QK^T and PV forward cost 2·L(L+1)·d·heads, backward (dQ, dK, dV, dP) twice that;
- LoRA, rank r on each decoder linear (d_in -> d_out): forward 2·T·r·(d_in+d_out), backward
  through the input the same again, weight gradients the same again = 6·T·r·(d_in+d_out).
Norms, RoPE, softmax and the loss are a rounding error and left out.
"""

from __future__ import annotations

from typing import Iterable

from qtulu.model.shapes import ShapeSpec


def step_flops(shape: ShapeSpec, doc_lengths: Iterable[int], lora_r: int) -> dict[str, int]:
    """FLOPs of a forward+backward pass over documents of these lengths (one step's data)."""
    lengths = [int(n) for n in doc_lengths]
    if any(n <= 0 for n in lengths):
        raise ValueError("document lengths must be positive")
    tokens = sum(lengths)
    frozen = 4 * shape.frozen_matmul_params() * tokens
    pairs = sum(n * (n + 1) for n in lengths)  # 2 x the causal (query, key) pairs
    attention = 3 * 2 * pairs * shape.head_dim * shape.heads * shape.layers
    lora = 6 * tokens * shape.lora_params(lora_r)
    return {
        "tokens": tokens,
        "frozen": frozen,
        "attention": attention,
        "lora": lora,
        "total": frozen + attention + lora,
    }


# Dense bf16 tensor-core peaks (no sparsity) from the vendors' data sheets, in TFLOP/s. Matched
# by substring of torch.cuda.get_device_name(), first match wins (so "H100 PCIe" before "H100").
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.4),  # SXM5 (the "H100 80GB HBM3" name)
    ("H200", 989.4),
    ("GH200", 989.4),
    ("A100", 312.0),
    ("L40S", 362.05),
    ("L40", 181.05),
    ("L4", 121.0),
    ("RTX 4090", 165.2),
)


def peak_tflops(device_name: str | None) -> float | None:
    """The bf16 dense peak of a GPU by name, or None when unknown (then MFU is not reported)."""
    if not device_name:
        return None
    for key, value in PEAK_BF16_TFLOPS:
        if key.lower() in device_name.lower():
            return value
    return None


def mfu(flops_per_s: float, peak: float | None) -> float | None:
    """Model FLOP utilization in [0, 1], or None without a known peak."""
    if not peak:
        return None
    return flops_per_s / (peak * 1e12)
