"""What an adapter was trained against: ``qtulu.json`` says it, or, for a plain PEFT adapter (from
``peft.save_pretrained`` or the Hub, no ``qtulu.json``), the user does: ``trained_on="nf4" |
"bf16" | "fp16" | "fp32"`` (CLI: ``--trained-on``). qtulu never guesses: an adapter trained on
bf16 weights put on an NF4 base (or the reverse) gives other logits than its author's.

``adapter_record`` returns the binding record `qtulu.adapters.store` checks a base against: the
adapter's ``qtulu.json``, or for a plain PEFT adapter a record of the precision the user gave.
"""

from __future__ import annotations

import os
from pathlib import Path

# what a plain PEFT adapter was trained against (the user says it: --trained-on / trained_on=)
TRAINED_ON = ("nf4", "bf16", "fp16", "fp32")
_TRAINED_ON_DTYPE = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
TRAINED_ON_HINT = "--trained-on nf4|bf16|fp16|fp32 (Python: trained_on=)"


def trained_on_of(meta: dict) -> str | None:
    """``"nf4"`` / ``"bf16"`` / ... : what an adapter record says it was trained against."""
    from qtulu.adapters.files import recorded_compute_dtype

    if meta.get("trained_on"):
        return meta["trained_on"]
    if meta.get("quantization", (meta.get("base") or {}).get("quantization")):
        return "nf4"
    dtype = recorded_compute_dtype(meta)
    return {v: k for k, v in _TRAINED_ON_DTYPE.items()}.get(dtype) if dtype else None


def plain_peft_record(adapter_dir: str | os.PathLike, trained_on: str | None) -> dict:
    """The binding record of a plain PEFT adapter (no ``qtulu.json``) from what the user said it
    was trained against; refuses (naming ``--trained-on``) when nothing was said."""
    from qtulu.adapters.files import META_NAME
    from qtulu.errors import AdapterError
    from qtulu.model.load import quantization_info

    d = Path(adapter_dir)
    if trained_on is None:
        raise AdapterError(
            f"{d}: plain PEFT adapter (no {META_NAME}): what it was trained against is unknown, and qtulu "
            f"will not guess (an NF4 base changes its logits); say it with {TRAINED_ON_HINT}"
        )
    if trained_on not in TRAINED_ON:
        raise AdapterError(f"trained_on must be one of {TRAINED_ON}, got {trained_on!r}")
    return {
        "trained_on": trained_on,
        "quantization": quantization_info("nf4") if trained_on == "nf4" else None,
        "compute_dtype": _TRAINED_ON_DTYPE.get(trained_on),
        "base": {},
    }


def adapter_record(adapter_dir: str | os.PathLike, trained_on: str | None = None) -> dict:
    """``qtulu.json`` of an adapter dir, or for a plain PEFT adapter `plain_peft_record`. A
    ``trained_on`` that contradicts what ``qtulu.json`` records is refused."""
    from qtulu.adapters.files import META_NAME, read_meta
    from qtulu.errors import AdapterError

    d = Path(adapter_dir)
    if not (d / META_NAME).is_file():
        return plain_peft_record(d, trained_on)
    meta = read_meta(d)
    recorded = trained_on_of(meta)
    if trained_on is not None and recorded is not None and trained_on != recorded:
        raise AdapterError(
            f"{d / META_NAME}: the adapter was trained against {recorded}, but --trained-on/trained_on says "
            f"{trained_on}"
        )
    return meta
