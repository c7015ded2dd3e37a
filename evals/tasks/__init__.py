"""The Tulu benchmark tasks: one module per benchmark, each with a ``VERSION``.

A task module exposes ``NAME``, ``VERSION``, ``DATA_SUBDIR``,
``load(data_dir, *, limit=None, **opts) -> list[dict]`` (examples, each with a unique "id"),
``predict(lm, examples, **opts) -> list[dict]`` (one JSON-able record per example, gold included,
so that ``score`` needs nothing else) and ``score(predictions, **ctx) -> dict`` (metrics in [0, 1],
the headline one under "score"). ``ctx`` carries what scoring may need: ``judge``,
``classifier``, ``allow_code_execution``, ``workers``.

Each module also has ``describe(limit=None, context=None, **opts) -> dict``: the profile, the
subset (n and seed), the metric, and whether the run is comparable to the paper's table (results.md
prints it), and takes a ``profile`` option: ``open_instruct`` (default; reproduces open-instruct's
Tulu-1 evaluation) or ``corrected`` (see ``_common.PROFILES``).

A module may also declare ``FILE_OPTIONS`` (options naming files it reads, with ``data_files(data_dir,
**opts) -> {option: Path}``: a cell is keyed by those files' contents rather than by ``DATA_SUBDIR``)
and ``CODE_MODULES`` (qtulu modules its results depend on, keyed with its code), as reply_loss does.

Each module also declares ``OPTIONS``: every option its functions accept, as
``{name: (default, one-line meaning)}``; an option not listed there is refused (`TaskOptionError`
names the valid ones), so that a misspelt option never passes silently.

``TASKS`` names the variants the CLI accepts (``--tasks mmlu,gsm8k_direct``); a variant is a
module plus default options.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

from qtulu.errors import QtuluError


class TaskOptionError(QtuluError, KeyError):
    """An unknown task or task option: the message lists the valid ones."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""

TASKS: dict[str, tuple[str, dict[str, Any]]] = {
    "mmlu": ("mmlu", {"k_shot": 0}),
    "mmlu_5shot": ("mmlu", {"k_shot": 5}),
    "gsm8k": ("gsm8k", {"cot": True}),
    "gsm8k_direct": ("gsm8k", {"cot": False}),
    "bbh": ("bbh", {"cot": True}),
    "bbh_direct": ("bbh", {"cot": False}),
    "tydiqa": ("tydiqa", {"no_context": False}),
    "tydiqa_nocontext": ("tydiqa", {"no_context": True}),
    # the paper's Codex-Eval column: pass@10 of 20 samples at T 0.8; pass@1 at T 0.1 beside it
    "codex_humaneval": ("codex_humaneval", {"temperature": 0.8, "headline_k": 10}),
    "codex_humaneval_t01": ("codex_humaneval", {"temperature": 0.1, "headline_k": 1}),
    "alpaca_eval": ("alpaca_eval", {}),
    "toxigen": ("toxigen", {}),
    "truthfulqa_mc": ("truthfulqa", {"mode": "mc"}),
    "truthfulqa_gen": ("truthfulqa", {"mode": "gen"}),
    # not the paper's: the held-out splits of `qtulu demo`'s synthetic skills (--data-dir demo_out/data)
    "synthetic_upper": ("synthetic", {"skill": "upper"}),
    "synthetic_successor": ("synthetic", {"skill": "successor"}),
    "synthetic_copy": ("synthetic", {"skill": "copy"}),  # the warm-up skill: what an adapter keeps of the base
    # not the paper's: a training source's held-out rows (its hold_out), mean NLL per reply token
    # (options format, path, hold_out, ...: one study column per source, tasks.N.column)
    "reply_loss": ("reply_loss", {}),
}


NOT_THE_PAPERS = ("synthetic", "reply_loss")  # task modules "all" leaves out


@dataclass(frozen=True)
class Task:
    """A task variant: its module and the options passed to ``load``/``predict``/``score``."""

    name: str
    module: ModuleType
    opts: dict[str, Any] = field(default_factory=dict)

    @property
    def version(self) -> str:
        return self.module.VERSION


def get_task(name: str, **overrides: Any) -> Task:
    """The task variant called ``name`` (see ``TASKS``), options updated with ``overrides``."""
    if name not in TASKS:
        raise TaskOptionError(f"unknown task {name!r}; known tasks: {', '.join(sorted(TASKS))}")
    module_name, opts = TASKS[name]
    module = importlib.import_module(f"{__name__}.{module_name}")
    check_options(name, module, overrides)
    return Task(name, module, {**opts, **overrides})


def check_options(name: str, module: ModuleType, options: dict[str, Any]) -> None:
    """Refuse an option ``module`` does not declare in its ``OPTIONS`` (naming the valid ones)."""
    known = getattr(module, "OPTIONS", {})
    unknown = sorted(set(options) - set(known))
    if unknown:
        valid = ", ".join(f"{k} (default {v[0]!r})" for k, v in sorted(known.items())) or "none"
        raise TaskOptionError(f"task {name!r}: unknown option{'s' if len(unknown) > 1 else ''} "
                              f"{', '.join(map(repr, unknown))}; valid options: {valid}")


def parse_task_list(spec: str | list[str]) -> list[str]:
    """"mmlu,gsm8k" or ["mmlu", "gsm8k"] -> validated names ("all" = every variant of the paper's suite)."""
    names = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec) if s.strip()]
    if names == ["all"]:  # the paper's suite (the demo's synthetic skills and reply_loss are not part of it)
        return [n for n, (module, _) in TASKS.items() if module not in NOT_THE_PAPERS]
    for n in names:
        if n not in TASKS:
            raise TaskOptionError(f"unknown task {n!r}; known tasks: {', '.join(sorted(TASKS))}")
    return names
