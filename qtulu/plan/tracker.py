"""Every storage's life through one training step, recorded under fake tensors.

`StorageTracker` is a ``TorchDispatchMode`` entered *above* a ``FakeTensorMode``: every aten op of
the step (forward, loss, backward with its checkpoint recomputation, optimizer step) passes
through it; each output storage it has not seen is recorded with its size, the phase of the step,
the op and the module that made it, and a weak-reference finaliser records when the storage dies.
`analyse` then replays the events: the peak of live bytes, what was alive at that instant, by
category, and the largest transient buffers.

Why not ``torch.distributed._tools.mem_tracker.MemTracker`` (present in torch 2.11 and 2.13, and
it does work under FakeTensorMode)? It keeps running totals per category decided when a storage
is born (parameter, buffer, gradient, activation = made in forward, temp = made in backward,
optimizer state), so it cannot say which forward tensors were *saved* for backward and which were
transient workspaces, cannot separate the loss path, NF4 quant state (plain attributes, not
buffers) or host/paged memory, keeps no per-storage record to name the largest transient, and
refuses a second forward of the root module (gradient accumulation). The mechanism here is the
same (weak references to untyped storages, a dispatch mode), the classification is done after the
step, when every storage's whole life is known.

Two things the fake kernels cannot show are added explicitly: op-internal workspaces (a table
provided by the caller, see `qtulu.plan.emulate`) and values the step needs as data. Small
integer tensors created outside the fake mode (token ids, labels, ``cu_seqlens``) stay real: ops
whose tensor inputs are all real run for real, so ``labels != -100``, ``cu_seqlens.tolist()`` and
boolean-mask indexing (turned into integer indexing here) give the true shapes.
"""

from __future__ import annotations

import itertools
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

CATEGORIES = (
    "weights",        # frozen base weights: NF4 codes, bf16/fp32 embedding, head, norms
    "quant_state",    # NF4 absmax / nested absmax / code tables
    "lora",           # trainable adapter weights
    "grads",          # .grad of the trainable weights
    "optimizer",      # optimizer states
    "activations",    # kept for backward: saved tensors, checkpointed layer inputs, step inputs
    "loss",           # the LM head + loss path (forward and backward)
    "transient",      # short-lived buffers: op outputs consumed at once, activation grads, workspaces
)

_ROUND_CUDA = 512  # the CUDA caching allocator rounds every block to 512 bytes


def _is_fake(t: torch.Tensor) -> bool:
    from torch._subclasses.fake_tensor import FakeTensor

    return isinstance(t, FakeTensor)


@dataclass
class Storage:
    """One storage: size, where it was born, and what it turned out to be."""

    sid: int
    nbytes: int
    phase: str                 # external | forward | loss | backward | loss_backward | recompute | optimizer
    op: str
    module: str
    dtype: str = ""
    shape: tuple = ()
    role: str | None = None    # set for registered storages: weights, quant_state, lora, optimizer, ...
    host: bool = False         # host memory (activation offload): never counted on the device
    paged: bool = False        # bitsandbytes paged optimizer state (CUDA unified memory)
    born: int = 0              # event index
    died: int | None = None
    recompute_id: int | None = None


@dataclass
class Phase:
    """A named interval of the event stream (for the timeline and the classification)."""

    name: str
    start: int
    end: int | None = None


class StorageTracker(TorchDispatchMode):
    """Record storage births and deaths. Use as a context manager inside a FakeTensorMode.

    ``workspace``: ``{op_name: fn(args, kwargs) -> bytes}`` for memory an op allocates and frees
    inside its own kernel (invisible to its fake implementation).
    ``round_to``: allocation granularity (512 on CUDA; 1 elsewhere).
    """

    def __init__(self, *, workspace: dict[str, Callable[..., int]] | None = None, round_to: int = 1) -> None:
        super().__init__()
        self.workspace = dict(workspace or {})
        self.round_to = max(1, int(round_to))
        self.storages: dict[int, Storage] = {}
        self.events: list[tuple[int, int]] = []  # (sid, +1 born / -1 died)
        self._ids: dict[int, int] = {}             # id(storage object) -> sid (live only)
        self._counter = itertools.count()
        self.phase = "external"
        self.module_stack: list[str] = []
        self.recompute_depth = 0
        self._recompute_counter = itertools.count()
        self._recompute_id: int | None = None
        self.phases: list[Phase] = []
        self.host_depth = 0
        self.recompute_ends: dict[int, int] = {}
        self.recompute_starts: dict[int, int] = {}
        self.recompute_modules: dict[int, str] = {}  # the module whose forward began each recomputation
        self._refs: dict[int, Any] = {}
        self._names: dict[Any, str] = {}
        # storages computed from frozen weights and quant state alone, and those of them that read the
        # 4-bit codes: (parts of) dequantized weights
        self.weight_side: set[int] = set()
        self.from_codes: set[int] = set()

    # ---- recording ------------------------------------------------------------------------
    def _round(self, n: int) -> int:
        r = self.round_to
        return -(-n // r) * r if n else 0

    def _current_phase(self) -> str:
        if self.recompute_depth > 0:
            return "recompute"
        return self.phase

    def track(self, t: torch.Tensor, *, op: str = "", role: str | None = None, host: bool = False,
              paged: bool = False) -> Storage | None:
        """Record ``t``'s storage (if new); ``role`` forces a category (registered state)."""
        if not isinstance(t, torch.Tensor) or t.device.type == "meta":
            return None  # meta: real meta tensors, or the planner's stand-ins for host memory
        try:
            st = t.untyped_storage()
        except (NotImplementedError, RuntimeError):
            return None
        key = id(st)
        sid = self._ids.get(key)
        if sid is not None:
            s = self.storages[sid]
            if role is not None and s.role is None:
                s.role = role
            s.host = s.host or host
            s.paged = s.paged or paged
            return s
        sid = next(self._counter)
        s = Storage(
            sid=sid,
            nbytes=self._round(int(st.nbytes())),
            phase=self._current_phase(),
            op=op,
            module=self.module_stack[-1] if self.module_stack else "",
            dtype=str(t.dtype).removeprefix("torch."),
            shape=tuple(int(d) for d in t.shape),
            role=role,
            host=host or self.host_depth > 0,
            paged=paged,
            born=len(self.events),
            recompute_id=self._recompute_id if self.recompute_depth > 0 else None,
        )
        self.storages[sid] = s
        self._ids[key] = sid
        self.events.append((sid, +1))
        self._refs[sid] = weakref.ref(st, lambda _r, key=key, sid=sid: self._died(key, sid))
        return s

    def _died(self, key: int, sid: int) -> None:
        self._refs.pop(sid, None)
        if self._ids.get(key) == sid:
            del self._ids[key]
        s = self.storages.get(sid)
        if s is not None and s.died is None:
            s.died = len(self.events)
            self.events.append((sid, -1))

    def _workspace(self, name: str, nbytes: int) -> Storage:
        """An op-internal buffer: born before the op's outputs, dead after them."""
        sid = next(self._counter)
        s = Storage(sid=sid, nbytes=self._round(int(nbytes)), phase=self._current_phase(), op=name + " (workspace)",
                    module=self.module_stack[-1] if self.module_stack else "", born=len(self.events),
                    role="transient")
        self.storages[sid] = s
        self.events.append((sid, +1))
        return s

    # ---- phases ---------------------------------------------------------------------------
    def set_phase(self, name: str) -> None:
        if self.phases and self.phases[-1].end is None:
            self.phases[-1].end = len(self.events)
        self.phase = name
        self.phases.append(Phase(name, len(self.events)))

    def enter_recompute(self, module: str = "") -> None:
        if self.recompute_depth == 0:
            self._recompute_id = next(self._recompute_counter)
            self.recompute_starts[self._recompute_id] = len(self.events)
            self.recompute_modules[self._recompute_id] = module
        self.recompute_depth += 1

    def exit_recompute(self) -> None:
        self.recompute_depth -= 1
        if self.recompute_depth == 0 and self._recompute_id is not None:
            self.recompute_ends[self._recompute_id] = len(self.events)
            self._recompute_id = None

    # ---- dispatch -------------------------------------------------------------------------
    def _name(self, func) -> str:
        name = self._names.get(func)
        if name is None:
            name = self._names[func] = str(func.name()) if hasattr(func, "name") else str(func)
        return name

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = _tensors(args, kwargs)
        if tensors and not any(_is_fake(t) for t in tensors):
            # every input is a real (small) tensor: compute it for real, so values are known
            with _disable_current_modes():
                out = func(*args, **kwargs)
            self._record_outputs(func, out)
            return out
        if func is torch.ops.aten.index.Tensor and any(
            isinstance(i, torch.Tensor) and not _is_fake(i) and i.dtype == torch.bool for i in (args[1] or [])
        ):
            args = (args[0], _bool_to_int_indices(args[1]))
        ws = self.workspace.get(self._name(func)) if self.workspace else None
        pending: list[Storage] = []
        if ws is not None:
            nbytes = int(ws(args, kwargs))
            if nbytes > 0:
                pending.append(self._workspace(self._name(func), nbytes))
        side, codes = self._weight_inputs(tensors)
        out = func(*args, **kwargs)
        self._record_outputs(func, out)
        if side:
            for t in (out if isinstance(out, (tuple, list)) else (out,)):
                if isinstance(t, torch.Tensor) and t.device.type != "meta":
                    sid = self._ids.get(id(t.untyped_storage()))
                    if sid is not None:
                        self.weight_side.add(sid)
                        if codes:
                            self.from_codes.add(sid)
        for s in pending:
            s.died = len(self.events)
            self.events.append((s.sid, -1))
        return out

    def _weight_inputs(self, tensors) -> tuple[bool, bool]:
        """(every input is a frozen weight, quant state or computed from those alone; one of them is
        4-bit codes or computed from codes)."""
        codes = False
        for t in tensors:
            if t.device.type == "meta":
                continue
            sid = self._ids.get(id(t.untyped_storage()))
            s = self.storages.get(sid) if sid is not None else None
            if s is None:
                return False, False
            if sid in self.from_codes or (s.role == "weights" and s.dtype == "uint8"):
                codes = True
            elif s.role not in ("weights", "quant_state") and sid not in self.weight_side:
                return False, False
        return bool(tensors), codes

    def _record_outputs(self, func, out) -> None:
        if isinstance(out, torch.Tensor):
            self.track(out, op=self._name(func))
            return
        if isinstance(out, (tuple, list)):
            for t in out:
                if isinstance(t, torch.Tensor):
                    self.track(t, op=self._name(func))
                elif isinstance(t, (tuple, list)):
                    self._record_outputs(func, t)


def _tensors(args, kwargs) -> list[torch.Tensor]:
    out = []
    for a in itertools.chain(args, kwargs.values()):
        if isinstance(a, torch.Tensor):
            out.append(a)
        elif isinstance(a, (list, tuple)):
            out.extend(x for x in a if isinstance(x, torch.Tensor))
    return out


def _bool_to_int_indices(indices):
    new = []
    for i in indices:
        if isinstance(i, torch.Tensor) and i.dtype == torch.bool and not _is_fake(i):
            with _disable_current_modes():
                new.extend(i.nonzero(as_tuple=True))
        else:
            new.append(i)
    return new


# --------------------------------------------------------------------------------------------
# analysis


@dataclass
class Analysis:
    """Peak, what was alive at the peak (by category), and the notable buffers."""

    peak_bytes: int
    peak_event: int
    peak_phase: str
    peak_module: str
    breakdown: dict[str, int]
    host_bytes: int
    paged_bytes: int
    largest_transients: list[dict[str, Any]]
    phase_peaks: dict[str, int]
    timeline: list[tuple[int, int]] = field(default_factory=list)  # (event index, live device bytes)
    categories: dict[int, str] = field(default_factory=dict, repr=False)


def classify(tracker: StorageTracker, *, forward_end: dict[str, int], grads: set[int], opt_states: set[int]) -> dict[int, str]:
    """Category of every storage, knowing its whole life.

    ``forward_end``: event index at which each forward pass ended (by micro-batch key), so that a
    forward tensor still alive then was kept for backward; ``grads`` / ``opt_states``: sids that
    are ``.grad`` of a trainable weight / optimizer state at the end of the step.
    """
    ends = sorted(forward_end.values())
    out: dict[int, str] = {}
    for s in tracker.storages.values():
        if s.role is not None:
            out[s.sid] = s.role
        elif s.sid in grads:
            out[s.sid] = "grads"
        elif s.sid in opt_states:
            out[s.sid] = "optimizer"
        elif s.phase in ("loss", "loss_backward"):
            out[s.sid] = "loss"
        elif s.phase == "forward":
            end = next((e for e in ends if e >= s.born), None)
            kept = end is not None and (s.died is None or s.died > end)
            out[s.sid] = "activations" if kept else "transient"
        elif s.phase == "recompute":
            end = tracker.recompute_ends.get(s.recompute_id)
            kept = end is not None and (s.died is None or s.died > end)
            out[s.sid] = "activations" if kept else "transient"
        else:  # backward, optimizer temporaries, clipping
            out[s.sid] = "transient"
    return out


def analyse(tracker: StorageTracker, categories: dict[int, str], *, start_event: int = 0,
            timeline_points: int = 400) -> Analysis:
    """Replay the events; the peak is searched from ``start_event`` (the tracked step) on."""
    live = host_live = host_peak = 0
    peak, peak_at = -1, start_event
    timeline: list[tuple[int, int]] = []
    # each occurrence of a phase is its own window ("forward#0", "loss_backward#1", ...): for a stack of
    # identical layers the peak of every window is affine in the depth (qtulu.plan.search relies on it)
    seen: dict[str, int] = {}
    phase_bounds = []
    for p in tracker.phases:
        phase_bounds.append((p.start, f"{p.name}#{seen.get(p.name, 0)}"))
        seen[p.name] = seen.get(p.name, 0) + 1
    phase_peaks: dict[str, int] = {}
    pi, current_phase = 0, "external"
    stride = max(1, (len(tracker.events) - start_event) // timeline_points)
    for i, (sid, kind) in enumerate(tracker.events):
        while pi < len(phase_bounds) and phase_bounds[pi][0] <= i:
            current_phase = phase_bounds[pi][1]
            pi += 1
        s = tracker.storages[sid]
        delta = s.nbytes if kind > 0 else -s.nbytes
        if s.host:
            host_live += delta
            host_peak = max(host_peak, host_live)
            continue
        live += delta
        if i < start_event:
            continue
        if live > peak:
            peak, peak_at = live, i
        if live > phase_peaks.get(current_phase, -1):
            phase_peaks[current_phase] = live
        if (i - start_event) % stride == 0:
            timeline.append((i, live))
    if peak < 0:  # nothing happened in the step: the state itself is the peak
        peak, peak_at = live, max(start_event, len(tracker.events) - 1)
    breakdown = dict.fromkeys(CATEGORIES, 0)
    for s in tracker.storages.values():
        if not s.host and s.born <= peak_at and (s.died is None or s.died > peak_at):
            breakdown[categories.get(s.sid, "transient")] += s.nbytes
    paged = sum(s.nbytes for s in tracker.storages.values() if s.paged and s.died is None)
    transients = sorted(
        (s for s in tracker.storages.values() if categories.get(s.sid) == "transient" and not s.host),
        key=lambda s: -s.nbytes,
    )[:8]
    at = tracker.storages[tracker.events[peak_at][0]] if tracker.events else None
    phase_at = next((n for b, n in reversed(phase_bounds) if b <= peak_at), "external").split("#")[0]
    return Analysis(
        peak_bytes=peak,
        peak_event=peak_at,
        peak_phase=("recompute" if at is not None and at.phase == "recompute" else phase_at),
        peak_module=at.module if at is not None else "",
        breakdown=breakdown,
        host_bytes=host_peak,
        paged_bytes=paged,
        largest_transients=[
            {"bytes": s.nbytes, "op": s.op, "module": s.module, "phase": s.phase, "dtype": s.dtype, "shape": list(s.shape)}
            for s in transients
        ],
        phase_peaks=phase_peaks,
        timeline=timeline,
        categories=categories,
    )
