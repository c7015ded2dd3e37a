"""Super-NaturalInstructions: task files -> 60 zero-shot + 20 two-shot examples per task.

Reference: open-instruct ``open_instruct/reformat_datasets.py`` ``convert_super_ni_data`` at
e44fcf588 (June 2023), on the natural-instructions repository as ``scripts/prepare_train_data.sh``
downloads it: the tasks of ``splits/xlingual/train_tasks.txt`` except those with ``_mmmlu_`` in
their name (MMLU test leakage), in that file's order. Per task, with the instruction
``Definition[0]``: when it has more than 80 instances, 80 are drawn with ``random.sample``; the
first 60 of them become zero-shot examples through the weighted instruction templates (input =
the instance's input, output = its first output), the rest few-shot examples in the layout
``{definition}\\n\\nInput:\\n{x}\\nOutput:\\n{y}\\n\\n...Input:\\n{input}\\nOutput:\\n`` with 2
positive examples drawn with ``random.sample`` (all of them when there are 2 or fewer). The random
draws happen in that order, so one seed gives open-instruct's selection.

The source path is the repository root (``tasks/`` + ``splits/``), a folder of task files or one
task file (then the user chose the tasks; they are read in sorted order). Old task files with
``Definition`` as a string (not a list) are read whole (open-instruct's ``[0]`` would take its
first character).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

from qtulu.data.errors import BadRow, DataError
from qtulu.data.formats._rows import Context, Out, Row, checked, pair, require_dict, text
from qtulu.data.formats.templates import encode_few_shot, encode_instruction

SPLITS = ("xlingual", "default")


def is_repository(path: str | Path) -> bool:
    p = Path(path)
    return (p / "tasks").is_dir() and (p / "splits").is_dir()


def task_files(root: str | Path, options: dict) -> list[Path]:
    """The train task files of a natural-instructions checkout, in ``train_tasks.txt`` order."""
    split = options.get("split", "xlingual")
    listing = Path(root) / "splits" / split / "train_tasks.txt"
    if not listing.is_file():
        raise DataError(f"{listing}: not found (superni option split={split!r}; the repository has splits/{{{','.join(SPLITS)}}})")
    files = []
    for lineno, line in enumerate(listing.read_text(encoding="utf-8").splitlines(), 1):
        task = line.strip()
        if not task or (options.get("exclude_mmmlu", True) and "_mmmlu_" in task):
            continue
        f = Path(root) / "tasks" / f"{task}.json"
        if not f.is_file():
            raise DataError(f"{listing}:{lineno}: task {task!r} has no file {f}")
        files.append(f)
    return files


def _definition(task: dict) -> str:
    d = task.get("Definition")
    if isinstance(d, list) and d and isinstance(d[0], str):
        d = d[0]
    if not isinstance(d, str) or not d.strip():
        raise BadRow("missing_field", "task has no 'Definition' (a list of strings or a string)")
    return d


def _first_output(inst: dict) -> str:
    out = inst.get("output")
    if isinstance(out, list):
        out = out[0] if out else None
    if not isinstance(out, str):
        raise BadRow("null_content", "instance has no output string")
    return out


def _task(task: dict) -> tuple[str, list, list[tuple[str, str]]]:
    """A task file's definition, instances and positive examples (input, output); BadRow if malformed."""
    definition = _definition(task)
    instances = task.get("Instances")
    if not isinstance(instances, list):
        raise BadRow("missing_field", "task has no 'Instances' list")
    positives = task.get("Positive Examples") or []
    if not isinstance(positives, list) or not all(isinstance(p, dict) for p in positives):
        raise BadRow("bad_content_type", "'Positive Examples' is not a list of objects")
    return definition, instances, [(text(p, "input"), _first_output(p)) for p in positives]


def superni(rows: Iterable[Row], options: dict, ctx: Context) -> Out:
    """SuperNI task files (one row per task: ``Definition``, ``Positive Examples``, ``Instances``).
    Options: ``zero_shot_per_task`` (60), ``few_shot_per_task`` (20), ``n_few_shot`` (2), and for a
    repository root ``split`` (xlingual) and ``exclude_mmmlu`` (true)."""
    n_zero = int(options.get("zero_shot_per_task", 60))
    n_few = int(options.get("few_shot_per_task", 20))
    n_shot = int(options.get("n_few_shot", 2))
    rng = ctx.rng
    for where, task in checked(rows, lambda row, _: _task(row)):
        if isinstance(task, BadRow):
            yield where, task
            continue
        definition, instances, shots = task
        chosen = list(range(len(instances)))
        if n_zero + n_few < len(instances):
            chosen = rng.sample(chosen, k=n_zero + n_few)
        for k, i in enumerate(chosen):
            at = f"{where} Instances[{i}]"
            exemplars = None
            if k >= n_zero:
                exemplars = rng.sample(shots, k=n_shot) if n_shot < len(shots) else shots
            try:
                inst = require_dict(instances[i])
                inp, out = text(inst, "input"), _first_output(inst)
            except BadRow as e:
                yield at, e.at(at)
                continue
            if exemplars is None:
                prompt, completion = encode_instruction(definition, inp, out, rng if ctx.random_templates else None)
            else:
                prompt, completion = encode_few_shot(definition, exemplars, inp, out)
            yield at, pair(prompt, completion)

