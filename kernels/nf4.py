"""NF4 quantization in the bitsandbytes layout, and a matmul that dequantizes inside the GEMM.

One kernel, four places: this module holds the Triton kernels (``_nf4_gemm_kernel``), their
launchers, the autograd registration (``torch.library.custom_op`` + ``register_autograd``) and the
plain-torch reference (``dequantize_nf4`` + ``F.linear``).

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
equality against bitsandbytes on the CPU, both directions.

Shapes: ``x (..., K)`` with ``K = in_features``; ``W (N, K)`` with ``N = out_features``;
``nf4_matmul(x) = x @ W.T + bias`` of shape ``(..., N)``.
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass, replace
from typing import Any, Optional

import torch
import torch.nn.functional as F

from qtulu.backend import resolve_backend

__all__ = [
    "NF4_CODE",
    "NF4State",
    "quantize_nf4",
    "dequantize_nf4",
    "dequantize_absmax",
    "nf4_matmul",
    "nf4_matmul_reference",
    "dynamic_map",
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


# ------------------------------------------------------------------------------------------
# The matmul: torch reference, Triton kernels, custom op + autograd
# ------------------------------------------------------------------------------------------


def nf4_matmul_reference(
    x: torch.Tensor, packed: torch.Tensor, state: NF4State, bias: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """Plain torch: dequantize W to x's dtype, then ``F.linear`` (what bitsandbytes/Unsloth do)."""
    w = dequantize_nf4(packed, state, dtype=x.dtype)  # (N, K)
    return F.linear(x, w, None if bias is None else bias.to(x.dtype))


def _state_args(state: NF4State):
    dev = state.absmax.device
    empty = torch.empty(0, device=dev)
    if state.nested:
        return (state.absmax, state.code, state.offset.reshape(1).float(), state.absmax2, state.code2)
    return (state.absmax, state.code, empty, empty, empty)


def _rebuild_state(absmax, code, offset, absmax2, code2, n: int, k: int, blocksize: int, blocksize2: int):
    nested = absmax.dtype == torch.uint8
    return NF4State(
        absmax=absmax,
        shape=(n, k),
        dtype=torch.float32,
        blocksize=blocksize,
        code=code,
        offset=offset.reshape(()) if nested else None,
        absmax2=absmax2 if nested else None,
        code2=code2 if nested else None,
        blocksize2=blocksize2,
    )


@torch.library.custom_op("qtulu::nf4_matmul", mutates_args=())
def _nf4_matmul_op(
    x: torch.Tensor,
    packed: torch.Tensor,
    absmax: torch.Tensor,
    code: torch.Tensor,
    offset: torch.Tensor,
    absmax2: torch.Tensor,
    code2: torch.Tensor,
    bias: Optional[torch.Tensor],
    out_features: int,
    in_features: int,
    blocksize: int,
    blocksize2: int,
    backend: str,
) -> torch.Tensor:
    # x is 2-D (M, K) here: returning a reshaped (view) output from inside the op would forbid
    # in-place updates of it later (peft's mixed-batch forward adds into the base output)
    x2 = x
    if backend == "triton":
        y = _triton_nf4_gemm(
            x2, packed, absmax, code, offset, absmax2, code2, bias,
            n_out=out_features, k_in=in_features, blocksize=blocksize, blocksize2=blocksize2,
            transpose_w=True,
        )
    else:
        st = _rebuild_state(absmax, code, offset, absmax2, code2, out_features, in_features, blocksize, blocksize2)
        y = nf4_matmul_reference(x2, packed, st, bias)
    return y


@_nf4_matmul_op.register_fake
def _(x, packed, absmax, code, offset, absmax2, code2, bias, out_features, in_features, blocksize, blocksize2, backend):
    return x.new_empty((x.shape[0], out_features))


@torch.library.custom_op("qtulu::nf4_matmul_dx", mutates_args=())
def _nf4_matmul_dx_op(
    grad: torch.Tensor,
    packed: torch.Tensor,
    absmax: torch.Tensor,
    code: torch.Tensor,
    offset: torch.Tensor,
    absmax2: torch.Tensor,
    code2: torch.Tensor,
    out_features: int,
    in_features: int,
    blocksize: int,
    blocksize2: int,
    backend: str,
) -> torch.Tensor:
    """dX = dY @ dequant(W): ``grad (M, N) -> (M, K)``."""
    g2 = grad
    if backend == "triton":
        dx = _triton_nf4_gemm(
            g2, packed, absmax, code, offset, absmax2, code2, None,
            n_out=out_features, k_in=in_features, blocksize=blocksize, blocksize2=blocksize2,
            transpose_w=False,
        )
    else:
        st = _rebuild_state(absmax, code, offset, absmax2, code2, out_features, in_features, blocksize, blocksize2)
        dx = g2 @ dequantize_nf4(packed, st, dtype=grad.dtype)  # (M, K)
    return dx


@_nf4_matmul_dx_op.register_fake
def _(grad, packed, absmax, code, offset, absmax2, code2, out_features, in_features, blocksize, blocksize2, backend):
    return grad.new_empty((grad.shape[0], in_features))


def _setup_context(ctx, inputs, output):
    x, packed, absmax, code, offset, absmax2, code2, bias, n, k, bs, bs2, backend = inputs
    ctx.save_for_backward(packed, absmax, code, offset, absmax2, code2)
    ctx.meta = (n, k, bs, bs2, backend, bias is not None, None if bias is None else bias.dtype)


def _backward(ctx, grad):
    packed, absmax, code, offset, absmax2, code2 = ctx.saved_tensors
    n, k, bs, bs2, backend, has_bias, bias_dtype = ctx.meta
    dx = None
    if ctx.needs_input_grad[0]:
        dx = _nf4_matmul_dx_op(grad, packed, absmax, code, offset, absmax2, code2, n, k, bs, bs2, backend)
    dbias = None
    if has_bias and ctx.needs_input_grad[7]:
        dbias = grad.sum(0).to(bias_dtype)
    return dx, None, None, None, None, None, None, dbias, None, None, None, None, None


_nf4_matmul_op.register_autograd(_backward, setup_context=_setup_context)


def nf4_matmul(
    x: torch.Tensor,
    packed: torch.Tensor,
    state: NF4State,
    bias: Optional[torch.Tensor] = None,
    backend: str = "auto",
) -> torch.Tensor:
    """``x @ dequant(W).T (+ bias)`` for ``x (..., K)`` -> ``(..., N)`` in x's dtype.

    Differentiable in ``x`` (dX = dY @ dequant(W), fused in the Triton path too) and ``bias``.
    ``backend``: "triton" (dequantizes tiles inside the GEMM; CPU tensors need TRITON_INTERPRET=1),
    "torch" (dequantize then ``F.linear``), "auto" (Triton on CUDA, torch elsewhere).
    """
    if not isinstance(state, NF4State):
        state = NF4State.from_bnb(state)
    if len(state.shape) != 2:
        raise ValueError(f"nf4_matmul: the weight must be 2-D (out, in), got shape {tuple(state.shape)}")
    n, k = state.shape
    if x.shape[-1] != k:
        raise ValueError(f"nf4_matmul: x has {x.shape[-1]} features, the weight expects {k}")
    if x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"nf4_matmul: x must be bf16/fp16/fp32, got {x.dtype}")
    if bias is not None and bias.shape != (n,):
        raise ValueError(f"nf4_matmul: bias must have shape ({n},), got {tuple(bias.shape)}")
    resolved = resolve_backend(backend, x, packed)
    y = _nf4_matmul_op(
        x.reshape(-1, k), packed.reshape(-1, 1), *_state_args(state), bias, n, k,
        state.blocksize, state.blocksize2, resolved,
    )  # (M, N)
    return y.reshape(*x.shape[:-1], n)


# ------------------------------------------------------------------------------------------
# Triton: one GEMM kernel C = A @ op(dequant(W)) used for the forward (op = transpose) and for
# dX (op = identity). Built lazily so that importing this module needs no triton.
# ------------------------------------------------------------------------------------------

SMALL_M = 16  # rows up to this use the memory-bound path (one pass over the codes, split-K)


def _interpreting() -> bool:
    from qtulu.backend import triton_interpreting

    return triton_interpreting()


def _m_bucket(m: int) -> int:
    # autotune key: the next power of two, capped, so each M range keeps its own best config
    return min(1 << max(m - 1, 0).bit_length(), 8192)


try:  # optional: the torch path needs no triton
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton is installed on Linux
    triton = None
    tl = None

_KERNELS: dict = {}

if triton is not None:

    @triton.jit
    def _round_bf16(x):
        # fp32 -> fp32 holding the round-to-nearest-even bf16 value. Only used under
        # TRITON_INTERPRET, whose fp32->bf16 cast truncates (GPUs round to nearest even).
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        return bits.to(tl.float32, bitcast=True)

    @triton.jit
    def _nf4_gemm_kernel(
        a_ptr, packed_ptr, absmax_ptr, code_ptr, offset_ptr, absmax2_ptr, code2_ptr, bias_ptr, c_ptr,
        M, N, K, W_COLS, stride_am, stride_cm, M_BUCKET,
        TRANSPOSE_W: tl.constexpr, HAS_BIAS: tl.constexpr, NESTED: tl.constexpr,
        BLOCKSIZE: tl.constexpr, BLOCKSIZE2: tl.constexpr, IEEE: tl.constexpr, ATOMIC: tl.constexpr,
        INTERPRET_BF16: tl.constexpr, INDEX64: tl.constexpr, ALIGNED: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        SPLIT_K: tl.constexpr, GROUP_M: tl.constexpr,
    ):
        # C (M, N) = A (M, K) @ B (K, N), B[k, n] = W[n, k] (TRANSPOSE_W, forward) or W[k, n] (dX).
        # W (rows, W_COLS) is never materialized: each (BLOCK_K, BLOCK_N) tile is dequantized in
        # registers right before the dot. ALIGNED: W_COLS % BLOCKSIZE == 0 (quant blocks never
        # straddle rows); then SCALE_MODE 1/2 below load one absmax per column/row of the tile.
        # (plain constexpr arithmetic: the compiler folds it, so the branches below are static)
        SCALE_MODE: tl.constexpr = ALIGNED * (
            TRANSPOSE_W * (BLOCKSIZE % BLOCK_K == 0) + (1 - TRANSPOSE_W) * (BLOCKSIZE % BLOCK_N == 0) * 2
        )
        pid = tl.program_id(0)
        pid_k = tl.program_id(1)
        num_m = tl.cdiv(M, BLOCK_M)
        num_n = tl.cdiv(N, BLOCK_N)
        # grouped ordering: GROUP_M row-tiles share W tiles in L2
        group = GROUP_M * num_n
        first_m = (pid // group) * GROUP_M
        gm = tl.minimum(num_m - first_m, GROUP_M)
        pid_m = first_m + ((pid % group) % gm)
        pid_n = (pid % group) // gm

        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        if INDEX64:  # 32-bit index math is cheaper; widen only for tensors past 2**31 elements
            offs_m = offs_m.to(tl.int64)
            offs_n = offs_n.to(tl.int64)
        mask_m = offs_m < M
        mask_n = offs_n < N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        if NESTED:
            offset = tl.load(offset_ptr)
        k_per_split = tl.cdiv(tl.cdiv(K, BLOCK_K), SPLIT_K) * BLOCK_K
        k_start = pid_k * k_per_split
        for k0 in range(0, k_per_split, BLOCK_K):
            offs_k = k_start + k0 + tl.arange(0, BLOCK_K)
            mask_k = offs_k < K
            a = tl.load(a_ptr + offs_m[:, None] * stride_am + offs_k[None, :],
                        mask=mask_m[:, None] & mask_k[None, :], other=0.0)  # (BM, BK)
            if TRANSPOSE_W:
                flat = offs_n[None, :] * W_COLS + offs_k[:, None]  # (BK, BN)
            else:
                flat = offs_k[:, None].to(offs_n.dtype) * W_COLS + offs_n[None, :]  # (BK, BN)
            wmask = mask_k[:, None] & mask_n[None, :]
            # dequantize the W tile in registers (inlined: a nested jit call costs a lot under the
            # interpreter). bnb keeps the even flat index in the high nibble.
            byte = tl.load(packed_ptr + (flat >> 1), mask=wmask, other=0).to(tl.int32)
            nib = tl.where((flat & 1) == 0, byte >> 4, byte & 15)
            val = tl.load(code_ptr + nib, mask=wmask, other=0.0)  # 16-entry table, stays in L1
            # the absmax: with aligned quant blocks a tile needs one scale per column (forward)
            # or per row (dX) instead of one gather per element
            if SCALE_MODE == 1:
                blk = (offs_n * W_COLS + (k_start + k0)) // BLOCKSIZE  # (BN,)
                smask = mask_n
            elif SCALE_MODE == 2:
                blk = (offs_k.to(offs_n.dtype) * W_COLS + pid_n * BLOCK_N) // BLOCKSIZE  # (BK,)
                smask = mask_k
            else:
                blk = flat // BLOCKSIZE  # (BK, BN)
                smask = wmask
            if NESTED:
                qa = tl.load(absmax_ptr + blk, mask=smask, other=0).to(tl.int32)
                a2 = tl.load(absmax2_ptr + blk // BLOCKSIZE2, mask=smask, other=0.0)
                scale = tl.load(code2_ptr + qa, mask=smask, other=0.0) * a2 + offset
            else:
                scale = tl.load(absmax_ptr + blk, mask=smask, other=0.0)
            if SCALE_MODE == 1:
                scale = scale[None, :]
            elif SCALE_MODE == 2:
                scale = scale[:, None]
            w = val * scale  # (BK, BN) fp32, rounded once to the activation dtype below, as bnb does
            if INTERPRET_BF16:
                # The interpreter's bf16 dot is wrong (numpy has no bf16): round W to bf16 values
                # (RNE, as the GPU cast does) and multiply in fp32, which is exact for bf16
                # products with fp32 accumulation, i.e. what the tensor cores compute.
                acc += tl.dot(a.to(tl.float32), _round_bf16(w), input_precision="ieee")
            elif IEEE:
                acc += tl.dot(a, w, input_precision="ieee")  # fp32 activations: no TF32, like torch
            else:
                acc += tl.dot(a, w.to(a.dtype))
        if HAS_BIAS:
            b = tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
            acc += tl.where(pid_k == 0, b, 0.0)[None, :]  # split-K: only one split adds the bias
        c_ptrs = c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :]
        cmask = mask_m[:, None] & mask_n[None, :]
        if ATOMIC:
            tl.atomic_add(c_ptrs, acc, mask=cmask)
        else:
            if INTERPRET_BF16:
                acc = _round_bf16(acc)
            tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=cmask)

    key = ["M_BUCKET", "N", "K", "TRANSPOSE_W"]
    if _interpreting():
        # the interpreter runs every candidate: one small config per path keeps CPU tests fast
        # (chosen so that the tests reach every branch: split-K, per-column, per-row and per-element
        # absmax, N and K tails)
        small_cfgs = [triton.Config({"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 64, "SPLIT_K": 2, "GROUP_M": 1})]
        tiled_cfgs = [triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "SPLIT_K": 1, "GROUP_M": 2})]
    else:
        small_cfgs = [
            triton.Config({"BLOCK_M": 16, "BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": sk, "GROUP_M": 1},
                          num_warps=nw, num_stages=ns)
            for bn, bk, sk, nw, ns in [
                (32, 128, 1, 4, 4), (64, 128, 1, 4, 4), (32, 256, 2, 4, 3), (64, 128, 2, 4, 4),
                (64, 256, 4, 4, 3), (128, 128, 4, 8, 3), (32, 128, 4, 4, 4), (128, 64, 8, 4, 4),
                (64, 64, 8, 4, 4), (16, 256, 1, 2, 4), (16, 128, 2, 2, 4),
            ]
        ]
        tiled_cfgs = [
            triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": 1, "GROUP_M": 8},
                          num_warps=nw, num_stages=ns)
            for bm, bn, bk, nw, ns in [
                (128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (256, 128, 64, 8, 3), (128, 128, 32, 4, 4),
                (64, 128, 64, 4, 4), (128, 64, 64, 4, 4), (64, 64, 64, 4, 4), (32, 64, 64, 4, 4),
                (64, 256, 32, 8, 4), (128, 128, 128, 8, 2),
            ]
        ]
    small = triton.autotune(configs=small_cfgs, key=key, reset_to_zero=["c_ptr"])(_nf4_gemm_kernel)
    tiled = triton.autotune(configs=tiled_cfgs, key=key)(_nf4_gemm_kernel)
    _KERNELS = {"small": small, "tiled": tiled}




def _triton_nf4_gemm(
    a: torch.Tensor,
    packed: torch.Tensor,
    absmax: torch.Tensor,
    code: torch.Tensor,
    offset: torch.Tensor,
    absmax2: torch.Tensor,
    code2: torch.Tensor,
    bias: Optional[torch.Tensor],
    *,
    n_out: int,
    k_in: int,
    blocksize: int,
    blocksize2: int,
    transpose_w: bool,
) -> torch.Tensor:
    """Launch the Triton GEMM. Forward (``transpose_w``): ``a (M, k_in) -> (M, n_out)``;
    dX: ``a (M, n_out) -> (M, k_in)``. Output in a's dtype."""
    if triton is None:
        raise RuntimeError("backend='triton' needs the `triton` package: pip install triton")
    ks = _KERNELS
    a = a.contiguous()
    m = a.shape[0]
    n, k = (n_out, k_in) if transpose_w else (k_in, n_out)
    nested = absmax.dtype == torch.uint8
    if not nested:  # the kernel never reads them, but it needs valid pointers
        offset = absmax2 = code2 = absmax
    small = m <= SMALL_M
    c = torch.zeros((m, n), device=a.device, dtype=torch.float32) if small else torch.empty(
        (m, n), device=a.device, dtype=a.dtype
    )
    if m == 0:
        return c.to(a.dtype)
    kernel = ks["small"] if small else ks["tiled"]

    def grid(meta):
        return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]), meta["SPLIT_K"])

    kernel[grid](
        a, packed, absmax, code, offset, absmax2, code2, bias if bias is not None else a, c,
        m, n, k, k_in, a.stride(0), c.stride(0), _m_bucket(m),
        TRANSPOSE_W=transpose_w, HAS_BIAS=bias is not None, NESTED=nested,
        BLOCKSIZE=blocksize, BLOCKSIZE2=blocksize2, IEEE=a.dtype == torch.float32, ATOMIC=small,
        INTERPRET_BF16=a.dtype == torch.bfloat16 and not a.is_cuda,
        INDEX64=max(a.numel(), c.numel(), n * k, 2 * packed.numel()) >= 2**31 - 1,
        ALIGNED=k_in % blocksize == 0,
        # no mul+add -> fma contraction: the absmax must round exactly like bnb's (mul, then add)
        enable_fp_fusion=False,
    )
    return c.to(a.dtype) if small else c
