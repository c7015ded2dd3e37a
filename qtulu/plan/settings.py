"""What a plan is made of: the model, the batch, the optimizer and the memory switches.

`PlanSettings.from_recipe` reads them from a recipe (the same fields ``qtulu train`` reads);
``qtulu plan`` overrides them from its flags. ``REDUCTIONS`` lists the switches `--optimize`
may turn on: each keeps the maths of the step (same losses and gradients, or the same in
expectation for the dropout mask; see each module's tests).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}

# switch -> (value that saves memory, what it does); applied in this order by --optimize
REDUCTIONS: dict[str, tuple[Any, str]] = {
    "lora_dropout_impl": ("recompute", "LoRA dropout mask regenerated in backward: no dropped copy, no mask"),
    "loss_chunk_size": (8192, "TRL's chunked LM-head loss in 8192-wide vocabulary tiles"),
    "activation_offload": (True, "checkpointed layer inputs held in pinned host memory"),
    "master_weights": ("host", "fp32 master LoRA weights, their gradient sums and the optimizer on the host"),
}


@dataclass
class PlanSettings:
    """Everything that changes the memory of one training step."""

    name: str = "plan"
    shape: str | None = None
    config: str | None = None
    seq_len: int = 2048
    micro_batch_size: int = 1          # packed rows per micro-batch (collated into one (1, rows * seq_len) row)
    examples_per_row: int = 1          # examples packed in a row (boundaries for the varlen attention)
    accumulation: int = 2              # micro-batches planned before the optimizer step (>= 2: grads already exist)
    quantize: str | None = "nf4"
    blocksize: int = 64
    double_quant: bool = True
    compute_dtype: str = "bfloat16"
    attn_implementation: str = "qtulu_varlen"
    lora_r: int = 64
    lora_alpha: int = 16
    lora_dropout: float = 0.1
    target_modules: Any = "all-linear"
    optimizer: str = "paged_adamw_8bit"
    learning_rate: float = 1e-4
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    gradient_checkpointing: bool = True
    device: str = "cuda"               # whose semantics: "cuda" (the GPU step) or "cpu" (this machine's step)
    # memory switches (recipe: lora.dropout_impl, train.loss_chunk_size, train.activation_offload,
    # train.master_weights)
    lora_dropout_impl: str = "peft"
    loss_chunk_size: int | None = None
    activation_offload: bool = False
    master_weights: str = "device"
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def torch_dtype(self) -> torch.dtype:
        return _DTYPES[self.compute_dtype]

    @property
    def tokens(self) -> int:
        return self.micro_batch_size * self.seq_len

    def lora_spec(self):
        from qtulu.recipes import LoraSpec

        return LoraSpec(r=self.lora_r, alpha=self.lora_alpha, dropout=self.lora_dropout,
                        target_modules=self.target_modules)

    def hf_baseline(self, adapter_dtype: str = "bfloat16") -> "PlanSettings":
        """The same run on transformers + peft + bitsandbytes as TRL's SFTTrainer sets them up (none of
        qtulu's switches); ``adapter_dtype``: "bfloat16" (TRL's default for a quantized model) or "float32"."""
        if adapter_dtype not in ("bfloat16", "float32"):
            raise ValueError(f"adapter_dtype must be bfloat16 or float32, got {adapter_dtype!r}")
        return self.replace(lora_dropout_impl="peft", loss_chunk_size=None, activation_offload=False,
                            master_weights="device", attn_implementation="sdpa",
                            extra={**self.extra, "adapter_dtype": adapter_dtype, "fused_lm_head": True})

    def replace(self, **changes) -> "PlanSettings":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        extra = d.pop("extra")
        if extra.get("adapter_dtype"):  # an HF baseline's adapters (TRL's bf16 or peft's fp32)
            d["adapter_dtype"] = extra["adapter_dtype"]
        if isinstance(d["target_modules"], tuple):
            d["target_modules"] = list(d["target_modules"])
        return d

    @classmethod
    def from_recipe(cls, recipe, **overrides) -> "PlanSettings":
        """The settings ``qtulu train RECIPE`` would run with (on CUDA unless ``device="cpu"``)."""
        m, lo, t = recipe.model, recipe.lora, recipe.train
        ga = t.gradient_accumulation_steps
        kw = dict(
            name=recipe.name,
            config=m.base,
            seq_len=recipe.data.max_seq_len,
            micro_batch_size=t.micro_batch_size,
            accumulation=1 if ga == 1 else 2,
            quantize=m.quantize,
            blocksize=m.blocksize,
            double_quant=m.double_quant,
            compute_dtype=m.compute_dtype,
            attn_implementation=m.attn_implementation,
            lora_r=lo.r,
            lora_alpha=lo.alpha,
            lora_dropout=lo.dropout,
            target_modules=lo.target_modules,
            optimizer=t.optimizer,
            learning_rate=t.learning_rate,
            weight_decay=t.weight_decay,
            max_grad_norm=t.max_grad_norm,
            gradient_checkpointing=t.gradient_checkpointing,
            lora_dropout_impl=getattr(lo, "dropout_impl", "peft"),
            loss_chunk_size=getattr(t, "loss_chunk_size", None),
            activation_offload=getattr(t, "activation_offload", False),
            master_weights=getattr(t, "master_weights", "device"),
        )
        kw.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**kw)

    def recipe_overrides(self) -> list[str]:
        """The ``--set KEY=VALUE`` lines that put these switches into a recipe."""
        out = [f"lora.dropout_impl={self.lora_dropout_impl}", f"train.activation_offload={str(self.activation_offload).lower()}"]
        out.append(f"train.loss_chunk_size={'null' if self.loss_chunk_size is None else self.loss_chunk_size}")
        out.append(f"train.master_weights={self.master_weights}")
        out.append(f"train.optimizer={self.optimizer}")
        return out
