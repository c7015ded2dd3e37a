"""Presets: named bundles of recipe overrides, applied before the user's own (`-o/--set` wins).

``smoke`` makes any recipe runnable on a CPU in about a minute, with a small base::

    qtulu train dolly --preset smoke --set model.base=demo_out/base \
        --set sources.dolly.path=../shared/data/sources/release_samples/dolly_sample.jsonl

The shipped recipes carry the paper's GPU settings (2048-token rows, an effective batch of 128
examples, bf16, gradient checkpointing, a checkpoint every 200 steps): on a CPU one step of those
takes many minutes and nothing reaches disk for hours. The smoke preset keeps the recipe's data,
chat format, LoRA shape and learning rate and changes only what makes a try-out slow.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from qtulu.errors import QtuluError


class PresetError(QtuluError, KeyError):
    """An unknown preset name (the message lists the known ones)."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


@dataclass(frozen=True)
class Preset:
    """``settings``: dotted recipe keys -> values; ``per_source``: keys set on every source."""

    meaning: str
    settings: dict = field(default_factory=dict)
    per_source: dict = field(default_factory=dict)


PRESETS: dict[str, Preset] = {
    "smoke": Preset(
        meaning="try any recipe on a CPU in about a minute (with a small base): short rows, 64 examples "
                "per source, accumulation 1, fp32, no gradient checkpointing, 10 steps, a checkpoint every 5",
        settings={
            "data.max_seq_len": 512,  # short rows: the cost of a step grows with the row
            "train.micro_batch_size": 1,
            "train.gradient_accumulation_steps": 1,  # not effective_batch_size/rows (55 on dolly)
            "model.compute_dtype": "float32",  # CPUs have no fast bf16 matmul
            "train.gradient_checkpointing": False,  # recomputation buys memory a smoke run does not need
            "train.optimizer": "adamw_torch",  # paged 8-bit AdamW needs CUDA
            "train.max_steps": 10,
            "train.save_steps": 5,  # something reaches disk, and resume can be tried
            "train.logging_steps": 1,
        },
        per_source={"count": 64},
    ),
    # A real small model (SmolLM2-135M from its GGUF) on a CPU: 40 optimizer steps in at most
    # 5 minutes on 2 idle cores (docs/benchmarks.md, "SmolLM2-135M on the CPU"). Unlike smoke it
    # uses 256-token rows (a step's cost grows with the row: 512 took minutes beside a busy
    # process, issue 26), skips the malformed rows real files hold (Code-Alpaca has empty outputs) instead
    # of stopping. The recipe's learning rate, LoRA shape and chat format are kept.
    "cpu": Preset(
        meaning="train a real small model (e.g. SmolLM2-135M from its GGUF) on a CPU: 256-token rows, 256 "
                "examples per source, accumulation 1, fp32, no gradient checkpointing, 40 steps, malformed "
                "rows skipped, a checkpoint every 20 steps",
        settings={
            "data.max_seq_len": 256,
            "data.on_bad_row": "skip",  # real files hold empty replies; count them and go on
            "train.micro_batch_size": 1,
            "train.gradient_accumulation_steps": 1,
            "model.compute_dtype": "float32",  # CPUs have no fast bf16 matmul
            "train.gradient_checkpointing": False,
            "train.optimizer": "adamw_torch",  # paged 8-bit AdamW needs CUDA
            "train.max_steps": 40,
            "train.save_steps": 20,
            "train.logging_steps": 5,
        },
        per_source={"count": 256},
    ),
}


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise PresetError(f"unknown preset {name!r}; presets: {', '.join(sorted(PRESETS))}")
    return PRESETS[name]


def preset_overrides(name: str | None, recipe) -> list[str]:
    """The ``KEY=VALUE`` overrides of preset ``name`` for ``recipe`` (a `Recipe`, a path or a name).

    Per-source keys are expanded over the recipe's sources (by name). None -> [].
    """
    if not name:
        return []
    import json

    preset = get_preset(name)
    if not hasattr(recipe, "sources"):
        from qtulu.recipes import load_recipe

        recipe = load_recipe(recipe)
    out = [f"{k}={json.dumps(v)}" for k, v in preset.settings.items()]
    for src in recipe.sources:
        out += [f"sources.{src.name}.{k}={json.dumps(v)}" for k, v in preset.per_source.items()]
    return out
