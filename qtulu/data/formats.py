"""One converter per native schema, each to conversations ``[{"role", "content"}, ...]``.

A converter takes the rows of one source as ``(where, row)`` pairs (``where`` = ``file:line`` or
``source[index]``) and the source's ``options``, and yields ``(where, messages)`` or
``(where, BadRow)``; a row may give zero, one or many conversations (self-instruct instances,
SuperNI instances, OASST1 trees). The generic checks (roles, null/empty content, UTF-8, special
tokens) happen afterwards in `qtulu.data.chat.validate_messages`; converters only report what is
wrong with their own schema (a missing field, a wrong type, an unknown speaker).

Prompt layouts follow open-instruct's ``reformat_datasets.py`` (the Tulu conversion):
instruction and input joined by a blank line; SuperNI as Tk-Instruct (definition, k positive
examples, then the instance); FLAN/CoT inputs and targets as they are.
"""

from __future__ import annotations

import random
import re
from collections import defaultdict
from typing import Any, Callable, Iterable, Iterator

from qtulu.data.errors import BadRow, DataError
from qtulu.recipes import FORMATS

Row = tuple[str, Any]
Out = Iterator[tuple[str, "list[dict[str, str]] | BadRow"]]


# --------------------------------------------------------------------------------------------
# field helpers


def _require_dict(row: Any) -> dict:
    if not isinstance(row, dict):
        raise BadRow("bad_row_type", f"expected a JSON object, got {type(row).__name__}")
    return row


def _text(row: dict, key: str, *, required: bool = True, default: str = "") -> str:
    """A string field: missing -> ``missing_field``; null -> ``null_content``; non-str -> ``bad_content_type``."""
    if key not in row:
        if required:
            raise BadRow("missing_field", f"no {key!r} field (fields: {', '.join(map(str, row))})")
        return default
    v = row[key]
    if v is None:
        if required:
            raise BadRow("null_content", f"field {key!r} is null")
        return default
    if not isinstance(v, str):
        raise BadRow("bad_content_type", f"field {key!r} is {type(v).__name__}, not str")
    return v


def _join(*parts: str) -> str:
    return "\n\n".join(p.strip() for p in parts if p and p.strip())


def _rowwise(fn: Callable[[dict, dict], list[list[dict[str, str]]]]):
    """Wrap ``fn(row, options) -> [messages, ...]`` into a converter that turns errors into BadRow items."""

    def convert(rows: Iterable[Row], options: dict) -> Out:
        for where, row in rows:
            if isinstance(row, BadRow):
                yield where, row
                continue
            try:
                convs = fn(_require_dict(row), options)
            except BadRow as e:
                yield where, e.at(where)
                continue
            for c in convs:
                yield where, c

    convert.__doc__ = fn.__doc__
    convert.__name__ = fn.__name__
    return convert


def _pair(user: str, assistant: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]


# --------------------------------------------------------------------------------------------
# converters


def alpaca(row: dict, options: dict) -> list[list[dict[str, str]]]:
    """Alpaca / Code-Alpaca / GPT4-Alpaca: ``instruction``, ``input`` (optional), ``output``;
    LIMA-style ``history`` = ``[[user, assistant], ...]`` earlier turns; optional ``system``."""
    msgs: list[dict[str, str]] = []
    system = _text(row, "system", required=False)
    if system.strip():
        msgs.append({"role": "system", "content": system})
    history = row.get("history") or []
    if not isinstance(history, list):
        raise BadRow("bad_content_type", f"'history' is {type(history).__name__}, not a list of [user, assistant]")
    for i, turn in enumerate(history):
        if not isinstance(turn, (list, tuple)) or len(turn) != 2:
            raise BadRow("bad_message", f"history[{i}] is not a [user, assistant] pair")
        if turn[0] is None or turn[1] is None:
            raise BadRow("null_content", f"history[{i}] has a null turn")
        msgs += _pair(turn[0], turn[1])
    prompt = _join(_text(row, "instruction"), _text(row, "input", required=False))
    return [msgs + _pair(prompt, _text(row, "output"))]


def dolly(row: dict, options: dict) -> list[list[dict[str, str]]]:
    """Dolly 15k: ``instruction``, ``context`` (optional), ``response``."""
    prompt = _join(_text(row, "instruction"), _text(row, "context", required=False))
    return [_pair(prompt, _text(row, "response"))]


_SHAREGPT_ROLES = {
    "human": "user", "user": "user",
    "gpt": "assistant", "chatgpt": "assistant", "bard": "assistant", "bing": "assistant",
    "assistant": "assistant", "model": "assistant",
    "system": "system",
}


def sharegpt(row: dict, options: dict) -> list[list[dict[str, str]]]:
    """ShareGPT: ``conversations`` (or ``items``) = ``[{"from": human|gpt|system, "value"}]``.

    A leading assistant turn (the reply to a prompt that was not shared) is dropped, as FastChat
    does. Splitting long conversations needs token counts and happens in the build (option
    ``split_long``).
    """
    conv = row.get("conversations", row.get("items"))
    if conv is None:
        raise BadRow("missing_field", "no 'conversations' field")
    if not isinstance(conv, list):
        raise BadRow("bad_content_type", f"'conversations' is {type(conv).__name__}, not a list")
    msgs = []
    for i, turn in enumerate(conv):
        if not isinstance(turn, dict):
            raise BadRow("bad_message", f"turn {i} is not an object")
        speaker = _text(turn, "from")
        role = _SHAREGPT_ROLES.get(speaker.lower())
        if role is None:
            raise BadRow("unknown_role", f"turn {i} is from {speaker!r} (expected human, gpt or system)")
        if "value" not in turn:
            raise BadRow("missing_field", f"turn {i} has no 'value'")
        msgs.append({"role": role, "content": turn["value"]})
    while msgs and msgs[0]["role"] == "assistant":
        msgs.pop(0)
    return [msgs]


def _instances(row: dict) -> list:
    inst = row.get("instances")
    if inst is None:
        raise BadRow("missing_field", "no 'instances' field")
    if not isinstance(inst, list):
        raise BadRow("bad_content_type", f"'instances' is {type(inst).__name__}, not a list")
    return inst


def self_instruct(row: dict, options: dict) -> list[list[dict[str, str]]]:
    """Self-Instruct: ``instruction`` + ``instances`` = ``[{"input", "output"}]`` (one example per
    instance); also the flat ``instruction/input/output`` and the ``prompt/completion`` releases."""
    if "prompt" in row and "completion" in row and "instruction" not in row:
        return [_pair(_text(row, "prompt"), _text(row, "completion"))]
    instruction = _text(row, "instruction")
    if "instances" not in row:
        return [_pair(_join(instruction, _text(row, "input", required=False)), _text(row, "output"))]
    out = []
    for i, inst in enumerate(_instances(row)):
        if not isinstance(inst, dict):
            raise BadRow("bad_message", f"instances[{i}] is not an object")
        out.append(_pair(_join(instruction, _text(inst, "input", required=False)), _text(inst, "output")))
    return out


def unnatural_instructions(row: dict, options: dict) -> list[list[dict[str, str]]]:
    """Unnatural Instructions: ``instruction`` + ``instances`` = ``[{"instruction_with_input", "input",
    "constraints", "output"}]``; constraints (when not "None") follow the prompt on a new line.
    Option ``reformulations: true`` also uses the ``reformulations`` list (same fields)."""
    items = list(_instances(row))
    if options.get("reformulations"):
        items += row.get("reformulations") or []
    instruction = row.get("instruction") or ""
    out = []
    for i, inst in enumerate(items):
        if not isinstance(inst, dict):
            raise BadRow("bad_message", f"instance {i} is not an object")
        if "instruction_with_input" in inst:
            prompt = _text(inst, "instruction_with_input")
        else:
            if not isinstance(instruction, str) or not instruction:
                raise BadRow("missing_field", f"instance {i} has no 'instruction_with_input' and the row no 'instruction'")
            prompt = _join(instruction, _text(inst, "input", required=False))
        constraints = _text(inst, "constraints", required=False).strip()
        if constraints and constraints != "None":
            prompt = prompt.strip() + "\n" + constraints
        out.append(_pair(prompt, _text(inst, "output")))
    return out


def _superni_prompt(definition: str, positives: list[tuple[str, str]], inp: str) -> str:
    parts = [f"Definition: {definition.strip()}"]
    for k, (x, y) in enumerate(positives, 1):
        parts.append(f"Positive Example {k} -\nInput: {x.strip()}\nOutput: {y.strip()}")
    parts.append(f"Now complete the following example -\nInput: {inp.strip()}\nOutput:")
    return "\n\n".join(parts)


def _superni_shots(options: dict, rng: random.Random) -> int:
    shots = options.get("shots", "mixed")
    k = int(options.get("num_pos_examples", 2))
    if shots == "zero":
        return 0
    if shots == "few":
        return k
    if shots == "mixed":
        return k if rng.random() < 0.5 else 0
    raise BadRow("bad_option", f"superni option shots={shots!r} (expected zero, few or mixed)")


def superni(rows: Iterable[Row], options: dict) -> Out:
    """Super-NaturalInstructions. Raw task files (one row per task: ``Definition`` (list or str),
    ``Positive Examples`` = ``[{"input", "output"}]``, ``Instances`` = ``[{"input", "output": [..]}]``)
    give up to ``max_instances_per_task`` examples per task; per-instance rows (``definition``,
    ``inputs``, ``targets``, optional ``positive_examples``) give one each. ``shots``: zero, few
    (``num_pos_examples`` positive examples) or mixed (each instance 0- or k-shot at random, as
    open-instruct's Tulu SuperNI data), seeded by ``seed``."""
    rng = random.Random(options.get("seed", 0))
    max_per_task = options.get("max_instances_per_task")
    for where, row in rows:
        if isinstance(row, BadRow):
            yield where, row
            continue
        try:
            row = _require_dict(row)
            if "Instances" in row or "Definition" in row:
                definition = row.get("Definition")
                if isinstance(definition, list):
                    definition = " ".join(d for d in definition if isinstance(d, str))
                if not isinstance(definition, str) or not definition.strip():
                    raise BadRow("missing_field", "task has no 'Definition'")
                pos = [(_text(p, "input"), _text(p, "output")) for p in row.get("Positive Examples") or [] if isinstance(p, dict)]
                instances = row.get("Instances")
                if not isinstance(instances, list):
                    raise BadRow("missing_field", "task has no 'Instances' list")
                if max_per_task is not None and len(instances) > max_per_task:
                    instances = rng.sample(instances, int(max_per_task))
                out = []
                for i, inst in enumerate(instances):
                    if not isinstance(inst, dict):
                        raise BadRow("bad_message", f"Instances[{i}] is not an object")
                    outputs = inst.get("output")
                    if isinstance(outputs, list):
                        outputs = outputs[0] if outputs else None
                    if not isinstance(outputs, str):
                        raise BadRow("null_content", f"Instances[{i}] has no output")
                    k = _superni_shots(options, rng)
                    out.append(_pair(_superni_prompt(definition, pos[:k], _text(inst, "input")), outputs))
            else:
                definition = _text(row, "definition")
                pos_raw = row.get("positive_examples") or []
                pos = [(_text(p, "input"), _text(p, "output")) for p in pos_raw if isinstance(p, dict)]
                k = _superni_shots(options, rng)
                out = [_pair(_superni_prompt(definition, pos[:k], _text(row, "inputs")), _text(row, "targets"))]
        except BadRow as e:
            yield where, e.at(where)
            continue
        for c in out:
            yield where, c


_SHOTS = {"zero": ("zs",), "few": ("fs",), "all": None}


def _inputs_targets(row: dict, options: dict) -> list[list[dict[str, str]]]:
    shots = options.get("shots", "all")
    if shots not in _SHOTS:
        raise BadRow("bad_option", f"option shots={shots!r} (expected zero, few or all)")
    prefixes = _SHOTS[shots]
    if prefixes is not None:
        tt = _text(row, "template_type")
        if not tt.startswith(prefixes):
            return []  # filtered: another shot setting
    return [_pair(_text(row, "inputs"), _text(row, "targets"))]


def flan_v2(row: dict, options: dict) -> list[list[dict[str, str]]]:
    """FLAN V2 collection: ``inputs`` / ``targets``; option ``shots`` (zero | few | all) filters on
    ``template_type`` (``zs_*`` / ``fs_*``; few-shot exemplars are already inside ``inputs``)."""
    return _inputs_targets(row, options)


def cot(row: dict, options: dict) -> list[list[dict[str, str]]]:
    """FLAN chain-of-thought submix: ``inputs`` / ``targets`` (the rationale then the answer);
    ``shots`` as for flan_v2."""
    return _inputs_targets(row, options)


_BAIZE_SPLIT = re.compile(r"\[\|(Human|AI)\|\]")


def baize(row: dict, options: dict) -> list[list[dict[str, str]]]:
    """Baize: ``input`` = ``"<preamble>[|Human|] ...\\n[|AI|] ...\\n[|Human|] "``; the preamble and the
    trailing empty human turn are dropped."""
    transcript = _text(row, "input")
    pieces = _BAIZE_SPLIT.split(transcript)
    if len(pieces) < 3:
        raise BadRow("bad_transcript", "no [|Human|] / [|AI|] turns in 'input'")
    msgs = []
    for speaker, text in zip(pieces[1::2], pieces[2::2]):
        msgs.append({"role": "user" if speaker == "Human" else "assistant", "content": text})
    while msgs and msgs[-1]["role"] == "user" and not msgs[-1]["content"].strip():
        msgs.pop()
    return [msgs]


def messages(row: dict, options: dict) -> list[list[dict[str, str]]]:
    """Plain ``{"messages": [{"role", "content"}, ...]}`` (roles system/user/assistant)."""
    if "messages" not in row:
        raise BadRow("missing_field", "no 'messages' field")
    return [row["messages"]]


def oasst1(rows: Iterable[Row], options: dict) -> Out:
    """OpenAssistant OASST1: one row per message (``message_id``, ``parent_id``, ``role`` prompter |
    assistant, ``text``, optional ``lang``, ``deleted``, ``review_result``, ``rank``). Trees are
    rebuilt and every root-to-leaf path ending on an assistant turn is one conversation.
    Deleted or rejected messages are left out with their subtrees. Options: ``top_k_replies``
    (keep only the k best-ranked children of each message), ``lang`` (keep trees in that language)."""
    top_k = options.get("top_k_replies")
    lang = options.get("lang")
    nodes: dict[str, dict] = {}
    where_of: dict[str, str] = {}
    children: dict[str | None, list[str]] = defaultdict(list)
    all_ids: set[str] = set()  # deleted/rejected ones too: their subtrees go quietly, true orphans do not
    for where, row in rows:
        if isinstance(row, BadRow):
            yield where, row
            continue
        try:
            row = _require_dict(row)
            mid = row.get("message_id")
            if not isinstance(mid, str) or not mid:
                raise BadRow("missing_field", "no 'message_id'")
            role = _text(row, "role")
            if role not in ("prompter", "assistant"):
                raise BadRow("unknown_role", f"role {role!r} (expected prompter or assistant)")
            _text(row, "text")
            if mid in all_ids:
                raise BadRow("duplicate_id", f"message_id {mid!r} seen before at {where_of[mid]}")
        except BadRow as e:
            yield where, e.at(where)
            continue
        all_ids.add(mid)
        where_of[mid] = where
        if row.get("deleted") or row.get("review_result") is False:
            continue
        nodes[mid] = row
        children[row.get("parent_id")].append(mid)

    def kept_children(mid: str) -> list[str]:
        kids = children.get(mid, [])
        if top_k is not None:
            ranked = sorted((k for k in kids if nodes[k].get("rank") is not None), key=lambda k: nodes[k]["rank"])
            unranked = [k for k in kids if nodes[k].get("rank") is None]
            kids = (ranked + unranked)[: int(top_k)]
        return kids

    for mid, parent in ((m, nodes[m].get("parent_id")) for m in list(nodes)):
        if parent is not None and parent not in nodes:
            # a reply whose parent is missing or was filtered out; report only truly orphaned rows
            if parent not in all_ids:
                yield where_of[mid], BadRow("orphan_message", f"parent_id {parent!r} not found", where_of[mid])

    for root in children.get(None, []):
        if nodes[root]["role"] != "prompter":
            yield where_of[root], BadRow("bad_tree", "tree root is not a prompter message", where_of[root])
            continue
        if lang is not None and nodes[root].get("lang") != lang:
            continue
        stack = [(root, [root])]
        while stack:
            mid, path = stack.pop()
            kids = [k for k in kept_children(mid) if nodes[k]["role"] != nodes[mid]["role"]]
            if nodes[mid]["role"] == "assistant":
                # a leaf for our purpose: no prompter child that itself has an assistant reply
                cont = [k for k in kids if any(nodes[g]["role"] == "assistant" for g in kept_children(k))]
                if not cont:
                    yield where_of[path[-1]], [
                        {"role": "user" if nodes[p]["role"] == "prompter" else "assistant", "content": nodes[p]["text"]}
                        for p in path
                    ]
                    continue
                kids = cont
            for k in reversed(kids):
                stack.append((k, path + [k]))


CONVERTERS: dict[str, Callable[[Iterable[Row], dict], Out]] = {
    "alpaca": _rowwise(alpaca),
    "dolly": _rowwise(dolly),
    "oasst1": oasst1,
    "sharegpt": _rowwise(sharegpt),
    "self_instruct": _rowwise(self_instruct),
    "unnatural_instructions": _rowwise(unnatural_instructions),
    "superni": superni,
    "flan_v2": _rowwise(flan_v2),
    "cot": _rowwise(cot),
    "baize": _rowwise(baize),
    "messages": _rowwise(messages),
}

# options each converter understands (anything else in a recipe is an error naming the source)
OPTIONS: dict[str, set[str]] = {
    "alpaca": set(),
    "dolly": set(),
    "oasst1": {"top_k_replies", "lang"},
    "sharegpt": {"split_long"},
    "self_instruct": set(),
    "unnatural_instructions": {"reformulations"},
    "superni": {"shots", "num_pos_examples", "max_instances_per_task", "seed"},
    "flan_v2": {"shots"},
    "cot": {"shots"},
    "baize": set(),
    "messages": {"split_long"},
}
assert set(CONVERTERS) == set(FORMATS) == set(OPTIONS), "formats.CONVERTERS and recipes.FORMATS disagree"


def check_options(fmt: str, options: dict, source: str) -> None:
    """`DataError` naming the source when ``options`` has a key the converter does not understand."""
    unknown = set(options) - OPTIONS[fmt]
    if unknown:
        valid = ", ".join(sorted(OPTIONS[fmt])) or "none"
        raise DataError(f"source {source!r} (format {fmt}): unknown option(s) {sorted(unknown)} (valid: {valid})")


def convert(fmt: str, rows: Iterable[Row], options: dict | None = None) -> Out:
    """Run the converter ``fmt`` over ``(where, row)`` pairs: yields ``(where, messages | BadRow)``."""
    if fmt not in CONVERTERS:
        raise DataError(f"unknown format {fmt!r} (known: {', '.join(CONVERTERS)})")
    return CONVERTERS[fmt](rows, dict(options or {}))
