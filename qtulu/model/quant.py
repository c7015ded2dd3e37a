"""NF4 (4-bit) Linear layers: the frozen QLoRA base, in bitsandbytes' layout.

``Linear4bit`` holds the packed NF4 codes and an :class:`~qtulu.kernels.nf4.NF4State` and runs
:func:`~qtulu.kernels.nf4.nf4_matmul` (Triton on CUDA: tiles of W are dequantized inside the
GEMM, no bf16 copy of the weight ever exists; plain torch elsewhere).

How peft wraps it: ``Linear4bit`` subclasses ``nn.Linear``. peft's ``target_modules="all-linear"``
selects modules by ``isinstance(m, nn.Linear)`` and its default dispatcher wraps any
``nn.Linear`` with ``lora.Linear``, whose forward calls ``base_layer(x)`` and adds the LoRA term
(mixed-adapter batches, ``adapter_names=``, included). This works with a plain ``LoraConfig``;
the alternative, ``LoraConfig._register_custom_module``, is experimental and would have to be
remembered by every caller building a config, and "all-linear" would not select the layer at all.
``weight`` is the packed uint8 tensor (frozen), so nothing can mistake it for a float weight.
peft's own ``merge``/``merge_and_unload`` would add a float delta to those codes: it is refused
with a clear error (``MergeNotSupportedError``, see ``_PackedNF4``); qtulu merges by dequantize-then-merge
(``qtulu.adapters.merge``) instead.
"""

from __future__ import annotations

import re
from typing import Iterable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from qtulu.errors import QtuluError
from qtulu.kernels.nf4 import NF4State, bnb_codes_and_state, dequantize_nf4, nf4_matmul, quantize_nf4

__all__ = ["Linear4bit", "quantize_model_", "is_quantized", "MergeNotSupportedError"]


class MergeNotSupportedError(QtuluError, RuntimeError):
    """peft's in-place merge into an NF4 weight was attempted."""


_MERGE_MSG = (
    "peft cannot merge a LoRA adapter into qtulu's 4-bit Linear4bit in place (the weight holds packed "
    "NF4 codes, not floats). Use qtulu.adapters.merge.export_merged (dequantize-then-merge) or merge into a model "
    "loaded with quantize=None."
)


_INPLACE_ARITH = frozenset(
    {"add_", "sub_", "mul_", "div_", "addmm_", "__iadd__", "__isub__", "__imul__", "__itruediv__", "lerp_"}
)


class _PackedNF4(nn.Parameter):
    """The packed NF4 codes as a frozen Parameter that refuses float arithmetic in place.

    peft's ``lora.Linear.merge`` does ``base_layer.weight.data += delta`` (or clones ``.data`` and
    adds): on plain uint8 codes that fails with an opaque broadcast error (or, for an unlucky
    shape, corrupts them). ``.data`` and ``.clone()`` keep this type, and in-place arithmetic
    raises :class:`MergeNotSupportedError` naming the way to merge. Every other op runs on the
    plain tensor and returns plain tensors.
    """

    def __new__(cls, data: torch.Tensor, requires_grad: bool = False):
        # requires_grad is accepted (Parameter.__deepcopy__ passes it) but the codes stay frozen
        if isinstance(data, _PackedNF4):
            with torch._C.DisableTorchFunctionSubclass():
                data = data.detach()  # a plain Tensor (Parameter.__new__ wants detach() to keep the type)
        return super().__new__(cls, data, requires_grad=False)

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in _INPLACE_ARITH:
            raise MergeNotSupportedError(_MERGE_MSG)
        with torch._C.DisableTorchFunctionSubclass():
            out = func(*args, **(kwargs or {}))
        if name in ("__get__", "clone") and isinstance(out, torch.Tensor) and out.dtype == torch.uint8:
            out = out.as_subclass(cls)  # `.data` / `.data.clone()`: keep the guard (peft's merge)
        return out


class Linear4bit(nn.Linear):
    """A frozen ``nn.Linear`` whose weight is NF4 (bitsandbytes layout), optionally with bias.

    Attributes: ``in_features``, ``out_features``, ``bias`` (float Parameter or None),
    ``compute_dtype`` (activations are cast to it for the matmul, the output is cast back; None =
    the input's dtype), ``backend`` ("auto" | "triton" | "torch"), ``weight`` (uint8 packed
    codes ``(ceil(out*in/2), 1)``, frozen) and ``quant_state`` (:class:`NF4State`).

    The state dict uses bitsandbytes' keys (``weight``, ``weight.absmax``, ``weight.quant_map``,
    ``weight.nested_absmax``, ``weight.nested_quant_map``,
    ``weight.quant_state.bitsandbytes__nf4``): all tensors, so a quantized model saves as
    safetensors and loads back into a skeleton built with the same shapes.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        blocksize: int = 64,
        double_quant: bool = True,
        compute_dtype: Optional[torch.dtype] = None,
        backend: str = "auto",
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.bfloat16,
    ) -> None:
        """An empty (all-zero codes) layer of the given shape, to be filled by ``load_state_dict``;
        use :meth:`from_linear` / :meth:`from_bnb` to quantize a real weight. ``dtype`` is the
        bias dtype and the state's nominal original dtype."""
        nn.Module.__init__(self)
        self._dense = None  # the dequantized weight while qtulu.model.dense_cache holds it
        self.in_features = int(in_features)
        self.out_features = int(out_features)
        self.compute_dtype = compute_dtype
        self.backend = backend
        n = self.in_features * self.out_features
        nb = -(-n // blocksize)
        packed = torch.zeros(((n + 1) // 2, 1), dtype=torch.uint8, device=device)
        if double_quant:
            state = NF4State(
                absmax=torch.zeros(nb, dtype=torch.uint8, device=device),
                shape=(self.out_features, self.in_features),
                dtype=dtype,
                blocksize=blocksize,
                offset=torch.zeros((), device=device),
                absmax2=torch.zeros(-(-nb // 256), device=device),
                code2=torch.zeros(256, device=device),
            )
        else:
            state = NF4State(
                absmax=torch.zeros(nb, device=device),
                shape=(self.out_features, self.in_features),
                dtype=dtype,
                blocksize=blocksize,
            )
        self._set_weight(packed, state)
        if bias:
            self.bias = nn.Parameter(torch.zeros(self.out_features, dtype=dtype, device=device))
        else:
            self.register_parameter("bias", None)

    # --- construction -----------------------------------------------------------------------
    def _set_weight(self, packed: torch.Tensor, state: NF4State) -> None:
        if tuple(state.shape) != (self.out_features, self.in_features):
            raise ValueError(
                f"Linear4bit: quant state shape {tuple(state.shape)} != (out, in) = "
                f"({self.out_features}, {self.in_features})"
            )
        if packed.dtype != torch.uint8:
            packed = packed.view(torch.uint8)
        packed = packed.reshape(-1, 1)
        if packed.shape[0] != (state.numel + 1) // 2:
            raise ValueError(f"Linear4bit: {packed.shape[0]} packed bytes for {state.numel} weights")
        self.weight = _PackedNF4(packed)
        self.quant_state = state.to(packed.device)

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        *,
        blocksize: int = 64,
        double_quant: bool = True,
        compute_dtype: Optional[torch.dtype] = None,
        backend: str = "auto",
    ) -> "Linear4bit":
        """Quantize ``linear.weight`` (on its device) into a new ``Linear4bit``; the bias is kept."""
        if not isinstance(linear, nn.Linear) or isinstance(linear, Linear4bit):
            raise TypeError(f"Linear4bit.from_linear: expected an nn.Linear, got {type(linear).__name__}")
        w = linear.weight.detach()
        packed, state = quantize_nf4(w, blocksize=blocksize, double_quant=double_quant)
        mod = cls.__new__(cls)
        nn.Module.__init__(mod)
        mod._dense = None  # the dequantized weight while qtulu.model.dense_cache holds it
        mod.in_features, mod.out_features = linear.in_features, linear.out_features
        mod.compute_dtype = compute_dtype
        mod.backend = backend
        mod._set_weight(packed, state)
        if linear.bias is not None:
            mod.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=linear.bias.requires_grad)
        else:
            mod.register_parameter("bias", None)
        return mod

    @classmethod
    def from_bnb(cls, bnb_linear, *, backend: str = "auto") -> "Linear4bit":
        """Wrap the codes of a quantized ``bitsandbytes.nn.Linear4bit`` (NF4) without copying them:
        the same bits, so adapters trained on either base are interchangeable. A layer that
        bitsandbytes repacked for its CPU kernel is read back exactly as it now computes
        (:func:`~qtulu.kernels.nf4.bnb_codes_and_state`; new tensors, ``bnb_cpu_repacked`` set)."""
        weight = getattr(bnb_linear, "weight", None)
        qs = getattr(weight, "quant_state", None)
        if qs is None:
            raise ValueError(
                "Linear4bit.from_bnb: the bitsandbytes layer is not quantized yet (its Params4bit has no "
                "quant_state; bitsandbytes quantizes when the layer is moved to a device)"
            )
        codes, state, repacked = bnb_codes_and_state(weight.data, qs)
        mod = cls.__new__(cls)
        nn.Module.__init__(mod)
        mod._dense = None  # the dequantized weight while qtulu.model.dense_cache holds it
        mod.in_features, mod.out_features = int(state.shape[1]), int(state.shape[0])
        mod.compute_dtype = getattr(bnb_linear, "compute_dtype", None)
        mod.backend = backend
        mod._set_weight(codes, state)
        mod.bnb_cpu_repacked = repacked  # see bnb_codes_and_state: the absmax is bnb's bf16 rounding
        if bnb_linear.bias is not None:
            mod.bias = nn.Parameter(bnb_linear.bias.detach().clone(), requires_grad=bnb_linear.bias.requires_grad)
        else:
            mod.register_parameter("bias", None)
        return mod

    # --- use --------------------------------------------------------------------------------
    def dequantize(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """The dequantized weight ``(out, in)`` in ``dtype`` (default: the original weight's)."""
        return dequantize_nf4(self.weight, self.quant_state, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        inp_dtype = x.dtype
        if self.compute_dtype is not None:
            x = x.to(self.compute_dtype)
        elif not x.is_floating_point():
            raise TypeError(f"Linear4bit: input must be floating point, got {x.dtype}")
        bias = None if self.bias is None else self.bias.to(x.dtype)
        dense = getattr(self, "_dense", None)  # set by qtulu.model.dense_cache on CPU runs
        if dense is not None and dense.dtype == x.dtype and dense.device == x.device:
            out = F.linear(x, dense, bias)  # = nf4_matmul's torch path without dequantizing again
        else:
            out = nf4_matmul(x, self.weight, self.quant_state, bias, backend=self.backend)
        return out.to(inp_dtype)

    def extra_repr(self) -> str:
        s = self.quant_state
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"nf4 blocksize={s.blocksize}, double_quant={s.nested}, compute_dtype={self.compute_dtype}"
        )

    # --- device moves: the state follows the codes' device, and is never dtype-cast ----------
    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        if self.quant_state.device != self.weight.device:
            self.quant_state = self.quant_state.to(self.weight.device)
        return self

    # --- state dict in bitsandbytes' layout ---------------------------------------------------
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        for k, v in self.quant_state.as_tensors().items():
            destination[prefix + "weight." + k] = v if keep_vars else v.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        wkey = prefix + "weight"
        sub = {k[len(wkey) + 1 :]: v for k, v in state_dict.items() if k.startswith(wkey + ".")}
        if wkey in state_dict and sub:
            dev = self.weight.device
            try:
                state = NF4State.from_tensors({k: v.to(dev) for k, v in sub.items()}, where=f"state dict key {wkey!r}")
                self._set_weight(state_dict[wkey].to(dev), state)
            except (KeyError, ValueError) as err:
                error_msgs.append(f"{wkey}: {err}")
                return
        elif wkey in state_dict and not sub:
            error_msgs.append(
                f"{wkey}: no NF4 quant state ({wkey}.absmax, ...) in the state dict: is this an unquantized checkpoint?"
            )
            return
        # bias (and a 'weight' already replaced above, copied onto itself) go the usual way
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
        # nn.Module flags dotted keys under a Parameter ("weight.absmax") as unexpected: they are ours
        ours = {wkey + "." + k for k in sub}
        unexpected_keys[:] = [k for k in unexpected_keys if k not in ours]


def is_quantized(model: nn.Module) -> bool:
    """True when ``model`` contains at least one :class:`Linear4bit`."""
    return any(isinstance(m, Linear4bit) for m in model.modules())


def _skipped(name: str, skip: Iterable[str]) -> bool:
    # an entry matches the full dotted name, its last component, or (as a regex) the full name
    last = name.rsplit(".", 1)[-1]
    for pat in skip:
        if name == pat or last == pat or name.endswith("." + pat) or re.fullmatch(pat, name):
            return True
    return False


def quantize_model_(
    model: nn.Module,
    *,
    skip: Iterable[str] = ("lm_head",),
    blocksize: int = 64,
    double_quant: bool = True,
    compute_dtype: Optional[torch.dtype] = None,
    backend: str = "auto",
    progress: bool = False,
) -> nn.Module:
    """Replace every ``nn.Linear`` of ``model`` (except names in ``skip``) by a
    :class:`Linear4bit`, in place, one layer at a time; each float weight is freed as soon as its
    layer is quantized (unless it is shared with another module, e.g. tied embeddings).

    Returns ``model``, with ``model.qtulu_quantization`` set to the settings used.
    """
    skip = tuple(skip)
    refs: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        refs[id(p)] = refs.get(id(p), 0) + 1
    targets = [
        (name, mod)
        for name, mod in model.named_modules()
        if isinstance(mod, nn.Linear) and not isinstance(mod, Linear4bit) and name and not _skipped(name, skip)
    ]
    it = targets
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(targets, desc="quantize nf4", unit="layer")
    for name, lin in it:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        q = Linear4bit.from_linear(
            lin, blocksize=blocksize, double_quant=double_quant, compute_dtype=compute_dtype, backend=backend
        )
        setattr(parent, child, q)
        if refs.get(id(lin.weight), 1) == 1:
            # free the float weight now, even if a caller still holds the old module
            lin.weight.data = torch.empty(0, dtype=lin.weight.dtype, device=lin.weight.device)
    model.qtulu_quantization = {
        "method": "nf4",
        "blocksize": blocksize,
        "double_quant": double_quant,
        "compute_dtype": None if compute_dtype is None else str(compute_dtype).removeprefix("torch."),
        "skip": list(skip),
        "format": "bitsandbytes",
    }
    return model
