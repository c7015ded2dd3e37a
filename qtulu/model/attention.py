"""transformers integration of the varlen attention kernel (``attn_implementation="qtulu_varlen"``).

After :func:`register_attention`, a LLaMA-family model built or loaded with
``attn_implementation="qtulu_varlen"`` (or switched with ``model.set_attn_implementation``)
takes a *packed* batch, e.g. ``input_ids`` of shape ``(1, total)`` with ``position_ids``
restarting at 0 for each example and no ``attention_mask``; every layer then derives
``cu_seqlens`` from ``position_ids`` and runs :func:`qtulu.kernels.varlen_attention.varlen_attention`,
so no token attends across an example boundary and no (T, T) mask is built.

Everything else behaves exactly like ``"sdpa"``: an ordinary padded batch with an
``attention_mask`` with zeros in it, and decoding with a KV cache, get transformers' own SDPA
mask and attention function, so the same model also generates.

A sequence boundary is where a position id is not the previous one plus one (the rule
transformers' own ``find_packed_sequence_indices`` uses), plus the start of every row.
Explicit boundaries are honoured when given as forward keyword arguments: flash-attention's
``cu_seq_lens_q`` / ``max_length_q`` (as ``DataCollatorWithFlattening`` produces them) or
``cu_seqlens`` / ``max_seqlen`` (as ``qtulu.data.packing.collate_packed`` does); they must
describe the flattened ``(batch * seq)`` tokens.

Exact or refused: sliding-window layers (Mistral, Qwen2, Gemma-2, Phi-3: the ``sliding_window``
the layer passes) and Gemma-2's ``attn_logit_softcapping`` (``softcap``) run in the kernel, on
packed and unpacked rows alike (the padded/decoding fallback applies the softcap too, where
transformers' SDPA cannot). What the kernel cannot do is refused with a `PackedAttentionError`
naming the config key (:func:`check_packed_support`: chunked attention, bidirectional layers,
unknown layer types, attention sinks, custom mask functions, ALiBi position biases: Bloom, Falcon
with ``alibi``, MPT) rather than run inexactly, and :func:`check_attention_took_effect` refuses a
model whose attention does not go through transformers' attention interface at all. Attention
dropout is refused in training (LLaMA's default is 0).
"""

from __future__ import annotations

import contextlib
import weakref
from typing import Any, Iterator

import torch

from qtulu.errors import QtuluError

ATTN_IMPLEMENTATION = "qtulu_varlen"

__all__ = [
    "ATTN_IMPLEMENTATION",
    "register_attention",
    "cu_seqlens_from_position_ids",
    "check_packed_support",
    "check_attention_took_effect",
    "PackedAttentionError",
    "varlen_attention_forward",
    "varlen_mask",
    "attention_backend",
    "set_attention_backend",
    "get_attention_backend",
]

_BACKEND = "auto"


class PackedAttentionError(QtuluError, ValueError):
    """A model whose attention ``qtulu_varlen`` cannot compute exactly (it refuses instead)."""


# layer types whose attention the kernel reproduces: causal, or causal within a sliding window
SUPPORTED_LAYER_TYPES = ("full_attention", "sliding_attention")


def check_packed_support(config) -> None:
    """Raise `PackedAttentionError` (naming the config key) when ``qtulu_varlen`` cannot reproduce
    the attention of a model with this config exactly. Sliding windows and logit softcapping are
    supported; chunked (Llama-4), bidirectional and unknown layer types are not."""
    name = getattr(config, "model_type", None) or type(config).__name__
    for sub in ("text_config",):  # multimodal wrappers: the language model's config decides
        inner = getattr(config, sub, None)
        if inner is not None and inner is not config:
            check_packed_support(inner)
    problems = []
    if getattr(config, "attention_chunk_size", None):
        problems.append(f"attention_chunk_size={config.attention_chunk_size} (chunked attention)")
    if getattr(config, "is_causal", True) is False or getattr(config, "use_bidirectional_attention", False):
        problems.append("bidirectional attention (is_causal=False / use_bidirectional_attention)")
    layer_types = getattr(config, "layer_types", None) or ()
    unknown = sorted({t for t in layer_types if t not in SUPPORTED_LAYER_TYPES})
    if unknown:
        problems.append(f"layer_types {unknown} (supported: {list(SUPPORTED_LAYER_TYPES)})")
    if getattr(config, "attention_sinks", None) or name in ("gpt_oss",):
        problems.append("attention sinks")
    problems += _position_bias_problems(config, name)
    if problems:
        raise PackedAttentionError(
            f"attn_implementation={ATTN_IMPLEMENTATION!r} cannot compute {name}'s attention exactly: "
            f"{'; '.join(problems)}; use attn_implementation='sdpa' (and no packing)"
        )


# Architectures whose attention adds a position bias to the scores outside the attention interface
# (ALiBi): the kernel has no bias input, so packing them would let documents see each other (Bloom
# trained silently wrong, issue 25) or crash (Falcon). model_type -> the config key that says so.
ALIBI_ALWAYS = {"bloom": "model_type=bloom (ALiBi position bias, always on)"}


def _position_bias_problems(config, name: str) -> list[str]:
    problems = []
    if name in ALIBI_ALWAYS:
        problems.append(ALIBI_ALWAYS[name])
    for key in ("alibi", "use_alibi"):
        if getattr(config, key, False) is True:
            problems.append(f"{key}=True (ALiBi position bias)")
    attn_config = getattr(config, "attn_config", None)  # MPT
    alibi = attn_config.get("alibi") if isinstance(attn_config, dict) else getattr(attn_config, "alibi", False)
    if alibi is True:
        problems.append("attn_config.alibi=True (ALiBi position bias)")
    pet = getattr(config, "position_embedding_type", None)
    if isinstance(pet, str) and pet not in ("absolute", "rope", "rotary"):
        problems.append(f"position_embedding_type={pet!r} (a bias the kernel does not add)")
    return problems


def check_attention_took_effect(model) -> None:
    """After ``set_attn_implementation("qtulu_varlen")``: refuse (`PackedAttentionError`) a model
    whose attention would not call the registered kernel, so that packed rows would silently attend
    across documents. transformers routes a model's attention through the attention interface only
    when its class says so (``_supports_attention_backend``); every (sub)config must name the
    kernel; `check_packed_support` must hold for the config the model really has."""
    problems = []
    for sub in [model, *(m for m in model.modules() if m is not model)]:
        cls = type(sub)
        if not hasattr(cls, "_supports_attention_backend") or not hasattr(sub, "config"):
            continue  # not a transformers PreTrainedModel (a layer, a peft wrapper)
        if not cls._supports_attention_backend:
            problems.append(f"{cls.__name__} computes attention in its own code, not through transformers' "
                            "attention interface (_supports_attention_backend=False)")
        impl = getattr(sub.config, "_attn_implementation", None)
        if impl != ATTN_IMPLEMENTATION:
            problems.append(f"{cls.__name__}.config._attn_implementation is {impl!r}")
    if problems:
        name = getattr(model.config, "model_type", None) or type(model).__name__
        raise PackedAttentionError(
            f"attn_implementation={ATTN_IMPLEMENTATION!r} did not take effect for {name}: {'; '.join(sorted(set(problems)))}; "
            "use attn_implementation='sdpa' (and no packing)")
    check_packed_support(model.config)


def set_attention_backend(backend: str) -> None:
    """Kernel backend used by the model integration: ``"auto"`` (default), ``"triton"``, ``"torch"``."""
    from qtulu.kernels.backend import BACKENDS

    global _BACKEND
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    _BACKEND = backend


def get_attention_backend() -> str:
    return _BACKEND


@contextlib.contextmanager
def attention_backend(backend: str) -> Iterator[None]:
    """Temporarily use ``backend`` for the ``qtulu_varlen`` attention of every model."""
    previous = _BACKEND
    set_attention_backend(backend)
    try:
        yield
    finally:
        set_attention_backend(previous)


def cu_seqlens_from_position_ids(position_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """``(cu_seqlens int32 (num_seqs + 1,), max_seqlen)`` for a packed batch.

    ``position_ids`` is ``(total,)`` or ``(batch, seq)`` (rows are flattened in order, each row
    starting a new example). An example starts wherever a position id is not the previous plus
    one, e.g. ``[[0, 1, 2, 0, 0, 1]] -> ([0, 3, 4, 6], 3)``. ``max_seqlen`` is a Python int (one
    device sync).

    Why not transformers' helpers (5.x): ``modeling_flash_attention_utils.
    prepare_fa_kwargs_from_position_ids`` starts an example only where the position equals the
    smallest position id of the whole batch, so a row whose positions continue from the previous
    row (``[[0, 1, 2], [3, 4, 0]]``) or an example that does not restart at that value would attend
    across the boundary; ``masking_utils.find_packed_sequence_indices`` uses this function's rule
    (a position that is not the previous plus one) but returns per-token example indices per row
    (or None when nothing is packed), from which cu_seqlens is the same scan again. Both agree
    with this function where their rules apply (``tests/model/test_attention.py`` checks it).
    """
    if position_ids.dim() == 1:
        position_ids = position_ids.unsqueeze(0)
    if position_ids.dim() != 2:
        raise ValueError(f"position_ids must be (total,) or (batch, seq); got {tuple(position_ids.shape)}")
    if position_ids.dtype.is_floating_point:
        raise ValueError(f"position_ids must be integers, got {position_ids.dtype}")
    batch, seq = position_ids.shape
    device = position_ids.device
    if batch * seq == 0:
        return torch.zeros(1, dtype=torch.int32, device=device), 0
    starts = torch.ones_like(position_ids, dtype=torch.bool)  # (B, T)
    starts[:, 1:] = position_ids[:, 1:] != position_ids[:, :-1] + 1
    idx = starts.reshape(-1).nonzero().reshape(-1).to(torch.int32)  # (num_seqs,)
    end = torch.tensor([batch * seq], dtype=torch.int32, device=device)
    cu_seqlens = torch.cat([idx, end])  # (num_seqs + 1,)
    max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
    return cu_seqlens, max_seqlen


# One-slot cache: every layer of a forward pass gets the same position_ids tensor, so the
# boundaries (and the device sync for max_seqlen) are computed once per forward, not per layer.
_CACHE: dict[str, Any] = {"ref": None, "key": None, "value": None}


def _cached_cu_seqlens(position_ids: torch.Tensor, batch: int) -> tuple[torch.Tensor, int]:
    """cu_seqlens for ``position_ids`` ((B or 1, T)) broadcast to ``batch`` rows, cached."""
    key = (position_ids._version, batch, tuple(position_ids.shape))
    ref = _CACHE["ref"]
    if (
        ref is not None
        and ref() is position_ids
        and _CACHE["key"] == key
        and not torch.compiler.is_compiling()
    ):
        return _CACHE["value"]
    value = cu_seqlens_from_position_ids(position_ids.expand(batch, position_ids.shape[-1]))
    try:
        _CACHE.update(ref=weakref.ref(position_ids), key=key, value=value)
    except TypeError:  # tensors under some tracing modes cannot be weak-referenced
        _CACHE.update(ref=None, key=None, value=None)
    return value


def _needs_sdpa(query: torch.Tensor, key: torch.Tensor, attention_mask, kwargs) -> bool:
    """True for everything that is not a self-attention pass without a padding mask."""
    return attention_mask is not None or query.shape[2] != key.shape[2]


def varlen_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """The attention function registered under ``"qtulu_varlen"`` (transformers' signature).

    ``query`` is ``(B, H, T, D)``, ``key``/``value`` ``(B, Hkv, S, D)``; returns ``(B, T, H, D)``.
    Without a mask and with ``T == S`` (training, prefill) it runs the varlen kernel with the
    boundaries from ``position_ids`` (or ``cu_seq_lens_q``), the layer's ``sliding_window`` and
    ``softcap``; otherwise it is transformers' SDPA (with a softcap: the same math spelled out).
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if kwargs.get("s_aux") is not None:
        raise PackedAttentionError(
            f"attn_implementation={ATTN_IMPLEMENTATION!r} cannot apply attention sinks (s_aux); use 'sdpa'"
        )
    window = kwargs.pop("sliding_window", None)
    if window is None:
        window = getattr(module, "sliding_window", None)
    softcap = kwargs.pop("softcap", None)
    if _needs_sdpa(query, key, attention_mask, kwargs):
        if softcap is not None:
            return _eager_softcap_attention(query, key, value, attention_mask, dropout, scaling, softcap,
                                            training=module.training, window=window)
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
            is_causal=is_causal, **kwargs,
        )
    if dropout:
        raise PackedAttentionError(
            f"attn_implementation={ATTN_IMPLEMENTATION!r} does not support attention dropout "
            f"(got {dropout}); set config.attention_dropout = 0.0"
        )
    if kwargs.get("output_attentions"):
        raise PackedAttentionError(f"attn_implementation={ATTN_IMPLEMENTATION!r} cannot return attention weights")
    from qtulu.kernels.varlen_attention import varlen_attention

    batch, heads, seq, head_dim = query.shape
    kv_heads = key.shape[1]
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)

    # explicit boundaries win (no device sync): flash-attention's names (DataCollatorWithFlattening)
    # or qtulu.data.packing.collate_packed's
    cu_seqlens = kwargs.get("cu_seq_lens_q")
    max_seqlen = kwargs.get("max_length_q")
    if cu_seqlens is None:
        cu_seqlens, max_seqlen = kwargs.get("cu_seqlens"), kwargs.get("max_seqlen")
    if cu_seqlens is not None:
        if int(cu_seqlens.numel()) < 2:
            raise PackedAttentionError("cu_seqlens must hold at least [0, total]")
        max_seqlen = int(max_seqlen) if max_seqlen is not None else None
        cu_seqlens = cu_seqlens.to(device=query.device, dtype=torch.int32)
    else:
        position_ids = kwargs.get("position_ids")
        if position_ids is not None:
            if position_ids.shape[-1] != seq:
                raise PackedAttentionError(
                    f"position_ids has {position_ids.shape[-1]} positions but the query has {seq}"
                )
            if position_ids.dim() == 1:
                position_ids = position_ids.unsqueeze(0)
            cu_seqlens, max_seqlen = _cached_cu_seqlens(position_ids, batch)
            cu_seqlens = cu_seqlens.to(query.device)
        else:  # one example per row
            cu_seqlens = torch.arange(0, (batch + 1) * seq, seq, dtype=torch.int32, device=query.device)
            max_seqlen = seq

    q = query.transpose(1, 2).reshape(batch * seq, heads, head_dim)  # (B*T, H, D)
    k = key.transpose(1, 2).reshape(batch * seq, kv_heads, head_dim)  # (B*T, Hkv, D)
    v = value.transpose(1, 2).reshape(batch * seq, kv_heads, value.shape[-1])  # (B*T, Hkv, D)
    if window is not None and (not causal or window >= (max_seqlen if max_seqlen is not None else seq)):
        window = None  # wider than every example: plain causal (and a non-causal layer has none)
    out = varlen_attention(
        q, k, v, cu_seqlens, max_seqlen, causal=causal, softmax_scale=scaling, backend=_BACKEND,
        window=int(window) if window is not None else None,
        softcap=float(softcap) if softcap is not None else None,
    )  # (B*T, H, D)
    return out.reshape(batch, seq, heads, -1), None  # (B, T, H, D)


def _eager_softcap_attention(query, key, value, attention_mask, dropout, scaling, softcap, training, window=None):
    """Padded batches and decoding of a softcapped model (Gemma-2): transformers' SDPA has no
    softcap, so the softmax is spelled out as Gemma-2's own eager attention does it."""
    from transformers.integrations.sdpa_attention import repeat_kv

    groups = query.shape[1] // key.shape[1]
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)  # (B, H, S, D)
    scaling = scaling if scaling is not None else query.shape[-1] ** -0.5
    scores = (query @ key.transpose(2, 3)) * scaling  # (B, H, T, S)
    scores = torch.tanh(scores / softcap) * softcap
    t, s = scores.shape[-2:]
    # the dtype's min, not -inf (as transformers' eager masks): a padding query row that sees no
    # key gets a finite uniform softmax instead of NaN, which its value would spread
    lowest = torch.finfo(scores.dtype).min
    if attention_mask is not None:
        mask = attention_mask[:, :, :, :s]
        scores = scores.masked_fill(~mask, lowest) if mask.dtype == torch.bool else scores + mask
    elif t > 1 or (window is not None and s > window):  # no mask given: causal (and the window),
        q_pos = torch.arange(s - t, s, device=query.device)[:, None]  # the queries are the last t
        k_pos = torch.arange(s, device=query.device)[None, :]
        keep = k_pos <= q_pos
        if window is not None:
            keep &= q_pos - k_pos < window
        scores = scores.masked_fill(~keep, lowest)
    work = torch.float32 if scores.dtype in (torch.float16, torch.bfloat16) else scores.dtype
    probs = torch.softmax(scores, dim=-1, dtype=work).to(query.dtype)
    probs = torch.nn.functional.dropout(probs, p=dropout, training=training)
    return (probs @ value).transpose(1, 2).contiguous(), None  # (B, T, H, D)


def varlen_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int = 0,
    kv_offset: int = 0,
    mask_function=None,
    attention_mask: torch.Tensor | None = None,
    **kwargs: Any,
):
    """Mask function registered under ``"qtulu_varlen"``.

    Returns ``None`` (no mask: packing is read from position_ids, the window from the layer, in
    the attention function) for a self-attention pass without padding; otherwise delegates to
    transformers' ``sdpa_mask``. A model that adds its own mask function (``use_vmap``: image
    tokens and the like) on such a pass is refused: the kernel could not apply it.
    """
    from transformers.masking_utils import causal_mask_function, sdpa_mask

    mask_function = mask_function or causal_mask_function
    no_offset = (
        isinstance(q_offset, int) and isinstance(kv_offset, int) and q_offset == 0 and kv_offset == 0
    )
    plain = no_offset and q_length == kv_length
    unpadded = attention_mask is None or (
        attention_mask.dim() == 2 and attention_mask.shape[-1] == kv_length and bool(attention_mask.all())
    )
    if plain and unpadded and kwargs.get("use_vmap"):
        raise PackedAttentionError(
            f"attn_implementation={ATTN_IMPLEMENTATION!r}: this model adds its own attention mask function "
            "(e.g. for image tokens), which the varlen kernel cannot apply; use attn_implementation='sdpa'"
        )
    if plain and unpadded:  # the mask function is causal or sliding-window causal: both in the kernel
        if kwargs.get("config") is not None:
            check_packed_support(kwargs["config"])  # a few attribute reads: chunked etc. refused
        return None
    return sdpa_mask(
        batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
        kv_offset=kv_offset, mask_function=mask_function, attention_mask=attention_mask, **kwargs,
    )


def register_attention() -> str:
    """Register ``"qtulu_varlen"`` with transformers (idempotent); returns the name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(ATTN_IMPLEMENTATION, varlen_attention_forward)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, varlen_mask)
    return ATTN_IMPLEMENTATION
