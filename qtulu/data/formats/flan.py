"""FLAN V2 and its chain-of-thought submix: ``inputs`` / ``targets`` rows of the FLAN collection.

References (open-instruct):

- ``scripts/resample_flan_v2.py`` at e44fcf588: the Tülu V1 FLAN data is 100k rows drawn from the
  FLAN 2022 submixes in fixed shares (flan 40%, t0 32%, niv2 20%, cot 5%, dialog 3%; each split
  evenly between zero/few-shot and, for flan and t0, with/without options): per submix file, in
  that order, ``random.sample(range(num_lines), int(share * total))``, rows kept in file order.
  The Tülu V2 shares (few-shot only, 50k) are those of 94055552c. Option ``resample: 100000``
  applies it to the submix files (``flan_zsopt.jsonl`` ...) or to rows that carry ``task_source`` and
  ``template_type``; without it the rows are taken as given (open-instruct's released
  ``flan_v2_resampled_100k.jsonl``).
- ``open_instruct/reformat_datasets.py`` ``convert_cot_data`` / ``convert_flan_v2_data`` at
  e44fcf588: CoT is ``random.sample(k=50000)`` of ``cot_zsopt.jsonl`` then of ``cot_fsopt.jsonl``
  (only the ``*_opt`` template types); a prompt that ends neither with a newline nor (ignoring
  trailing spaces) with ":" gets a newline; the targets are the reply.
"""

from __future__ import annotations

import re
from collections import defaultdict
from typing import Iterable

from qtulu.data.errors import BadRow, DataError
from qtulu.data.formats._rows import Context, Filtered, Messages, Out, Row, checked, file_stem, pair, text

_TULU_V1 = {
    "flan_zsopt": 0.1, "flan_fsopt": 0.1, "flan_zsnoopt": 0.1, "flan_fsnoopt": 0.1,
    "t0_zsopt": 0.08, "t0_fsopt": 0.08, "t0_zsnoopt": 0.08, "t0_fsnoopt": 0.08,
    "niv2_zsopt": 0.1, "niv2_fsopt": 0.1, "cot_zsopt": 0.025, "cot_fsopt": 0.025,
    "dialog_zsopt": 0.015, "dialog_fsopt": 0.015,
}
_TULU_V2 = {
    "flan_fsopt": 0.2, "flan_fsnoopt": 0.2, "t0_fsopt": 0.16, "t0_fsnoopt": 0.16,
    "niv2_fsopt": 0.23, "cot_fsopt": 0.05,
}
PORTIONS = {"tulu_v1": _TULU_V1, "tulu_v2": _TULU_V2}
_SOURCES = {"flan2021": "flan", "flan": "flan", "t0": "t0", "niv2": "niv2", "cot": "cot", "dialog": "dialog"}


def prompt_of(inputs: str) -> str:
    """open-instruct's rule: a newline after the inputs unless they end with one or with ":"."""
    if not inputs.endswith("\n") and not inputs.rstrip().endswith(":"):
        return inputs + "\n"
    return inputs


def _example(row: dict) -> Messages:
    return pair(prompt_of(text(row, "inputs")), text(row, "targets"))


_SUBMIX_FILE = re.compile(r"(?:^|_)(flan|t0|niv2|cot|dialog)_(zs|fs)_?(no)?opt(?:_|$)", re.I)


def _from_file(where: str) -> tuple[str, str] | None:
    """``(source, template_type)`` from a submix file name: ``cot_zsopt.jsonl`` (open-instruct's) or
    ``cot_zs_opt_train.jsonl`` (FLAN's export)."""
    m = _SUBMIX_FILE.search(file_stem(where))
    return (m.group(1).lower(), f"{m.group(2).lower()}_{'no' if m.group(3) else ''}opt") if m else None


def _template_type(row: dict, where: str) -> str | None:
    """``zs_opt`` / ``fs_opt`` / ``zs_noopt`` / ``fs_noopt`` from the row, else from a submix file name."""
    tt = row.get("template_type")
    if isinstance(tt, str) and tt:
        return tt
    found = _from_file(where)
    return found[1] if found else None


def _submix(row: dict, where: str) -> str | None:
    found = _from_file(where)
    if found:
        return f"{found[0]}_{found[1].replace('_', '')}"
    source, tt = row.get("task_source"), row.get("template_type")
    if isinstance(source, str) and isinstance(tt, str) and source.lower() in _SOURCES:
        return f"{_SOURCES[source.lower()]}_{tt.replace('_', '')}"
    return None


def _collect(rows: Iterable[Row], key) -> Out:
    """Validate rows; yield bad ones; return ``{key: [(where, example)]}`` in file order (via StopIteration)."""
    groups: dict = defaultdict(list)
    for where, item in checked(rows, lambda row, where: (_example(row), key(row, where))):
        if isinstance(item, BadRow):
            yield where, item
            continue
        ex, k = item
        groups[k].append((where, ex))
    return groups


def flan_v2(rows: Iterable[Row], options: dict, ctx: Context) -> Out:
    """FLAN V2 ``inputs`` / ``targets``. Options ``resample`` (total rows, e.g. 100000; null = take the
    rows as given) and ``portions`` (``tulu_v1`` | ``tulu_v2``: the submix shares)."""
    total = options.get("resample")
    if total is None:
        yield from checked(rows, lambda row, _: _example(row))
        return
    portions = PORTIONS[options.get("portions", "tulu_v1")]
    groups = yield from _collect(rows, _submix)
    for where, _ in groups.pop(None, []):
        yield where, BadRow("unknown_flan_submix", "neither a submix file (flan_zsopt.jsonl, ...) nor task_source + "
                            "template_type fields", where)
    for key, share in portions.items():
        n = int(share * int(total))
        have = groups.get(key, [])
        if n > len(have):
            raise DataError(f"flan_v2 resample={total}: submix {key} needs {n} rows and has {len(have)} "
                            f"(submixes present: {', '.join(sorted(groups)) or 'none'})")
        for i in sorted(ctx.rng.sample(range(len(have)), n)):
            yield have[i]
    for key in sorted(set(groups) - set(portions)):
        for where, _ in groups[key]:
            yield where, Filtered("submix_not_used", f"{key} has no share in portions {options.get('portions', 'tulu_v1')}")


def cot(rows: Iterable[Row], options: dict, ctx: Context) -> Out:
    """FLAN chain-of-thought rows. Options ``zero_shot`` / ``few_shot``: how many ``zs_opt`` / ``fs_opt``
    rows to draw (null = all), zero-shot first; other template types are not used."""
    groups = yield from _collect(rows, _template_type)
    for where, _ in groups.pop(None, []):
        yield where, BadRow("missing_field", "no 'template_type' and the file is not cot_zsopt / cot_fsopt", where)
    for kind in sorted(set(groups) - {"zs_opt", "fs_opt"}):
        for where, _ in groups[kind]:
            yield where, Filtered("template_type_not_used", f"{kind} (open-instruct used zs_opt and fs_opt)")
    for kind, option in (("zs_opt", "zero_shot"), ("fs_opt", "few_shot")):
        chosen = groups.get(kind, [])
        k = options.get(option)
        if k is not None and int(k) < len(chosen):
            chosen = ctx.rng.sample(chosen, k=int(k))
        yield from chosen
