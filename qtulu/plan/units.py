"""The FSDP2 units of a model, as accelerate's ``fsdp2_prepare_model`` wraps them, and their parameter
bytes: what a rank gathers whole (`qtulu.plan.fsdp`). Kept apart so that the planner can record them
without importing the FSDP arithmetic (which plans through the planner)."""

from __future__ import annotations

from typing import Any


def _param_bytes(params) -> tuple[int, int]:
    total = trainable = 0
    for p in params:
        n = p.numel() * p.element_size()
        total += n
        trainable += n if p.requires_grad else 0
    return total, trainable


def layers_and_tail(model):
    """The decoder layers (the classes named by ``_no_split_modules``, as accelerate wraps them) and the
    tail modules (final norm, output embedding) of a (peft) causal LM."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    names = set(getattr(base, "_no_split_modules", None) or [])
    layers = [m for m in base.modules() if type(m).__name__ in names]
    tail = [m for m in (getattr(base.model, "norm", None), base.get_output_embeddings()) if m is not None]
    return layers, tail


def fsdp_units(model) -> dict[str, Any]:
    """Parameter bytes of the FSDP2 units of ``model`` (works on meta and fake tensors): the largest
    decoder layer, all layers, the tail and the root, each ``(bytes, trainable bytes)``."""
    layers, tail = layers_and_tail(model)
    seen: set[int] = set()
    per_layer = []
    for m in layers:
        ps = [p for p in m.parameters() if id(p) not in seen]
        seen.update(id(p) for p in ps)
        per_layer.append(_param_bytes(ps))
    tail_ps = [p for m in tail for p in m.parameters() if id(p) not in seen]
    seen.update(id(p) for p in tail_ps)
    root_ps = [p for p in model.parameters() if id(p) not in seen]
    return {
        "layers": len(per_layer),
        "layer": max(per_layer, default=(0, 0)),
        "all_layers": tuple(map(sum, zip(*per_layer))) if per_layer else (0, 0),
        "tail": _param_bytes(tail_ps),
        "root": _param_bytes(root_ps),
    }
