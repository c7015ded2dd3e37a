"""GGUF files as bases: read through transformers' GGUF support, dequantized once into a folder.

A ``.gguf`` file (llama.cpp's format: weights quantized to Q4_0, Q4_1, Q8_0, K-quants ..., the
tokenizer and chat template inside) is a base wherever a base is taken (``model.base``,
``--model``, ``qtulu.load_model``, ``qtulu.load_base``)::

    model, tok = load_base("SmolLM2-135M-Instruct.Q4_1.gguf")          # dequantized, then NF4

`materialize` reads the file once with transformers (``from_pretrained(gguf_file=...)``, which
dequantizes every tensor to float32 with the ``gguf`` package: ``pip install 'qtulu[gguf]'``) and
writes a plain transformers folder (config, float32 safetensors, tokenizer, ``qtulu_gguf.json``)
under ``$QTULU_CACHE_DIR/gguf/<sha256 of the file>``. Every later step reads that folder as any
other base: NF4 quantization streams from it, ``merge --full`` exports from it, a study hashes it.
Why a folder and not the in-memory model: those steps all stream a checkpoint tensor by tensor,
and float32 keeps the dequantized values exactly (Q4_1's ``d * q + m`` is not a bf16 value), so
the folder is a faithful copy of what the file computes.

The file's SHA-256 is the base identity: the folder is named by it and checked against it, and
``load_base`` records it as the base's ``revision`` (``sha256:...``) and ``gguf_sha256`` in every
adapter's ``qtulu.json``. An architecture transformers cannot read from GGUF, or a tensor type the
``gguf`` package cannot dequantize, is a one-line `ModelLoadError` naming it, raised before anything
is converted.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from qtulu.errors import QtuluError
from qtulu.files import atomic_write_text, replace_dir

META = "qtulu_gguf.json"
_PLAIN_TYPES = {"F32", "F16", "BF16"}  # stored unquantized: transformers reads them as they are


class GGUFError(QtuluError, ValueError):
    """A GGUF file qtulu cannot use as a base (a missing ``gguf`` package, an unsupported
    architecture or tensor type, an unreadable file)."""


def is_gguf(name_or_path) -> bool:
    """True for a path ending in ``.gguf`` (a str or PathLike; models and hub ids are not)."""
    return isinstance(name_or_path, (str, os.PathLike)) and str(name_or_path).lower().endswith(".gguf")


def _require_gguf():
    try:
        import gguf  # noqa: F401 - transformers' GGUF reader needs it
    except ImportError:
        raise GGUFError("reading a .gguf base needs the gguf package: pip install 'qtulu[gguf]'") from None
    return gguf


def inspect(path: str | os.PathLike) -> dict:
    """``{"architecture", "tensor_types", "tensors"}`` of a GGUF file (its header only; no weights
    are dequantized). Raises `GGUFError` naming an unsupported architecture or tensor type."""
    gguf = _require_gguf()
    from gguf.quants import _type_traits
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    p = Path(path)
    try:
        reader = gguf.GGUFReader(str(p))
    except Exception as e:  # noqa: BLE001 - numpy/struct errors on a damaged file: one line naming it
        raise GGUFError(f"{p}: not a readable GGUF file ({type(e).__name__}: {e})") from None
    field = reader.fields.get("general.architecture")
    if field is None:
        raise GGUFError(f"{p}: no general.architecture in the GGUF header")
    arch = bytes(field.parts[field.data[0]]).decode("utf-8", "replace")
    known = [a for a in GGUF_SUPPORTED_ARCHITECTURES if a not in ("general", "tokenizer")]
    if arch not in known:
        raise GGUFError(f"{p}: GGUF architecture {arch!r} is not supported (transformers reads: {', '.join(known)})")
    bos = reader.fields.get("tokenizer.ggml.add_bos_token")  # llama.cpp's: does a prompt start with BOS
    add_bos = bool(bos.parts[bos.data[0]][0]) if bos is not None else None
    types = sorted({t.tensor_type.name for t in reader.tensors})
    readable = _PLAIN_TYPES | {t.name for t in _type_traits}
    bad = [t for t in types if t not in readable]
    if bad:
        raise GGUFError(f"{p}: GGUF tensor type {', '.join(bad)} cannot be dequantized (readable: "
                        f"{', '.join(sorted(readable))})")
    return {"architecture": arch, "tensor_types": types, "tensors": len(reader.tensors), "add_bos_token": add_bos}


def cache_root() -> Path:
    return Path(os.environ.get("QTULU_CACHE_DIR", Path.home() / ".cache" / "qtulu")) / "gguf"


def materialize(path: str | os.PathLike, *, trust_remote_code: bool = False) -> tuple[Path, str]:
    """The transformers folder of GGUF file ``path`` and the file's SHA-256, converting it once.

    The folder is ``cache_root()/<sha256>``; a folder whose ``qtulu_gguf.json`` names another hash
    (or none: an interrupted conversion never gets there, it is staged and renamed) is rebuilt."""
    from qtulu.model.base_hash import file_sha256

    p = Path(os.path.expanduser(str(path)))
    if not p.is_file():
        raise GGUFError(f"{p}: GGUF file not found")
    sha = file_sha256(p)
    out = cache_root() / sha
    try:
        if json.loads((out / META).read_text()).get("sha256") == sha:
            return out, sha
    except (OSError, json.JSONDecodeError):
        pass
    header = inspect(p)  # refuse before the (slow) dequantization
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{sha[:12]}-", dir=out.parent))
    stage.chmod(0o755)  # mkdtemp's 0700 would hide the base from other users of a shared cache
    try:
        _convert(p, stage, add_bos=header["add_bos_token"], trust_remote_code=trust_remote_code)
        atomic_write_text(stage / META, json.dumps({"source": str(p.resolve()), "sha256": sha, **header}, indent=1))
        replace_dir(stage, out)
    finally:
        if stage.exists():
            import shutil

            shutil.rmtree(stage, ignore_errors=True)
    return out, sha


def _convert(p: Path, stage: Path, *, add_bos: bool | None, trust_remote_code: bool) -> None:
    """Dequantize ``p`` to float32 with transformers and save a plain transformers folder.

    ``add_bos``: the header's ``tokenizer.ggml.add_bos_token``, written into tokenizer_config.json,
    where qtulu.data.chat.bos_token_id reads it: SmolLM2 names ``<|im_start|>`` its BOS token but
    never starts a prompt with it, and transformers' GGUF tokenizer does not keep that fact."""
    import torch
    from transformers import AutoModelForCausalLM

    from qtulu.data.tokenizer import load_gguf_tokenizer

    kw = {"gguf_file": p.name, "trust_remote_code": trust_remote_code}
    tok = load_gguf_tokenizer(p, trust_remote_code=trust_remote_code)  # with the header's add_bos_token
    try:
        model = AutoModelForCausalLM.from_pretrained(str(p.parent), dtype=torch.float32, **kw)
    except (ValueError, KeyError, NotImplementedError) as e:
        raise GGUFError(f"{p}: transformers cannot read it ({type(e).__name__}: {str(e).splitlines()[0]})") from None
    # the loaded model still calls itself GGUF-quantized; its weights are plain float32 now
    model.config.quantization_config = None
    del model.config.quantization_config
    model.hf_quantizer = None
    model.config._name_or_path = str(p)
    model.save_pretrained(str(stage), safe_serialization=True)
    tok.save_pretrained(str(stage))
    if add_bos is not None:
        cfg_path = stage / "tokenizer_config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg["add_bos_token"] = add_bos
        atomic_write_text(cfg_path, json.dumps(cfg, indent=2))
