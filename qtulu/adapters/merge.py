"""Adapter merging: combine several LoRA adapters into one (``combine_adapters``) and the
``qtulu merge`` command (a new adapter, or with ``--full`` a merged model via ``qtulu.adapters.export``).

Methods, and how exact each is (``ΔW_i = s_i B_i A_i``, the delta of adapter i, ``w_i`` its weight):

==============  ======================================  ===========================================
method          merged delta                            how (peft ``add_weighted_adapter``)
==============  ======================================  ===========================================
``linear``      ``Σ w_i ΔW_i``                          rank concatenation (peft ``cat``): EXACT,
                                                        rank ``Σ r_i``. peft's own ``linear`` mixes
                                                        A's and B's separately, which adds cross
                                                        terms ``B_i A_j``: not used.
``cat``         ``Σ w_i ΔW_i``                          peft ``cat``, identical to ``linear`` here.
``ties``        TIES (trim to ``density``, elect sign,  peft ``ties_svd``: TIES on the full deltas,
                disjoint mean) of the ``w_i ΔW_i``      then truncated SVD to ``rank`` (default
                                                        ``Σ r_i``): APPROXIMATE, the TIES result is
                                                        generally full rank.
``dare_linear`` DARE (random drop 1-density, rescale)   peft ``dare_linear_svd``: APPROXIMATE (SVD),
                then weighted sum                       random (seeded by ``seed``).
``dare_ties``   DARE then TIES sign election            peft ``dare_ties_svd``: APPROXIMATE (SVD),
                                                        random (seeded by ``seed``).
==============  ======================================  ===========================================

peft's non-SVD ``ties``/``dare_*`` apply the method to A and B separately, which is not what
the papers define on task vectors (the deltas), so they are not used. ``merge_report`` measures
the relative error of the merged adapter's delta against the method's full-rank target for the
deterministic methods (linear, cat, ties).

Default weights: ``1/n`` each for ``linear``/``cat``/``dare_linear`` (an average), ``1.0`` each
for ``ties``/``dare_ties`` (their disjoint merge already averages).
"""

from __future__ import annotations

from typing import Sequence

from qtulu.errors import QtuluError

METHODS = ("linear", "ties", "dare_linear", "dare_ties", "cat")
_PEFT_TYPE = {
    "linear": "cat",
    "cat": "cat",
    "ties": "ties_svd",
    "dare_linear": "dare_linear_svd",
    "dare_ties": "dare_ties_svd",
}
_NEEDS_DENSITY = ("ties", "dare_linear", "dare_ties")
EXACT_METHODS = ("linear", "cat")


class MergeError(QtuluError, ValueError):
    """Bad merge request: unknown method/adapter, wrong number of weights, missing density."""


def default_weights(method: str, n: int) -> list[float]:
    return [1.0] * n if method in ("ties", "dare_ties") else [1.0 / n] * n


def _lora_layers(peft_model):
    from peft.tuners.lora import LoraLayer

    return [(name, m) for name, m in peft_model.named_modules() if isinstance(m, LoraLayer)]


def combine_adapters(
    peft_model,
    adapters: Sequence[str],
    method: str,
    weights: Sequence[float] | None = None,
    density: float | None = None,
    new_name: str = "merged",
    *,
    rank: int | None = None,
    seed: int = 0,
) -> str:
    """Add adapter ``new_name`` to ``peft_model`` combining ``adapters`` by ``method``; return its name.

    See the module docstring for the methods and their exactness. ``density`` (fraction kept,
    in (0, 1]) is required for ties/dare_*; ``rank`` is the SVD rank for those (default: the sum
    of the adapters' ranks, capped by the smallest layer dimension). The new adapter is not made
    active. Raises ``MergeError`` on bad arguments.
    """
    import torch

    if method not in METHODS:
        raise MergeError(f"unknown merge method {method!r}; choose one of {METHODS}")
    adapters = list(adapters)
    loaded = list(getattr(peft_model, "peft_config", {}) or {})
    if not adapters:
        raise MergeError("no adapters to merge")
    for a in adapters:
        if a not in loaded:
            raise MergeError(f"no adapter named {a!r} loaded; have {loaded}")
    if len(set(adapters)) != len(adapters):
        raise MergeError(f"adapters listed twice: {adapters}")
    if new_name in loaded:
        raise MergeError(f"an adapter named {new_name!r} already exists; pick another new_name")
    weights = list(weights) if weights is not None else default_weights(method, len(adapters))
    if len(weights) != len(adapters):
        raise MergeError(f"{len(weights)} weights for {len(adapters)} adapters")
    if method in _NEEDS_DENSITY:
        if density is None:
            raise MergeError(f"method {method!r} needs a density (fraction of each delta kept, in (0, 1])")
        if not 0.0 < density <= 1.0:
            raise MergeError(f"density must be in (0, 1], got {density}")
    for a in adapters:
        cfg = peft_model.peft_config[a]
        if getattr(cfg, "use_rslora", False) or getattr(cfg, "use_dora", False):
            # the combined adapter gets lora_alpha == r (scaling 1), which rslora/DoRA break
            raise MergeError(f"adapter {a!r} uses rslora/DoRA: not supported by combine_adapters")

    kwargs = {}
    if method in _NEEDS_DENSITY:
        dims = [min(m.in_features, m.out_features) for _, m in _lora_layers(peft_model)]
        ranks = sum(peft_model.peft_config[a].r for a in adapters)
        kwargs = dict(
            svd_rank=min(rank or ranks, min(dims)),
            density=density,
            svd_full_matrices=False,  # reduced SVD: same result, less memory
        )
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)  # DARE's random drop: reproducible for a given seed
        peft_model.add_weighted_adapter(
            adapters, [float(w) for w in weights], new_name, combination_type=_PEFT_TYPE[method], **kwargs
        )
    return new_name


def merge_report(peft_model, adapters: Sequence[str], method: str, weights, density, new_name: str) -> dict:
    """Relative Frobenius error ``|ΔW_new - target| / |target|`` (max and mean over layers).

    ``target`` is the method's full-rank combination of the adapters' deltas (peft's
    ``merge_utils``). Only for deterministic methods; DARE's target is random: ``None``.
    """
    import torch
    from peft.utils.merge_utils import task_arithmetic, ties

    weights = list(weights) if weights is not None else default_weights(method, len(adapters))
    if method.startswith("dare"):
        return {"method": method, "exact": False, "rel_error_max": None, "rel_error_mean": None}
    errs, per_layer = [], {}
    with torch.no_grad():
        for name, layer in _lora_layers(peft_model):
            if new_name not in layer.lora_A:
                continue
            deltas = [layer.get_delta_weight(a).float() for a in adapters if a in layer.lora_A]
            w = torch.tensor([float(x) for a, x in zip(adapters, weights) if a in layer.lora_A])
            target = task_arithmetic(deltas, w) if method in EXACT_METHODS else ties(deltas, w, density, "total")
            got = layer.get_delta_weight(new_name).float()
            errs.append(float((got - target).norm() / target.norm().clamp_min(1e-30)))
            per_layer[name] = errs[-1]
    return {
        "method": method,
        "exact": method in EXACT_METHODS,
        "rel_error_max": max(errs) if errs else None,
        "rel_error_mean": sum(errs) / len(errs) if errs else None,
        "layers": len(errs),
        "per_layer": per_layer,
    }
