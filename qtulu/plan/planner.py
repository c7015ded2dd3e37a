"""Plan one training step: build the model on the meta device, run the step on fake tensors, track.

`plan_step(settings, stack="qtulu")` builds the model (`qtulu.plan.models`), turns its meta tensors
into fake ones, creates the optimizer and its states (one warm-up update on zero gradients), then
runs `qtulu.plan.step.run_step` (``settings.accumulation`` micro-batches, clipping, the optimizer
step) under a `StorageTracker` and returns a `PlanResult`: the peak of live device bytes during
that step and what was alive at the peak, by category.
"""

from __future__ import annotations

import contextlib
import itertools
import re
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from qtulu.plan.emulate import cuda_semantics, offload_to_host, workspace_table
from qtulu.plan.models import PlanError, build_hf, build_qtulu, quant_state_tensors, resolve_config, to_fake_device
from qtulu.plan.settings import PlanSettings
from qtulu.plan.step import (
    Observer,
    create_optimizer_states,
    make_batches,
    make_optimizer,
    qtulu_loss,
    run_step,
)
from qtulu.plan.tracker import CATEGORIES, StorageTracker, analyse, classify



@dataclass
class PlanResult:
    """The planned peak of one optimizer step and its breakdown (bytes)."""

    stack: str
    settings: dict[str, Any]
    peak_bytes: int
    breakdown: dict[str, int]
    floor_bytes: int
    floor: dict[str, int]
    peak_phase: str
    peak_module: str
    host_bytes: int
    paged_bytes: int
    largest_transients: list[dict[str, Any]]
    dequantized_weight_copies: list[dict[str, Any]]
    phase_peaks: dict[str, int]
    host: dict[str, int] = field(default_factory=dict)  # host side of an offloading plan (qtulu.plan.host)
    cpu_optimizer: dict[str, Any] | None = None  # measured CPU optimizer step (qtulu.plan.host.cpu_optimizer_time)
    units: dict[str, Any] = field(default_factory=dict)  # FSDP2 unit bytes (qtulu.plan.fsdp.fsdp_units)
    timeline: list[tuple[int, int]] = field(default_factory=list, repr=False)
    seconds: float = 0.0
    model: str = ""

    def to_dict(self, timeline: bool = False) -> dict[str, Any]:
        d = {k: v for k, v in self.__dict__.items() if k != "timeline" or timeline}
        return d


class _TrackingObserver(Observer):
    def __init__(self, tracker: StorageTracker) -> None:
        self.tracker = tracker
        self.forward_end: dict[int, int] = {}
        self.grads: set[int] = set()
        self.opt_states: set[int] = set()
        self.paged: set[int] = set()

    def on_phase(self, name, micro_batch=None):
        self.tracker.set_phase(name)

    def on_forward_end(self, micro_batch):
        self.forward_end[micro_batch] = len(self.tracker.events)

    def on_step_end(self, model, optimizer):
        for p in model.parameters():
            if p.requires_grad and p.grad is not None:
                s = self.tracker.track(p.grad)
                if s is not None:
                    self.grads.add(s.sid)
        paged = bool(getattr(optimizer, "is_paged", False))
        for state in optimizer.state.values():
            for v in state.values():
                if isinstance(v, torch.Tensor):
                    # bitsandbytes pages a state buffer of >= 1e5 elements (Optimizer8bit.get_state_buffer)
                    s = self.tracker.track(v, paged=paged and v.numel() >= 1e5)
                    if s is not None:
                        self.opt_states.add(s.sid)


class _Progress:
    """Per-layer progress lines ("forward 1/2: layer 40/80"), at most one every ``every`` seconds
    (and the last layer of each pass): a 65B plan runs for minutes."""

    def __init__(self, say: Callable[[str], None] | None, layers: int, micro_batches: int, every: float = 10.0):
        self.say, self.layers, self.micro_batches, self.every = say, layers, micro_batches, every
        self.t0 = self.last = time.time()
        self.seen: tuple[str, str] | None = None
        self.passes: dict[str, int] = {}

    def layer(self, phase: str, module_name: str) -> None:
        if self.say is None:
            return
        idx = _layer_of(module_name)
        if idx is None or (phase, idx) == self.seen:
            return
        kind = "forward" if phase == "forward" else "backward"
        if self.seen is None or self.seen[0] != kind:
            self.passes[kind] = self.passes.get(kind, 0) + 1
        self.seen = (kind, idx)
        now = time.time()
        done = int(idx) + 1 if kind == "forward" else self.layers - int(idx)
        if now - self.last >= self.every or done == self.layers:
            self.last = now
            self.say(f"{kind} {min(self.passes[kind], self.micro_batches)}/{self.micro_batches}: "
                     f"layer {done}/{self.layers} ({now - self.t0:.0f} s)")


@contextlib.contextmanager
def _module_hooks(model, tracker: StorageTracker, backbone, progress: _Progress | None = None):
    """Module names on the tracker's stack; checkpoint recomputation (a forward during backward);
    the loss region (whatever runs after the backbone in forward, and before its output's grad)."""
    from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook

    names = {id(m): n for n, m in model.named_modules()}
    stack: list[tuple[int, bool]] = []

    def pre(module, args):
        recompute = tracker.phase in ("loss_backward", "backward")
        if recompute:
            tracker.enter_recompute(names.get(id(module), ""))
        name = names.get(id(module), type(module).__name__)
        if progress is not None:
            progress.layer(tracker.phase, name)
        tracker.module_stack.append(name)
        stack.append((id(module), recompute))

    def post(module, args, output):
        # always_call: also after an exception (non-reentrant checkpoint stops recomputation early)
        while stack:
            mid, recompute = stack.pop()
            if tracker.module_stack:
                tracker.module_stack.pop()
            if recompute:
                tracker.exit_recompute()
            if mid == id(module):
                break
        if module is backbone and tracker.phase == "forward":
            tracker.set_phase("loss")
            hidden = getattr(output, "last_hidden_state", None)
            if hidden is None and isinstance(output, (tuple, list)):
                hidden = output[0]
            if isinstance(hidden, torch.Tensor) and hidden.requires_grad:
                hidden.register_hook(lambda g: tracker.set_phase("backward") if tracker.phase == "loss_backward" else None)

    h1 = register_module_forward_pre_hook(pre)
    h2 = register_module_forward_hook(post, always_call=True)
    try:
        yield
    finally:
        h1.remove()
        h2.remove()


def _register_state(tracker: StorageTracker, model, batches) -> None:
    for _, p in model.named_parameters():
        tracker.track(p, role="lora" if p.requires_grad else "weights")
    for _, b in model.named_buffers():
        tracker.track(b, role="weights")
    for t in quant_state_tensors(model):
        tracker.track(t, role="quant_state")
    for b in batches:
        for v in b.values():
            if isinstance(v, torch.Tensor):
                tracker.track(v, role="activations")


# TRL's chunked LM head projects at most this many tokens per tile (trl/kernels/chunked_logprob.py)
_TRL_TOKEN_TILE = 4096


def _live_at(tracker: StorageTracker, indices: list[int]) -> dict[int, int]:
    """Live device bytes just after each event index in ``indices``."""
    want = sorted(set(indices))
    out: dict[int, int] = {}
    live, k = 0, 0
    for i, (sid, kind) in enumerate(tracker.events):
        s = tracker.storages[sid]
        if not s.host:
            live += s.nbytes if kind > 0 else -s.nbytes
        while k < len(want) and want[k] == i:
            out[want[k]] = live
            k += 1
    for j in want[k:]:
        out[j] = live
    return out


def _recompute_set(tracker: StorageTracker, after: int) -> int:
    """Device bytes one checkpointed layer's recomputation leaves alive for its backward (its saved
    tensors, the reloaded input when offloaded): the first recomputation after event ``after``."""
    ids = sorted(r for r, start in tracker.recompute_starts.items() if start >= after and r in tracker.recompute_ends)
    if not ids:
        return 0
    # a checkpoint replays the layer's function, not the layer module: its submodules' forwards are
    # separate recomputations, grouped here by the decoder layer they belong to
    layer = _layer_of(tracker.recompute_modules.get(ids[0], ""))
    group = [ids[0]] + list(itertools.takewhile(
        lambda r: layer is not None and _layer_of(tracker.recompute_modules.get(r, "")) == layer, ids[1:]))
    start, end = tracker.recompute_starts[group[0]], tracker.recompute_ends[group[-1]] - 1
    live = _live_at(tracker, [start - 1, end])
    return max(0, live[end] - live[start - 1])


def _layer_of(module_name: str) -> str | None:
    m = re.search(r"(?:^|\.)layers\.(\d+)(?:\.|$)", module_name)
    return m.group(1) if m else None


def _loss_tile(config, settings: PlanSettings, stack: str) -> int:
    """The loss path's one unavoidable buffer: TRL's fused head projects one (<= 4096 tokens) x
    (chunk columns) tile in the compute dtype; the model's own loss needs the whole logits."""
    vocab = int(getattr(config, "vocab_size", 0))
    elsize = torch.empty((), dtype=settings.torch_dtype).element_size()
    rows = max(1, settings.tokens - 1)  # the shifted labels: one fewer position than tokens
    if stack == "hf" and not settings.extra.get("fused_lm_head", False):
        return settings.tokens * vocab * elsize
    from qtulu.train.loss import TRL_DEFAULT_CHUNK

    # TRL allocates the tile chunk_size wide even when the vocabulary is narrower (mm_buf)
    cols = settings.loss_chunk_size or TRL_DEFAULT_CHUNK
    return min(rows, _TRL_TOKEN_TILE) * cols * elsize


def _floor(config, settings: PlanSettings, state: dict[str, int], *, tracker: StorageTracker,
           grads: int, after: int, stack: str) -> dict[str, int]:
    """The physical minimum of this step: what must be alive at once at the start of the last
    micro-batch's backward (or at its loss), whatever the implementation.

    resident state (weights, quant state, LoRA, device optimizer states) + the gradients summed
    from earlier micro-batches (device masters, accumulation >= 2) + every checkpointed layer input
    (kept on the device unless offloaded) + the larger of one layer's recompute set (measured: the
    first recomputation of the last micro-batch) and the loss tile. Each of those is alive at the
    end of that recomputation (or during the loss), so a plan's peak can never be below it.
    """
    layers = int(getattr(config, "num_hidden_layers", 0))
    hidden = int(getattr(config, "hidden_size", 0))
    elsize = torch.empty((), dtype=settings.torch_dtype).element_size()
    offloaded = settings.activation_offload and settings.device == "cuda"
    acts = layers * settings.tokens * hidden * elsize if settings.gradient_checkpointing and not offloaded else 0
    return {
        "weights": state["weights"],
        "quant_state": state["quant_state"],
        "lora": state["lora"],
        "optimizer": state["optimizer"],
        "grads": grads if settings.accumulation >= 2 else 0,
        "activations": acts,
        "recompute_set": _recompute_set(tracker, after) if settings.gradient_checkpointing else 0,
        "loss_tile": _loss_tile(config, settings, stack),
    }


def floor_total(floor: dict[str, int]) -> int:
    """The floor's bytes: the layer's recompute set and the loss tile are never alive together."""
    parts = [v for k, v in floor.items() if k not in ("recompute_set", "loss_tile")]
    return sum(parts) + max(floor.get("recompute_set", 0), floor.get("loss_tile", 0))


def _dequant_copies(tracker: StorageTracker, model) -> list[dict[str, Any]]:
    """Float buffers computed from a layer's 4-bit codes alone, as large as the layer's weight: a
    dequantized copy of it. bitsandbytes' backward makes one per layer; qtulu's CUDA kernels none."""
    numels = set()
    for m in model.modules():
        qs = getattr(m, "quant_state", None) or getattr(getattr(m, "weight", None), "quant_state", None)
        shape = getattr(qs, "shape", None)
        if shape is not None and len(shape) == 2:
            numels.add(int(shape[0]) * int(shape[1]))
    out = []
    for sid in tracker.from_codes:
        s = tracker.storages[sid]
        numel = 1
        for d in s.shape:
            numel *= d
        if s.dtype in ("bfloat16", "float16", "float32") and numel in numels:
            out.append({"bytes": s.nbytes, "op": s.op, "module": s.module, "shape": list(s.shape)})
    out.sort(key=lambda d: -d["bytes"])
    return out[:5]


def plan_step(settings: PlanSettings, *, stack: str = "qtulu", config=None,
              progress: Callable[[str], None] | None = None) -> PlanResult:
    """Run the step of ``stack`` ("qtulu" or "hf") on fake tensors and return its memory.
    ``progress``: called with per-layer progress lines (the CLI prints them on stderr)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    if stack not in ("qtulu", "hf"):
        raise PlanError(f"unknown stack {stack!r}")
    if settings.device not in ("cuda", "cpu"):
        raise PlanError(f"device must be 'cuda' or 'cpu', got {settings.device!r}")
    if settings.quantize != "nf4" and stack == "hf":
        raise PlanError("--compare-hf plans bitsandbytes' NF4 base: it needs quantize=nf4")
    t0 = time.time()
    if config is None:
        config = resolve_config(settings.shape, settings.config, seq_len=settings.seq_len)
    cuda = settings.device == "cuda"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = build_qtulu(config, settings) if stack == "qtulu" else build_hf(config, settings)
    from qtulu.plan.units import fsdp_units

    units = fsdp_units(model)  # on the meta device: the bytes a rank gathers under FSDP2 (`qtulu.plan.fsdp`)
    batches = make_batches(config.vocab_size, settings, max(1, settings.accumulation), packed=stack == "qtulu")
    tracker = StorageTracker(workspace=workspace_table(cuda), round_to=512 if cuda else 1)
    obs = _TrackingObserver(tracker)
    backbone = model.get_base_model().model
    loss_ctx = _loss_context(settings) if stack == "qtulu" else None
    emulation = cuda_semantics() if cuda else contextlib.nullcontext()
    fake = FakeTensorMode(allow_non_fake_inputs=True)
    with emulation, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        master, opt_settings = None, settings
        with fake:
            to_fake_device(model, "cpu")
            if settings.master_weights == "host":
                from qtulu.train.master_weights import HostMaster, host_optimizer_name

                # the host is the meta device here: never counted
                master = HostMaster(model.named_parameters(), compute_dtype=settings.torch_dtype, host_device="meta")
                master.match_input_casts(model)  # as qtulu train: dropout on the fp32 input
                opt_settings = settings.replace(optimizer=host_optimizer_name(settings.optimizer))
        # outside the fake mode: bitsandbytes builds its quantization maps from real values
        optimizer = make_optimizer(model, opt_settings, cuda=cuda, params=master.masters if master else None)
        if master is not None:
            master.attach(optimizer, settings.max_grad_norm)
        offload = offload_to_host(tracker) if cuda and settings.activation_offload else contextlib.nullcontext()
        with fake, tracker, offload:
            _register_state(tracker, model, batches)
            tracker.set_phase("warmup")
            create_optimizer_states(optimizer)
            start = len(tracker.events)
            layers = int(getattr(config, "num_hidden_layers", 0))
            ticker = _Progress(progress, layers, len(batches)) if progress is not None else None
            with _module_hooks(model, tracker, backbone, ticker):
                run_step(
                    model, optimizer, batches,
                    loss_fn=qtulu_loss,
                    autocast_dtype=settings.torch_dtype if cuda and settings.torch_dtype != torch.float32 else None,
                    autocast_device="cpu",
                    max_grad_norm=settings.max_grad_norm,
                    foreach=True if cuda else None,
                    observer=obs,
                    context=loss_ctx,
                )
    categories = classify(tracker, forward_end=obs.forward_end, grads=obs.grads, opt_states=obs.opt_states)
    a = analyse(tracker, categories, start_event=start)
    state = dict.fromkeys(CATEGORIES, 0)
    for s in tracker.storages.values():
        if s.died is None and not s.host:
            state[categories.get(s.sid, "transient")] += s.nbytes
    grad_bytes = sum(tracker.storages[sid].nbytes for sid in obs.grads if not tracker.storages[sid].host)
    last_forward = max(obs.forward_end.values()) if obs.forward_end else start
    floor = _floor(config, settings, state, tracker=tracker, grads=grad_bytes, after=last_forward, stack=stack)
    from qtulu.plan.host import host_side

    host = host_side(master, optimizer, activation_host_bytes=a.host_bytes)
    return PlanResult(
        host=host,
        units=units,
        stack=stack,
        settings=settings.to_dict(),
        peak_bytes=a.peak_bytes,
        breakdown=a.breakdown,
        floor_bytes=floor_total(floor),
        floor=floor,
        peak_phase=a.peak_phase,
        peak_module=a.peak_module,
        host_bytes=a.host_bytes,
        paged_bytes=a.paged_bytes,
        largest_transients=a.largest_transients,
        dequantized_weight_copies=_dequant_copies(tracker, model),
        phase_peaks=a.phase_peaks,
        timeline=a.timeline,
        seconds=time.time() - t0,
        model=str(getattr(config, "_name_or_path", "")),
    )


def _loss_context(settings: PlanSettings):
    from qtulu.train.loss import loss_chunking

    return lambda: loss_chunking(settings.loss_chunk_size)
