"""Instruction-style sources: one (instruction, input, output) triple -> one user turn + one reply.

Reference: open-instruct ``open_instruct/reformat_datasets.py`` at e44fcf588 (June 2023):
``convert_{stanford_alpaca,code_alpaca,gpt4_alpaca,dolly,self_instruct,unnatural_instructions}_data``
all call ``encode_instruction_example(..., random_template=True)`` (see `templates`), one random
draw per example in file order. Unnatural Instructions appends an instance's constraints to the
task instruction on a new line unless they are "none"/"none." (any case).

qtulu additions, not in that converter: Alpaca rows may carry a ``system`` prompt and LIMA-style
``history`` (``[[user, assistant], ...]``): such a multi-turn row is taken verbatim (no template),
as open-instruct's LIMA converter (94055552c) takes conversations. Self-Instruct seed-task rows with
``instances`` give one example per instance; ``prompt``/``completion`` rows are taken verbatim.
"""

from __future__ import annotations

from qtulu.data.errors import BadRow
from qtulu.data.formats._rows import Context, Messages, pair, text
from qtulu.data.formats.templates import encode_instruction


def _encode(instruction: str, inp: str | None, output: str, ctx: Context) -> Messages:
    prompt, completion = encode_instruction(instruction, inp, output, ctx.rng if ctx.random_templates else None)
    return pair(prompt, completion)


def alpaca(row: dict, options: dict, ctx: Context) -> list[Messages]:
    """Alpaca / Code-Alpaca / GPT4-Alpaca: ``instruction``, ``input`` (optional), ``output``; optional
    ``system`` and LIMA-style ``history`` (then the turns are taken verbatim)."""
    instruction = text(row, "instruction")
    inp = text(row, "input", required=False)
    output = text(row, "output")
    system = text(row, "system", required=False)
    history = row.get("history") or []
    if not isinstance(history, list):
        raise BadRow("bad_content_type", f"'history' is {type(history).__name__}, not a list of [user, assistant]")
    msgs: Messages = [{"role": "system", "content": system}] if system.strip() else []
    for i, turn in enumerate(history):
        if not isinstance(turn, (list, tuple)) or len(turn) != 2:
            raise BadRow("bad_message", f"history[{i}] is not a [user, assistant] pair")
        if turn[0] is None or turn[1] is None:
            raise BadRow("null_content", f"history[{i}] has a null turn")
        msgs += pair(turn[0], turn[1])
    if history:
        prompt = instruction.strip() + ("\n\n" + inp.strip() if inp.strip() else "")
        return [msgs + pair(prompt, output)]
    return [msgs + _encode(instruction, inp, output, ctx)]


def dolly(row: dict, options: dict, ctx: Context) -> list[Messages]:
    """Dolly 15k: ``instruction``, ``context`` (the input, often empty), ``response``."""
    instruction = text(row, "instruction")
    context = text(row, "context", required=False)
    return [_encode(instruction, context, text(row, "response"), ctx)]


def self_instruct(row: dict, options: dict, ctx: Context) -> list[Messages]:
    """Self-Instruct: flat ``instruction/input/output`` (``all_instances_82K.jsonl``, what open-instruct
    read), seed tasks ``instruction`` + ``instances`` (one example per instance), or ``prompt/completion``."""
    if "prompt" in row and "completion" in row and "instruction" not in row:
        return [pair(text(row, "prompt"), text(row, "completion"))]
    instruction = text(row, "instruction")
    if "instances" not in row:
        return [_encode(instruction, text(row, "input", required=False), text(row, "output"), ctx)]
    instances = _instances(row, "instances")
    fields = []
    for i, inst in enumerate(instances):
        if not isinstance(inst, dict):
            raise BadRow("bad_message", f"instances[{i}] is not an object")
        fields.append((text(inst, "input", required=False), text(inst, "output")))
    return [_encode(instruction, inp, out, ctx) for inp, out in fields]


def _instances(row: dict, key: str) -> list:
    inst = row.get(key)
    if inst is None:
        raise BadRow("missing_field", f"no {key!r} field")
    if not isinstance(inst, list):
        raise BadRow("bad_content_type", f"{key!r} is {type(inst).__name__}, not a list")
    return inst


def _no_constraint(constraints: str) -> bool:
    return not constraints or constraints.lower() in ("none", "none.")


def unnatural_instructions(row: dict, options: dict, ctx: Context) -> list[Messages]:
    """Unnatural Instructions (``core_data.jsonl``): ``instruction`` + ``instances`` = ``[{"input",
    "constraints", "output"}]``; the constraints follow the instruction on a new line unless they are
    none. Option ``reformulations: true`` also uses each row's ``reformulations`` (their own
    ``instruction``, ``input``, ``output``; not used by open-instruct)."""
    instruction = text(row, "instruction")
    items = []
    for i, inst in enumerate(_instances(row, "instances")):
        if not isinstance(inst, dict):
            raise BadRow("bad_message", f"instances[{i}] is not an object")
        constraints = text(inst, "constraints", required=False)
        instr = instruction if _no_constraint(constraints) else instruction + "\n" + constraints
        items.append((instr, text(inst, "input", required=False), text(inst, "output")))
    if options.get("reformulations"):
        for i, ref in enumerate(row.get("reformulations") or []):
            if not isinstance(ref, dict):
                raise BadRow("bad_message", f"reformulations[{i}] is not an object")
            items.append((text(ref, "instruction"), text(ref, "input", required=False), text(ref, "output")))
    return [_encode(instr, inp, out, ctx) for instr, inp, out in items]
