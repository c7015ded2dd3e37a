"""Refuse garbage weights before they are used or written: non-finite values, LoRA factors whose
shape does not fit their config or their base layer. Each error names the file and the tensor.

``verify_adapter`` (qtulu.adapters.store) proves an adapter directory is the one that was saved (sizes,
SHA-256, header); it cannot tell that what was saved is usable: a NaN adapter or one whose
``adapter_config.json`` was edited, saved with consistent metadata, passes it. These checks do:

- `check_adapter_weights(adapter_dir, module_dims=...)`: every tensor finite (read one at a time
  from the safetensors file, never all at once); each ``lora_A`` is ``(r, in)`` and each ``lora_B``
  ``(out, r)`` with ``r`` from the config (``rank_pattern`` included) and, when ``module_dims``
  gives the base layer's ``(in, out)``, those dimensions. Called before an adapter is loaded
  (``attach_adapters``) or merged (``export_merged``).
- `check_finite(name, tensor, where=...)`: one output tensor, before it is written (merged export).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Callable

from qtulu.errors import AdapterError

_LORA_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.[^.]+)?\.weight$")


class NonFiniteWeights(AdapterError):
    """A tensor holds NaN or inf values."""


class AdapterShapeError(AdapterError):
    """A LoRA factor's shape does not match its config's rank or its base layer."""


def check_finite(name: str, tensor, *, where: str) -> None:
    """Raise `NonFiniteWeights` naming ``name`` when floating-point ``tensor`` has a NaN or inf."""
    import torch

    if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
        n_nan = int(torch.isnan(tensor).sum())
        n_inf = int(torch.isinf(tensor).sum())
        raise NonFiniteWeights(f"{where}: tensor {name} has non-finite values ({n_nan} NaN, {n_inf} inf of "
                               f"{tensor.numel()}); refusing to use it")


def _rank_for(config: dict, module: str) -> int:
    """The LoRA rank of ``module``: ``rank_pattern`` matched the way peft matches it, else ``r``."""
    pattern = config.get("rank_pattern") or {}
    if pattern:
        from peft.utils.other import get_pattern_key

        return int(pattern.get(get_pattern_key(pattern.keys(), module), config["r"]))
    return int(config["r"])


def _alpha_for(config: dict, module: str) -> float:
    pattern = config.get("alpha_pattern") or {}
    if pattern:
        from peft.utils.other import get_pattern_key

        return float(pattern.get(get_pattern_key(pattern.keys(), module), config.get("lora_alpha", 8)))
    return float(config.get("lora_alpha", 8))


class AdapterOverflow(AdapterError):
    """LoRA values that overflow (become inf) in the compute dtype, as factors or as their scaled product."""


def check_adapter_weights(adapter_dir: str | Path,
                          module_dims: Callable[[str], tuple[int, int] | None] | None = None, *,
                          compute_dtype=None, n_layers: int | None = None) -> None:
    """See the module docstring. ``module_dims(module_name)`` -> (in_features, out_features) or None.
    ``compute_dtype``: also refuse factors that overflow in it, or whose scaled product can
    (`AdapterOverflow`); ``n_layers``: the base's layer count, which ``layers_to_transform`` must fit."""
    import torch
    from safetensors import safe_open

    d = Path(adapter_dir)
    weights = d / "adapter_model.safetensors"
    try:
        config = json.loads((d / "adapter_config.json").read_text())
        r_default = int(config["r"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise AdapterError(f"{d / 'adapter_config.json'}: unreadable or without an integer 'r' ({e})") from None
    if r_default < 1:
        raise AdapterShapeError(f"{d / 'adapter_config.json'}: r must be >= 1, got {r_default}")
    _check_layers(config, n_layers, d / "adapter_config.json")
    dtype = compute_dtype if not isinstance(compute_dtype, str) else getattr(torch, compute_dtype)
    norms: dict[str, dict[str, float]] = {}  # module -> {"A": max column norm, "B": max row norm}
    with safe_open(str(weights), framework="pt") as f:
        for key in f.keys():
            shape = list(f.get_slice(key).get_shape())
            m = _LORA_KEY.match(key)
            lora = bool(m and m.group("ab") in "AB" and "lora_embedding" not in key)
            if lora:
                module, ab = m.group("module"), m.group("ab")
                r = _rank_for(config, module)
                dims = module_dims(module) if module_dims else None
                if len(shape) != 2:
                    want = None
                elif ab == "A":
                    want = [r, dims[0] if dims else shape[1]]
                else:
                    want = [dims[1] if dims else shape[0], r]
                if shape != want:
                    base = f" and the base layer {module} ({dims[0]} -> {dims[1]})" if dims else ""
                    raise AdapterShapeError(
                        f"{weights}: tensor {key} has shape {shape}, but adapter_config.json (r={r}){base} "
                        f"imply {want}: the adapter's config and weights do not belong together")
            t = f.get_tensor(key)
            check_finite(key, t, where=str(weights))
            if dtype is not None and t.is_floating_point():
                check_finite(key, t.to(dtype), where=f"{weights} in {str(dtype).replace('torch.', '')}")
                if lora:
                    # |(B A)_ij| <= |B_i.| |A_.j| (Cauchy-Schwarz): the largest row norm of B times the
                    # largest column norm of A bounds every element of the product, in float64
                    n = t.double().norm(dim=0 if ab == "A" else 1).max()
                    norms.setdefault(module, {})[ab] = float(n)
    if dtype is not None:
        _check_products(norms, config, dtype, weights)


def _check_products(norms: dict, config: dict, dtype, weights: Path) -> None:
    import math

    import torch

    limit = torch.finfo(dtype).max
    for module, n in norms.items():
        if "A" not in n or "B" not in n:
            continue
        r = _rank_for(config, module)
        scale = _alpha_for(config, module) / (math.sqrt(r) if config.get("use_rslora") else r)
        bound = scale * n["A"] * n["B"]
        if not bound < limit:
            name = str(dtype).replace("torch.", "")
            raise AdapterOverflow(
                f"{weights}: module {module}: the scaled LoRA update can reach {bound:.3g}, beyond {name}'s "
                f"largest value {limit:.3g}: it overflows in the compute dtype; refusing the adapter")


def _check_layers(config: dict, n_layers: int | None, where: Path) -> None:
    ltt = config.get("layers_to_transform")
    if ltt is None or n_layers is None:
        return
    items = ltt if isinstance(ltt, list) else [ltt]
    out = [i for i in items if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < n_layers]
    if out:
        raise AdapterShapeError(f"{where}: layers_to_transform: {out} out of range: the base has {n_layers} "
                                f"layers (0..{n_layers - 1})")


def check_layers_to_transform(adapter_dir: str | Path, n_layers: int | None) -> None:
    """``layers_to_transform`` of the adapter's config within the base's ``n_layers`` (`AdapterShapeError`)."""
    path = Path(adapter_dir) / "adapter_config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise AdapterError(f"{path}: unreadable ({e})") from None
    if isinstance(config, dict):
        _check_layers(config, n_layers, path)


def n_layers_of(model_or_config) -> int | None:
    """The base's number of transformer layers (``num_hidden_layers`` of its text config), or None."""
    config = getattr(model_or_config, "config", model_or_config)
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()
    n = getattr(config, "num_hidden_layers", None)
    return n if isinstance(n, int) else None


def linear_dims(model) -> Callable[[str], tuple[int, int] | None]:
    """``module_dims`` for `check_adapter_weights` from a loaded (peft or plain) base model."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model

    def dims(name: str):
        try:
            mod = base.get_submodule(name)
        except AttributeError:
            return None  # not in this model: attach_adapters reports keys that match no module
        mod = getattr(mod, "base_layer", mod)  # a peft LoRA layer wraps the base Linear
        if hasattr(mod, "in_features") and hasattr(mod, "out_features"):
            return int(mod.in_features), int(mod.out_features)
        return None

    return dims
