"""OpenAssistant OASST1: message trees -> one conversation per kept root-to-assistant path.

Reference: open-instruct ``open_instruct/reformat_datasets.py`` ``convert_oasst1_data`` at
e44fcf588 (June 2023, the Tülu paper's data), reading ``2023-04-12_oasst_ready.trees.jsonl``: a
depth-first walk from each tree's prompt, replies in file order, that writes the path to *every*
assistant message, intermediate ones included (so earlier turns repeat across examples).
open-instruct later changed its mind; each change is an option here, off by default:

- ``leaf_only`` (853377e82, Aug 2023): write only paths that end at an assistant message without
  replies;
- ``filter_creator_mentions`` (94055552c, Aug 2023): drop a message and its subtree when its text
  mentions "LAION", "Open Asssistant" (sic) or "OpenAssistant";
- ``skip_deleted`` and ``top_k_replies`` (503407ee8, Oct 2023): leave out deleted messages; follow
  only the k replies with the highest ``labels.quality.value`` (0 when unlabelled; ties keep file
  order).

``lang`` (qtulu's) keeps only trees whose prompt is in that language; a tree whose ``tree_state``
is given and is not ``ready_for_export`` is left out (the "ready" file open-instruct read has no
other). Both the trees file (one tree a line) and the flat one-message-per-row release (the hub's
``OpenAssistant/oasst1``: ``message_id``, ``parent_id``, ...) are read; flat rows are assembled into
trees with replies in file order.
"""

from __future__ import annotations

from typing import Iterable

from qtulu.data.errors import BadRow
from qtulu.data.formats._rows import Context, Filtered, Messages, Out, Row, checked

CREATOR_MENTIONS = ("LAION", "Open Asssistant", "OpenAssistant")  # 94055552c's list, misspelling included


def _quality(node: dict) -> float:
    labels = node.get("labels")
    if isinstance(labels, dict):
        q = labels.get("quality")
        if isinstance(q, dict) and isinstance(q.get("value"), (int, float)):
            return float(q["value"])
        names, values = labels.get("name"), labels.get("value")  # the flat release: parallel lists
        if isinstance(names, list) and isinstance(values, list) and "quality" in names:
            v = values[names.index("quality")]
            return float(v) if isinstance(v, (int, float)) else 0.0
    return 0.0


def _check_tree(node: dict, path: str = "prompt") -> bool:
    """Validate a tree; True when it holds an assistant message."""
    if not isinstance(node, dict):
        raise BadRow("bad_message", f"{path} is not an object")
    role = node.get("role")
    if role not in ("prompter", "assistant"):
        raise BadRow("unknown_role", f"{path} has role {role!r} (expected prompter or assistant)")
    if not isinstance(node.get("text"), str):
        raise BadRow("missing_field" if "text" not in node else "bad_content_type", f"{path} has no text string")
    replies = node.get("replies") or []
    if not isinstance(replies, list):
        raise BadRow("bad_content_type", f"{path}.replies is not a list")
    found = role == "assistant"
    for i, child in enumerate(replies):
        found |= _check_tree(child, f"{path}.replies[{i}]")
    return found


def tree_paths(root: dict, options: dict) -> list[Messages]:
    """The conversations the reference's walk writes for one (validated) tree, in its order."""
    leaf_only = bool(options.get("leaf_only"))
    skip_deleted = bool(options.get("skip_deleted"))
    creator = bool(options.get("filter_creator_mentions"))
    top_k = options.get("top_k_replies")
    out: list[Messages] = []
    path: Messages = []

    def children(node: dict) -> list[dict]:
        kids = node.get("replies") or []
        if skip_deleted:
            kids = [k for k in kids if not k.get("deleted")]
        if top_k is not None:
            kids = sorted(kids, key=_quality, reverse=True)[: int(top_k)]
        return kids

    def walk(node: dict) -> None:
        if creator and any(s in node["text"] for s in CREATOR_MENTIONS):
            return
        if skip_deleted and node.get("deleted"):
            return
        assistant = node["role"] == "assistant"
        path.append({"role": "assistant" if assistant else "user", "content": node["text"]})
        if assistant and (not leaf_only or not node.get("replies")):
            out.append(list(path))
        for child in children(node):
            walk(child)
        path.pop()

    walk(root)
    return out


def _convert_tree(tree: dict, options: dict) -> list[Messages] | Filtered:
    state = tree.get("tree_state")
    if state is not None and state != "ready_for_export":
        return Filtered("tree_not_ready", f"tree_state {state!r}")
    root = tree["prompt"]
    if not _check_tree(root):
        raise BadRow("no_assistant_reply", "the tree has no assistant message")
    lang = options.get("lang")
    if lang is not None and root.get("lang") != lang:
        return Filtered("other_language", f"tree in {root.get('lang')!r}")
    paths = tree_paths(root, options)
    return paths if paths else Filtered("no_path_left", "every path was left out by the options")


def oasst1(rows: Iterable[Row], options: dict, ctx: Context) -> Out:
    """OASST1 trees (``{"message_tree_id", "tree_state", "prompt": {message, "replies": [...]}}``) or
    flat messages (``message_id``, ``parent_id``, ``role`` prompter | assistant, ``text``, ...)."""
    flat: dict[str, dict] = {}
    where_of: dict[str, str] = {}
    order: list[tuple[str, str | None]] = []  # (message_id, parent_id) in file order

    def check(row: dict, where: str):
        if "prompt" in row and "message_id" not in row:  # a whole tree: converted here
            if not isinstance(row["prompt"], dict):
                raise BadRow("bad_message", "'prompt' is not a message object")
            return _convert_tree(row, options)
        mid = row.get("message_id")
        if not isinstance(mid, str) or not mid:
            raise BadRow("missing_field", "no 'message_id' (and no 'prompt': neither a flat message nor a tree)")
        if mid in flat:
            raise BadRow("duplicate_id", f"message_id {mid!r} seen before at {where_of[mid]}")
        return row  # a flat message: kept until its tree is whole

    for where, item in checked(rows, check):
        if isinstance(item, (BadRow, Filtered)):
            yield where, item
        elif isinstance(item, dict):
            flat[item["message_id"]] = {**item, "replies": []}
            where_of[item["message_id"]] = where
            order.append((item["message_id"], item.get("parent_id")))
        else:
            for conv in item:
                yield where, conv
    yield from _flat_trees(flat, where_of, order, options)


def _flat_trees(flat: dict, where_of: dict, order: list, options: dict) -> Out:
    roots = []
    for mid, parent in order:
        if parent is None:
            roots.append(mid)
        elif parent in flat:
            flat[parent]["replies"].append(flat[mid])
        else:
            yield where_of[mid], BadRow("orphan_message", f"parent_id {parent!r} not found", where_of[mid])
    for mid in roots:
        node = flat[mid]
        tree = {"prompt": node, "tree_state": node.get("tree_state")}
        try:
            result = _convert_tree(tree, options)
        except BadRow as e:
            yield where_of[mid], e.at(where_of[mid])
            continue
        if isinstance(result, Filtered):
            yield where_of[mid], result
        else:
            for conv in result:
                yield where_of[mid], conv
