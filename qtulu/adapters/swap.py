"""Swap adapters on one loaded base, and run mixed-adapter batches (one adapter per row).

Swapping touches no base weight: it only changes which LoRA branch the layers run. ``"base"``
(`BASE_NAME`) runs the base with adapters disabled.
"""

from __future__ import annotations

from typing import Sequence

from qtulu.adapters.files import BASE_NAME, AdapterError

def adapter_names_of(model) -> list[str]:
    """Names of the adapters loaded in ``model`` (empty for a plain model)."""
    return list(getattr(model, "peft_config", {}) or {})


def set_active(model, name: str) -> None:
    """Make adapter ``name`` the active one, or ``"base"`` to run the base with adapters disabled.

    Swapping touches no base weight: it only changes which LoRA branch the layers run.
    """
    names = adapter_names_of(model)
    if name == BASE_NAME:
        if names:
            model.base_model.disable_adapter_layers()
        return
    if name not in names:
        raise AdapterError(f"no adapter named {name!r}; loaded: {names + [BASE_NAME]}")
    model.base_model.enable_adapter_layers()
    try:
        model.set_adapter(name, inference_mode=True)
    except TypeError:  # older peft: set_adapter has no inference_mode
        model.set_adapter(name)
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.requires_grad_(False)


def _mixed_names(model, adapter_names: Sequence[str], batch: int) -> list[str]:
    names = adapter_names_of(model)
    if len(adapter_names) != batch:
        raise ValueError(f"adapter_names has {len(adapter_names)} entries for a batch of {batch} rows")
    out = []
    for n in adapter_names:
        if n == BASE_NAME:
            out.append("__base__")  # peft's name for "no adapter on this row"
        elif n in names:
            out.append(n)
        else:
            raise AdapterError(f"no adapter named {n!r}; loaded: {names + [BASE_NAME]}")
    return out


def forward_mixed(model, input_ids, attention_mask, adapter_names: Sequence[str]):
    """Logits of one forward where row ``i`` runs with adapter ``adapter_names[i]`` ("base" = none).

    Uses peft's mixed-batch forward (``adapter_names=``): one pass over the base weights for the
    whole batch; each LoRA branch runs only on its own rows. Returns ``(B, T, V)`` logits.
    """
    import torch

    names = _mixed_names(model, adapter_names, input_ids.shape[0])
    with _adapters_enabled(model), torch.no_grad():
        return model(input_ids=input_ids, attention_mask=attention_mask, adapter_names=names).logits  # (B, T, V)


def generate_mixed(model, input_ids, attention_mask, adapter_names: Sequence[str], **generate_kwargs):
    """``model.generate`` where row ``i`` uses adapter ``adapter_names[i]`` ("base" = none)."""
    names = _mixed_names(model, adapter_names, input_ids.shape[0])
    with _adapters_enabled(model):
        return model.generate(
            input_ids=input_ids, attention_mask=attention_mask, adapter_names=names, **generate_kwargs
        )


def adapters_disabled(model) -> bool:
    """True when ``set_active(model, "base")`` is in effect (or the model has no adapters)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            return bool(module.disable_adapters)
    return True


class _adapters_enabled:
    """Enable adapter layers for a mixed batch; restore "base" mode afterwards if it was on."""

    def __init__(self, model):
        self.model, self.was_disabled = model, adapters_disabled(model)

    def __enter__(self):
        if self.was_disabled:
            self.model.base_model.enable_adapter_layers()

    def __exit__(self, *exc):
        if self.was_disabled:
            self.model.base_model.disable_adapter_layers()
        return False
