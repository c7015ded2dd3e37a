"""Stage 5, adapters: the adapter directory (PEFT files + qtulu.json), integrity, what it trained
against, swapping several on one base, merge methods, and `merge --full` export in shards.

    files        the directory format: names, qtulu.json, hashes
    store        save / verify / attach / load_model
    integrity    tensors finite and fitting the base;  trained_on: what a plain PEFT adapter trained against
    swap         set_active, adapters_disabled, mixed-adapter batches
    merge        linear / ties / dare / cat combination (`qtulu merge`)
    export       dequantize-then-merge (`qtulu merge --full`);  shards: the streamed safetensors writer

The names below are the public API (``qtulu.adapters.set_active(...)``); they are resolved on first
use, so that importing one submodule does not import them all (PEP 562).
"""

from __future__ import annotations

import importlib

_PUBLIC = {
    "load_model": "store", "attach_adapters": "store", "save_adapter": "store", "verify_adapter": "store",
    "set_active": "swap", "adapters_disabled": "swap", "adapter_names_of": "swap", "forward_mixed": "swap",
    "generate_mixed": "swap",
}


def __getattr__(name: str):
    if name in _PUBLIC:
        return getattr(importlib.import_module(f"qtulu.adapters.{_PUBLIC[name]}"), name)
    raise AttributeError(f"module 'qtulu.adapters' has no attribute {name!r}")
