"""qtulu: instruction-tune LLaMA-style models the Tulu way, with QLoRA on one GPU.

Data flows one way: recipe -> data -> model -> train -> adapter -> eval / merge.
Heavy modules are imported lazily so that ``import qtulu`` is cheap.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> "module:attribute", resolved on first access
_LAZY = {
    "load_recipe": "qtulu.recipes:load_recipe",
    "load_model": "qtulu.adapters.store:load_model",
    "load_base": "qtulu.model.load:load_base",
}


def __getattr__(name: str):
    if name in _LAZY:
        module, attr = _LAZY[name].split(":")
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'qtulu' has no attribute {name!r}")
