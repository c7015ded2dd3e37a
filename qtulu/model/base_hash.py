"""The identity of a base model as adapters see it: ``weights_sha256`` (`state_dict_sha256`).

An adapter is bound to what it trained against: for each NF4 layer (qtulu's or bitsandbytes') its
codes and quant state, for every other parameter and persistent buffer its values. The same bits
hash alike whatever produced them (a qtulu quantization, a bitsandbytes checkpoint, an in-memory
bitsandbytes model) and whichever float dtype holds the values, and the hash is taken from memory
after the load, so no checkpoint is read twice. Per-tensor digests are combined in name order, so
``qtulu.adapters.export`` builds the same hash while it streams a checkpoint. `files_sha256` is the former
binding (a hash of the checkpoint files), kept for adapters saved before `WEIGHTS_HASH` existed.
Cost on the 167M-parameter benchmark model: ``python benchmarks/bench_base_hash.py``
(docs/benchmarks.md).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import torch
from torch import nn

from qtulu.files import atomic_write_text
from qtulu.model.quant import Linear4bit

log = logging.getLogger(__name__)

# what `weights_sha256` hashes (recorded as base_info["weights_hash"]; adapters saved before it
# existed hold a hash of the checkpoint files instead, see qtulu.adapters.store.check_base)
WEIGHTS_HASH = "trained-against-v1"
_HASH_CHUNK = 1 << 22  # elements per piece: bounds the temporary copies of a big tensor


def _is_nf4_layer(module: nn.Module) -> bool:
    """qtulu's Linear4bit, or a quantized bitsandbytes Linear4bit (its weight carries a quant_state)."""
    if isinstance(module, Linear4bit):
        return True
    return type(module).__module__.startswith("bitsandbytes") and getattr(
        getattr(module, "weight", None), "quant_state", None) is not None


def _nf4_digest(module: nn.Module) -> str:
    """SHA-256 of an NF4 layer's bits: packed codes, absmax (and the nested absmax state), shape
    and blocksizes. Not the nominal original dtype, nor the fixed NF4 table: two layers with
    these equal dequantize to the same weight in any compute dtype."""
    from qtulu.kernels.nf4 import bnb_codes_and_state

    if isinstance(module, Linear4bit):
        codes, state = module.weight.data, module.quant_state
    else:
        codes, state, _ = bnb_codes_and_state(module.weight.data, module.weight.quant_state)
    h = hashlib.sha256(f"nf4|{tuple(state.shape)}|{state.blocksize}|{state.nested}|"
                       f"{state.blocksize2 if state.nested else 0}\n".encode())
    _update(h, codes)
    _update(h, state.absmax)
    if state.nested:
        for t in (state.offset, state.absmax2, state.code2):
            _update(h, t.float())
    return h.hexdigest()


def _update(h, t: torch.Tensor) -> None:
    """Feed ``t``'s raw bytes to hasher ``h`` in pieces (no copy of a CPU tensor's data)."""
    flat = t.detach().reshape(-1)
    for i in range(0, flat.numel(), _HASH_CHUNK):
        piece = flat[i:i + _HASH_CHUNK].to("cpu").contiguous()
        h.update(piece.view(torch.uint8).numpy())  # hashlib reads the buffer, releasing the GIL


def _value_digest(t: torch.Tensor) -> str:
    """SHA-256 of a tensor's values, the same for the same values in any float dtype that holds
    them exactly: bf16 bytes when every value is a bf16 value (a bf16 tensor, or an fp32 one
    whose low mantissa bits are zero), fp32 bytes otherwise; non-float tensors as they are."""
    t = t.detach()
    shape = tuple(t.shape)
    if not t.is_floating_point():
        h = hashlib.sha256(f"{t.dtype}|{shape}\n".encode())
        _update(h, t)
        return h.hexdigest()
    flat = t.reshape(-1)
    as_bf16 = t.dtype == torch.bfloat16 or all(
        not bool((flat[i:i + _HASH_CHUNK].float().view(torch.int32) & 0xFFFF).any())
        for i in range(0, flat.numel(), _HASH_CHUNK))
    h = hashlib.sha256(f"{'bf16' if as_bf16 else 'f32'}|{shape}\n".encode())
    for i in range(0, flat.numel(), _HASH_CHUNK):
        piece = flat[i:i + _HASH_CHUNK]
        _update(h, piece.to(torch.bfloat16) if as_bf16 else piece.float())  # exact either way
    return h.hexdigest()


def combine_digests(digests: dict[str, str]) -> str:
    """One SHA-256 over ``{name: digest}`` in name order (order-free, so a stream can build it)."""
    total = hashlib.sha256()
    for name in sorted(digests):
        total.update(f"{name}:{digests[name]}\n".encode())
    return total.hexdigest()


def tensor_digests(model: nn.Module, threads: int | None = None) -> dict[str, str]:
    """``{name: digest}`` of what an adapter on ``model`` trains against (see `state_dict_sha256`);
    tensors are hashed on ``threads`` threads (default: the CPU count, at most 16)."""
    from concurrent.futures import ThreadPoolExecutor

    jobs: dict[str, tuple] = {}
    seen: set[int] = set()
    nf4_prefixes: list[str] = []
    for mod_name, module in model.named_modules():
        parts = mod_name.split(".") if mod_name else []
        if any(p.startswith("lora_") or p in ("modules_to_save", "original_module") for p in parts):
            continue  # a peft adapter's own layers are not the base
        if any(mod_name.startswith(p) for p in nf4_prefixes):
            continue  # inside an NF4 layer: quantization state, already hashed
        name = ".".join(p for p in parts if p != "base_layer")  # peft's wrapper level
        prefix = f"{name}." if name else ""
        if _is_nf4_layer(module):
            jobs[prefix + "weight"] = (_nf4_digest, module)
            nf4_prefixes.append(mod_name + ".")
            seen.add(id(module.weight))
        for p_name, p in module.named_parameters(recurse=False):
            if id(p) in seen:
                continue  # tied weights count once
            seen.add(id(p))
            jobs[prefix + p_name] = (_value_digest, p)
        for b_name, b in module.named_buffers(recurse=False):
            if b is not None and b_name not in module._non_persistent_buffers_set:
                jobs[prefix + b_name] = (_value_digest, b)
    workers = threads or min(16, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = {name: pool.submit(fn, arg) for name, (fn, arg) in jobs.items()}
        return {name: f.result() for name, f in futures.items()}


def state_dict_sha256(model: nn.Module) -> str:
    """SHA-256 of what a LoRA adapter on ``model`` trains against: for each NF4 layer (qtulu's or
    bitsandbytes') its codes and quant state, for every other parameter and persistent buffer its
    values (floats hashed as fp32), combined in name order. peft layers are seen through.

    The same bits give the same hash from any source (a qtulu quantization, a bitsandbytes
    checkpoint, an in-memory bitsandbytes model); no checkpoint file is read. Measured cost:
    ``python benchmarks/bench_base_hash.py`` (docs/benchmarks.md)."""
    return combine_digests(tensor_digests(model))


def _cache_dir() -> Path:
    return Path(os.environ.get("QTULU_CACHE_DIR", Path.home() / ".cache" / "qtulu"))


def files_sha256(files: list[Path]) -> str:
    """SHA-256 over the weight files (each file's digest, in name order), cached by path/size/mtime.

    Only for adapters saved before `WEIGHTS_HASH` existed (their ``weights_sha256`` is this): it
    reads the checkpoint a second time, so `load_base` never calls it. The per-file digests are
    cached in ``$QTULU_CACHE_DIR/weights_sha256.json`` (default ``~/.cache/qtulu``).
    """
    cache_path = _cache_dir() / "weights_sha256.json"
    try:
        cache = json.loads(cache_path.read_text())
    except (OSError, json.JSONDecodeError):
        cache = {}
    changed = False
    total = hashlib.sha256()
    for f in sorted(files, key=lambda p: p.name):
        real = f.resolve()
        st = real.stat()
        key = f"{real}|{st.st_size}|{st.st_mtime_ns}"
        digest = cache.get(key)
        if digest is None:
            h = hashlib.sha256()
            with open(real, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 24), b""):
                    h.update(block)
            digest = cache[key] = h.hexdigest()
            changed = True
        total.update(f"{f.name}:{digest}\n".encode())
    if changed:
        _save_cache(cache_path, cache)
    return total.hexdigest()


def file_sha256(path: str | os.PathLike) -> str:
    """The plain SHA-256 of one file (``sha256sum``), cached like `files_sha256`: the identity of a
    GGUF base (qtulu.model.gguf), whose folder is named by it."""
    cache_path = _cache_dir() / "weights_sha256.json"
    try:
        cache = json.loads(cache_path.read_text())
    except (OSError, json.JSONDecodeError):
        cache = {}
    real = Path(path).resolve()
    st = real.stat()
    key = f"{real}|{st.st_size}|{st.st_mtime_ns}"
    if key not in cache:
        h = hashlib.sha256()
        with open(real, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 24), b""):
                h.update(block)
        cache[key] = h.hexdigest()
        _save_cache(cache_path, cache)
    return cache[key]


def _save_cache(cache_path: Path, cache: dict) -> None:
    try:
        atomic_write_text(cache_path, json.dumps(cache, indent=0, sort_keys=True))
    except OSError as e:  # a read-only home must not stop training; the hash is recomputed next time
        log.warning("could not write the weights-hash cache %s: %s", cache_path, e)
