"""NF4 in bitsandbytes' layout: the code tables, :class:`NF4State`, quantize and dequantize.

Format (bitsandbytes 0.50 ``quantize_4bit(..., quant_type="nf4")``, bit for bit):

* the weight ``(out, in)`` is flattened row-major and cut into blocks of ``blocksize`` values (the
  last block may be short); each block is scaled by its absmax and every value is rounded to the
  nearest of the 16 NF4 code values (``bucketize`` on the code midpoints, as bnb's CPU/default
  backend does; an all-zero block gets absmax 0 and code 7 (= 0.0));
* two 4-bit codes per uint8, the EVEN flat index in the HIGH nibble; ``packed`` has shape
  ``(ceil(n / 2), 1)`` (an odd ``n`` is padded with one zero nibble);
* with double quantization the fp32 absmax vector is centred on its mean (``offset``) and
  quantized blockwise (256 per block) to uint8 with bnb's signed dynamic 8-bit map; the second
  level keeps one fp32 absmax per 256 first-level blocks (``absmax2``).

Why not call bitsandbytes for the quantization: its kernels are per-device native libraries
(and its CPU and CUDA builds even round the 8-bit absmax differently); qtulu needs the same bits
from any device torch runs on, without loading bnb's native library. The tests check
equality against bitsandbytes on the CPU, both directions. The matmul lives in
:mod:`qtulu.kernels.nf4`, which re-exports everything here.
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass, replace
from typing import Any, Optional

import torch
import torch.nn.functional as F

__all__ = [
    "NF4_CODE",
    "VALID_BLOCKSIZES",
    "NESTED_BLOCKSIZE",
    "NF4State",
    "bnb_codes_and_state",
    "nf4_code",
    "dynamic_map",
    "quantize_nf4",
    "dequantize_absmax",
    "dequantize_nf4",
]


# bitsandbytes' NF4 table (QLoRA appendix; bitsandbytes.functional.get_4bit_type("nf4")).
NF4_CODE = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)
VALID_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
NESTED_BLOCKSIZE = 256  # bnb's fixed blocksize for the second-level (absmax) quantization


@functools.lru_cache(maxsize=None)
def _nf4_code_cpu() -> torch.Tensor:
    return torch.tensor(NF4_CODE, dtype=torch.float32)


def nf4_code(device: torch.device | str | None = None) -> torch.Tensor:
    """The 16 NF4 values, fp32, on ``device``."""
    return _nf4_code_cpu().to(device or "cpu", copy=True)


@functools.lru_cache(maxsize=None)
def _dynamic_map_cpu() -> torch.Tensor:
    # Port of bitsandbytes.functional.create_dynamic_map(signed=True, max_exponent_bits=7,
    # total_bits=8): the 256-entry map bnb uses for the nested absmax.
    data: list[float] = []
    max_exponent_bits, non_sign_bits = 7, 7
    additional_items = 2 ** (non_sign_bits - max_exponent_bits) - 1
    for i in range(max_exponent_bits):
        fraction_items = int(2 ** (i + non_sign_bits - max_exponent_bits) + 1)
        boundaries = torch.linspace(0.1, 1, fraction_items, dtype=torch.float32)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        data += ((10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
        data += (-(10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
    if additional_items > 0:  # pragma: no cover - zero for the signed 8-bit map
        raise AssertionError("unreachable for the signed 8-bit map")
    data.append(0)
    data.append(1.0)
    data += [0] * (256 - len(data))
    data.sort()
    return torch.tensor(data, dtype=torch.float32)


def dynamic_map(device: torch.device | str | None = None) -> torch.Tensor:
    """bitsandbytes' signed dynamic 8-bit map (256 fp32 values), used for the nested absmax."""
    return _dynamic_map_cpu().to(device or "cpu", copy=True)


@functools.lru_cache(maxsize=8)
def _quantize_lut(code_key: tuple[float, ...]) -> torch.Tensor:
    # bitsandbytes 0.50's 8-bit blockwise quantizer maps x/absmax in [-1, 1] to one of 65536
    # bins and looks the code index up in a table of "number of code midpoints below the bin
    # value" (csrc/cpu_ops.cpp: build_quantize_lut, norm_to_lut_index). Reproduced in fp32.
    code = torch.tensor(code_key, dtype=torch.float32)
    mid = 0.5 * (code[:-1] + code[1:])  # (255,)
    i = torch.arange(65536, dtype=torch.float32)
    val = -1.0 + (2.0 * i) / 65535.0
    return torch.searchsorted(mid, val, right=False).to(torch.uint8)  # (65536,)


def _quantize_blockwise_8bit(a: torch.Tensor, code: torch.Tensor, blocksize: int):
    """bnb's ``quantize_blockwise`` (8-bit, dynamic map) on a 1-D fp32 tensor -> (uint8, absmax)."""
    a = a.reshape(-1).float()
    n = a.numel()
    nb = -(-n // blocksize)
    blocks = F.pad(a, (0, nb * blocksize - n)).view(nb, blocksize)  # (nb, bs)
    absmax = blocks.abs().amax(dim=1)  # (nb,)
    lut = _quantize_lut(tuple(code.float().cpu().tolist())).to(a.device)
    scaled = (blocks * (1.0 / absmax)[:, None]).clamp(-1.0, 1.0)
    # fp32 math in the order bnb does it; the cast truncates like C's (uint16_t) cast
    idx = ((scaled + 1.0) * 0.5 * 65535.0 + 0.5).nan_to_num(0.0).to(torch.int64)
    q = lut[idx]
    q = torch.where((absmax == 0)[:, None], torch.zeros_like(q), q)  # bnb writes 0 for a zero block
    return q.reshape(-1)[:n].contiguous(), absmax


@dataclass
class NF4State:
    """Everything needed to dequantize an NF4 weight (bnb's ``QuantState`` for nf4, flattened).

    ``absmax`` is fp32 ``(n_blocks,)``, or uint8 when double-quantized, in which case ``offset``
    (fp32 scalar), ``absmax2`` (fp32, one per 256 blocks) and ``code2`` (the 256-entry dynamic
    map) are set. ``dtype`` is the original weight's dtype (the default dequantization dtype).
    """

    absmax: torch.Tensor
    shape: torch.Size
    dtype: torch.dtype
    blocksize: int = 64
    code: Optional[torch.Tensor] = None
    offset: Optional[torch.Tensor] = None
    absmax2: Optional[torch.Tensor] = None
    code2: Optional[torch.Tensor] = None
    blocksize2: int = NESTED_BLOCKSIZE

    def __post_init__(self):
        self.shape = torch.Size(self.shape)
        if self.code is None:
            self.code = nf4_code(self.absmax.device)
        if self.blocksize not in VALID_BLOCKSIZES:
            raise ValueError(f"NF4State: blocksize must be one of {VALID_BLOCKSIZES}, got {self.blocksize}")
        parts = (self.offset is None, self.absmax2 is None, self.code2 is None)
        if len(set(parts)) != 1:
            raise ValueError("NF4State: offset, absmax2 and code2 must be all set (double quant) or all None")
        if self.nested and self.absmax.dtype != torch.uint8:
            raise ValueError(f"NF4State: nested absmax must be uint8, got {self.absmax.dtype}")
        if not self.nested and self.absmax.dtype != torch.float32:
            raise ValueError(f"NF4State: absmax must be float32, got {self.absmax.dtype}")
        if self.absmax.numel() != self.n_blocks:
            raise ValueError(
                f"NF4State: {self.absmax.numel()} absmax values for shape {tuple(self.shape)} and "
                f"blocksize {self.blocksize} (expected {self.n_blocks})"
            )

    @property
    def nested(self) -> bool:
        return self.absmax2 is not None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def n_blocks(self) -> int:
        return -(-self.numel // self.blocksize)

    @property
    def device(self) -> torch.device:
        return self.absmax.device

    def to(self, device: torch.device | str) -> "NF4State":
        """A copy with every tensor on ``device``."""
        mv = lambda t: None if t is None else t.to(device)  # noqa: E731
        return replace(
            self,
            absmax=self.absmax.to(device),
            code=mv(self.code),
            offset=mv(self.offset),
            absmax2=mv(self.absmax2),
            code2=mv(self.code2),
        )

    # --- bitsandbytes interop -------------------------------------------------------------
    def to_bnb(self):
        """The equivalent ``bitsandbytes.functional.QuantState`` (shares the tensors)."""
        from bitsandbytes.functional import QuantState

        state2 = None
        if self.nested:
            state2 = QuantState(
                absmax=self.absmax2, code=self.code2, blocksize=self.blocksize2, dtype=torch.float32
            )
        return QuantState(
            absmax=self.absmax,
            shape=torch.Size(self.shape),
            code=self.code,
            blocksize=self.blocksize,
            quant_type="nf4",
            dtype=self.dtype,
            offset=self.offset,
            state2=state2,
        )

    @classmethod
    def from_bnb(cls, qs: Any) -> "NF4State":
        """Build from a bitsandbytes ``QuantState`` (nf4 only; raises ``ValueError`` otherwise)."""
        if getattr(qs, "quant_type", None) != "nf4":
            raise ValueError(f"NF4State.from_bnb: quant_type must be 'nf4', got {getattr(qs, 'quant_type', None)!r}")
        if qs.shape is None:
            raise ValueError("NF4State.from_bnb: the QuantState has no shape")
        if getattr(qs, "packing_format_for_cpu", False):
            raise ValueError("NF4State.from_bnb: bitsandbytes repacked this state for its CPU kernel; "
                             "read it with bnb_codes_and_state(codes, quant_state)")
        code = qs.code.float()
        if not torch.equal(code.cpu(), _nf4_code_cpu()):
            raise ValueError("NF4State.from_bnb: the QuantState's code is not bitsandbytes' NF4 table")
        if qs.nested:
            s2 = qs.state2
            offset = torch.as_tensor(qs.offset, dtype=torch.float32, device=qs.absmax.device)
            return cls(
                absmax=qs.absmax,
                shape=qs.shape,
                dtype=qs.dtype,
                blocksize=int(qs.blocksize),
                code=code,
                offset=offset.reshape(()),
                absmax2=s2.absmax.float(),
                code2=s2.code.float(),
                blocksize2=int(s2.blocksize),
            )
        return cls(absmax=qs.absmax.float(), shape=qs.shape, dtype=qs.dtype, blocksize=int(qs.blocksize), code=code)

    # --- serialization in bnb's state-dict layout ------------------------------------------
    def as_tensors(self) -> dict[str, torch.Tensor]:
        """Tensors keyed like bnb's ``QuantState.as_dict(packed=True)`` (safetensors-friendly)."""
        meta: dict[str, Any] = {
            "quant_type": "nf4",
            "blocksize": self.blocksize,
            "dtype": str(self.dtype).removeprefix("torch."),
            "shape": list(self.shape),
        }
        out = {"absmax": self.absmax, "quant_map": self.code}
        if self.nested:
            out["nested_absmax"] = self.absmax2
            out["nested_quant_map"] = self.code2.clone()
            meta.update(
                nested_blocksize=self.blocksize2,
                nested_dtype="float32",
                nested_offset=float(self.offset.item()),
            )
        out["quant_state.bitsandbytes__nf4"] = torch.tensor(
            list(json.dumps(meta).encode("utf-8")), dtype=torch.uint8
        )
        return out

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], *, where: str = "state dict") -> "NF4State":
        """Inverse of :meth:`as_tensors`; ``where`` names the source in error messages."""
        key = "quant_state.bitsandbytes__nf4"
        for required in ("absmax", "quant_map", key):
            if required not in tensors:
                raise KeyError(f"{where}: missing NF4 entry {required!r}")
        try:
            meta = json.loads(bytes(tensors[key].cpu().tolist()).decode("utf-8"))
        except (ValueError, UnicodeDecodeError) as err:
            raise ValueError(f"{where}: unreadable {key!r}: {err}") from None
        if meta.get("quant_type") != "nf4":
            raise ValueError(f"{where}: quant_type must be 'nf4', got {meta.get('quant_type')!r}")
        nested = "nested_absmax" in tensors
        dev = tensors["absmax"].device
        return cls(
            absmax=tensors["absmax"],
            shape=torch.Size(meta["shape"]),
            dtype=getattr(torch, meta["dtype"]),
            blocksize=int(meta["blocksize"]),
            code=tensors["quant_map"].float(),
            offset=torch.tensor(float(meta["nested_offset"]), device=dev) if nested else None,
            absmax2=tensors["nested_absmax"].float() if nested else None,
            code2=tensors["nested_quant_map"].float() if nested else None,
            blocksize2=int(meta.get("nested_blocksize", NESTED_BLOCKSIZE)),
        )


# bitsandbytes' CPU GEMM tile: rows are interleaved in groups of 32 (functional.py, block_n=32)
_BNB_CPU_BLOCK_N = 32


def bnb_codes_and_state(codes: torch.Tensor, qs: Any) -> tuple[torch.Tensor, NF4State, bool]:
    """The codes, in the layout above, and :class:`NF4State` of a bitsandbytes NF4 weight
    (``Params4bit.data`` and its ``quant_state``); the flag says whether bitsandbytes had repacked
    them for its CPU kernel, in which case the codes are a new tensor.

    bitsandbytes (0.48 and later) on a CPU with AVX512-BF16 rewrites a ``Linear4bit`` in place at its
    first forward in eval mode without grad (``functional._convert_weight_packed_for_cpu``): codes
    interleaved in tiles of 32 rows, absmax transposed to ``(in / blocksize, out)`` and rounded to
    bfloat16, double quantization undone. bnb's own inverse re-quantizes the absmax around a new
    mean and leaves a single-level absmax transposed, so it is not used: here the tile permutation
    is undone exactly and the bf16 absmax is kept, i.e. the weights bnb now computes with (which
    differ from the checkpoint's by that rounding).
    """
    if not getattr(qs, "packing_format_for_cpu", False):
        return codes, NF4State.from_bnb(qs), False
    if getattr(qs, "quant_type", None) != "nf4":
        raise ValueError(f"bnb_codes_and_state: quant_type must be 'nf4', got {getattr(qs, 'quant_type', None)!r}")
    tiles = codes.view(torch.uint8) if codes.dtype != torch.uint8 else codes
    n_out, half = tiles.shape
    b = _BNB_CPU_BLOCK_N
    pairs = tiles.reshape(-1, b)  # per 64 codes: the low nibbles hold the first 32, the high ones the last 32
    unpacked = torch.cat([pairs & 0xF, pairs >> 4], dim=-1)
    unpacked = unpacked.reshape(n_out // b, half, b, 2).transpose(1, 2).reshape(-1)  # (out, in), row-major
    std = ((unpacked[0::2] << 4) | unpacked[1::2]).to(torch.uint8).reshape(-1, 1)
    state = NF4State(
        absmax=qs.absmax.t().reshape(-1).float().contiguous(),
        shape=qs.shape,
        dtype=getattr(qs, "original_dtype", qs.dtype),
        blocksize=int(qs.blocksize),
        code=qs.code.float(),
    )
    return std, state, True


def quantize_nf4(
    weight: torch.Tensor, blocksize: int = 64, double_quant: bool = True
) -> tuple[torch.Tensor, NF4State]:
    """Quantize ``weight`` (any shape; bf16/fp16/fp32) to NF4 in bitsandbytes' layout.

    Returns ``(packed, state)``: ``packed`` is uint8 ``(ceil(n / 2), 1)``, two codes per byte, the
    even flat index in the high nibble. Bit-identical to
    ``bitsandbytes.functional.quantize_4bit(weight, blocksize, quant_type="nf4",
    compress_statistics=double_quant)`` on the CPU.
    """
    if weight.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"quantize_nf4: weight must be bf16/fp16/fp32, got {weight.dtype}")
    if blocksize not in VALID_BLOCKSIZES:
        raise ValueError(f"quantize_nf4: blocksize must be one of {VALID_BLOCKSIZES}, got {blocksize}")
    if weight.numel() == 0:
        raise ValueError("quantize_nf4: empty weight")
    dev = weight.device
    code = nf4_code(dev)
    flat = weight.detach().reshape(-1).float()
    n = flat.numel()
    nb = -(-n // blocksize)
    blocks = F.pad(flat, (0, nb * blocksize - n)).view(nb, blocksize)  # (nb, bs); zero pad keeps absmax
    absmax = blocks.abs().amax(dim=1)  # (nb,)
    # Same ops and order as bnb's default quantize_4bit (x * (1 / absmax), clamp, bucketize on
    # the fp32 midpoints): identical results, NaN and zero blocks included.
    scaled = torch.clamp(blocks * (1.0 / absmax.clamp(min=1e-38))[:, None], -1, 1).reshape(-1)[:n]
    if n % 2:
        scaled = F.pad(scaled, (0, 1))
    bounds = (code[:-1] + code[1:]) / 2  # (15,)
    q = torch.bucketize(scaled, bounds, out_int32=True).to(torch.uint8)
    packed = ((q[0::2] << 4) | q[1::2]).unsqueeze(1)  # (ceil(n/2), 1)
    del q, scaled, blocks
    if not double_quant:
        return packed, NF4State(absmax=absmax, shape=weight.shape, dtype=weight.dtype, blocksize=blocksize, code=code)
    offset = absmax.mean()
    code2 = dynamic_map(dev)
    qabsmax, absmax2 = _quantize_blockwise_8bit(absmax - offset, code2, NESTED_BLOCKSIZE)
    state = NF4State(
        absmax=qabsmax,
        shape=weight.shape,
        dtype=weight.dtype,
        blocksize=blocksize,
        code=code,
        offset=offset,
        absmax2=absmax2,
        code2=code2,
    )
    return packed, state


def dequantize_absmax(state: NF4State) -> torch.Tensor:
    """The fp32 per-block absmax ``(n_blocks,)`` (undoes double quantization like bnb does)."""
    if not state.nested:
        return state.absmax
    n = state.absmax.numel()
    nb2 = -(-n // state.blocksize2)
    vals = state.code2[state.absmax.long()]  # (n,)
    vals = F.pad(vals, (0, nb2 * state.blocksize2 - n)).view(nb2, state.blocksize2)
    vals = (vals * state.absmax2[:, None]).reshape(-1)[:n]
    return vals + state.offset


def dequantize_nf4(packed: torch.Tensor, state: NF4State, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Dequantize to ``state.shape`` in ``dtype`` (default: the original weight's dtype).

    Identical to ``bitsandbytes.functional.dequantize_4bit(packed, state.to_bnb())``: the product
    code * absmax is computed in fp32, then rounded once to ``dtype``.
    """
    if not isinstance(state, NF4State):  # a bitsandbytes QuantState
        state = NF4State.from_bnb(state)
    dtype = dtype or state.dtype
    p = packed.reshape(-1)
    if p.dtype != torch.uint8:
        p = p.view(torch.uint8)
    n = state.numel
    if p.numel() != (n + 1) // 2:
        raise ValueError(f"dequantize_nf4: {p.numel()} packed bytes for shape {tuple(state.shape)}")
    # one gather through a (256, 2) table "byte -> (high value, low value)": fewer passes over
    # the codes than shift / mask / interleave / gather
    idx = torch.arange(256, device=p.device)
    code = state.code.to(p.device)
    pair = torch.stack((code[idx >> 4], code[idx & 15]), dim=1)  # (256, 2) fp32
    vals = pair.index_select(0, p.int()).view(-1)  # (2 * ceil(n / 2),) fp32
    absmax = dequantize_absmax(state).to(p.device)
    nb = state.n_blocks
    if vals.numel() != nb * state.blocksize:  # a short last block (and maybe a pad nibble)
        vals = F.pad(vals[:n], (0, nb * state.blocksize - n))
    out = (vals.view(nb, state.blocksize) * absmax[:, None]).view(-1)[:n]
    return out.reshape(state.shape).to(dtype)
