"""Sharded safetensors output for the merged export (``qtulu.adapters.export``), planned by huggingface_hub.

``output_layout`` describes what the export will write (names, shapes, dtypes) as meta tensors,
without computing anything; ``ShardWriter`` gives that layout to huggingface_hub's
``split_torch_state_dict_into_shards`` (the split, file names and index transformers'
``save_pretrained`` produces) and then writes each planned shard as soon as its last tensor has
been produced. ``parse_size`` reads ``max_shard_size`` with huggingface_hub's ``parse_size_to_int``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch


def _error(msg: str):
    from qtulu.errors import ExportError

    return ExportError(msg)


def parse_size(size: int | str) -> int:
    """``"5GB"`` / ``"500MB"`` / ``1000`` -> bytes (huggingface_hub's ``parse_size_to_int``:
    KB/MB/GB/TB are powers of ten, as transformers' ``max_shard_size`` reads them)."""
    from huggingface_hub.serialization._base import parse_size_to_int

    if isinstance(size, int) and not isinstance(size, bool):
        return size
    text = str(size).strip()
    if text.isdigit():
        return int(text)
    try:
        return parse_size_to_int(text)
    except ValueError as e:
        raise _error(f"max_shard_size: cannot parse {size!r} ({e}); e.g. 5GB, 500MB, 1000000") from None


def _nf4_layout(shape: tuple[int, int], cfg: dict) -> dict[str, torch.Tensor]:
    """Meta tensors of the bitsandbytes-layout entries `_requantize` writes for an (out, in) weight
    (the small JSON state's length is estimated: it only moves a shard boundary by bytes)."""
    n = shape[0] * shape[1]
    nb = -(-n // cfg["blocksize"])
    out = {
        "": torch.empty(((n + 1) // 2, 1), dtype=torch.uint8, device="meta"),
        ".absmax": torch.empty(nb, dtype=torch.uint8 if cfg["double_quant"] else torch.float32, device="meta"),
        ".quant_map": torch.empty(16, device="meta"),
    }
    if cfg["double_quant"]:
        out[".nested_absmax"] = torch.empty(-(-nb // 256), device="meta")
        out[".nested_quant_map"] = torch.empty(256, device="meta")
    out[".quant_state.bitsandbytes__nf4"] = torch.empty(170 if cfg["double_quant"] else 80, dtype=torch.uint8,
                                                        device="meta")
    return out


def output_layout(dry_stream, out_dtype: torch.dtype, quantize: str | None, skip, requant_cfg: dict) -> dict:
    """``{name: meta tensor}`` of what the export loop writes, in its order (the shard plan's input)."""
    layout: dict[str, torch.Tensor] = {}
    for name, t, is_linear in dry_stream:
        if is_linear and t.is_floating_point() and quantize == "nf4" and name.rsplit(".", 2)[-2] not in skip:
            layout.update({name + k: v for k, v in _nf4_layout(tuple(t.shape), requant_cfg).items()})
        else:
            layout[name] = torch.empty(t.shape, dtype=out_dtype if t.is_floating_point() else t.dtype, device="meta")
    return layout


class ShardWriter:
    """Writes the shards huggingface_hub planned (``split_torch_state_dict_into_shards`` over the
    output's meta layout: the same split, names and index transformers' ``save_pretrained`` makes),
    each as soon as its last tensor arrives: the plan's shards are runs of the stream, plus the
    tensors over ``max_shard_size`` alone, so at most one shard and one big tensor are held.

    Why the library does not see the tensors themselves: it plans from a complete state dict,
    which for a 65B merge would be the whole model in memory; its plan needs only sizes."""

    def __init__(self, out_dir: Path, layout: dict[str, torch.Tensor], max_bytes: int):
        from huggingface_hub import split_torch_state_dict_into_shards

        self.out_dir = out_dir
        self.plan = split_torch_state_dict_into_shards(layout, filename_pattern="model{suffix}.safetensors",
                                                       max_shard_size=max_bytes)
        self.pending = {f: set(names) for f, names in self.plan.filename_to_tensors.items()}
        self.buffers: dict[str, dict[str, torch.Tensor]] = {f: {} for f in self.pending}
        self.total = 0

    def add(self, name: str, t: torch.Tensor) -> None:
        from safetensors.torch import save_file

        fname = self.plan.tensor_to_filename.get(name)
        if fname is None or name not in self.pending[fname]:
            raise _error(f"export: tensor {name!r} is not in the shard plan (or written twice)")
        self.buffers[fname][name] = t.contiguous()
        self.total += t.numel() * t.element_size()
        self.pending[fname].discard(name)
        if not self.pending[fname]:
            # the tensor order inside a shard is the plan's (safetensors sorts keys anyway)
            save_file(self.buffers.pop(fname), str(self.out_dir / fname), metadata={"format": "pt"})

    def finish(self) -> list[str]:
        missing = sorted(n for names in self.pending.values() for n in names)
        if missing:
            raise _error(f"export: planned tensors never produced: {missing[:5]}")
        if self.plan.is_sharded:
            index = {"metadata": {"total_size": self.total}, "weight_map": dict(sorted(self.plan.tensor_to_filename.items()))}
            (self.out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        return list(self.plan.filename_to_tensors)
