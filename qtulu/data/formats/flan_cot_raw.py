"""FLAN's raw chain-of-thought rows (``flan/v2/cot_data/gsm8k_train.tsv``: question, answer, rationale
per line) rendered as FLAN 2022 renders them into its zero-shot CoT submix (``cot_zsopt``), then
converted by the `cot` converter exactly as a ``cot_zsopt.jsonl`` row of open-instruct.

References, google-research/FLAN at e9e4ec6e2 (2023-06-02; last changes: templates.py 2c79a31,
preprocessors.py 5adf329, tasks.py d0841d3, mixtures_utils.py 8ebc149, task_configs.py c98abcf; the
batching below is unchanged since 2c79a31, 2023-01-10):

- ``task_configs.py`` (CoT section): task ``cot_gsm8k`` reads the TSV with ``seqio.TextLineDataSource``
  then ``preprocessors.simple_cot_tsv``: fields 0, 1, 2 of the tab split are ``question``, ``answer``,
  ``chain_of_thought``, and a literal backslash-n in the question and the rationale becomes a newline.
- ``mixtures_utils.py`` ``ZS_OPT_TEMPLATES`` / ``register_mixture(use_all_templates=False)``: the
  ``cot_zsopt`` submix uses task ``cot_gsm8k_template_0to10_zero_shot`` (CoT tasks have no
  non-deterministic option variant).
- ``tasks.py`` ``register_zero_shot_task`` -> ``preprocessors.get_batch_formatter(PATTERNS["cot_gsm8k"])``
  -> ``batch_apply_template``: the rows are batched ten at a time in file order (``drop_remainder=True``)
  and the i-th row of each batch gets template i. So a line's template is its 0-based position in
  its file mod 10 (not a random draw: nothing to seed), and a file's last ``n % 10`` lines never
  reach the submix (gsm8k_train.tsv: 7,473 lines, the last 3); they are counted here as filtered.
- ``templates.py`` ``PATTERNS["cot_gsm8k"]``: the ten templates below, as FLAN writes them; a
  ``{name}`` is replaced by the field (``format_from_feature_dictionary``), nothing else is touched.

Not reproducible: which rows FLAN's export put in a ``cot_zsopt`` file and in what order (seqio's
mixture sampling and shuffle on TensorFlow's random stream, with the input-inversion tasks mixed in
at rate 0.3), hence which rows open-instruct's ``random.sample`` then drew from it. ``zero_shot: k``
draws with the same ``random.sample`` seeded by ``data.seed``, over the rows in file order.

No few-shot (``fs_opt``) form: FLAN builds it with ``seqio.experimental.FewshotDataSource``
(exemplars from a TF-shuffled train stream), prunes exemplars by their count of T5 SentencePiece
tokens (``FEW_SHOT_MAX_LEN`` 1920) and, for the ``0to10_x_shot`` task, by template index, and
the ``template_mix_five_shot`` task's separator is a Python ``random.choice`` made when tasks.py is
imported. None of that can be reproduced without T5's vocabulary and seqio's stream; a look-alike
layout would not be FLAN's.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable

from qtulu.data.errors import BadRow
from qtulu.data.formats._rows import Context, Filtered, Out, Row
from qtulu.data.formats.flan import cot

# flan/v2/templates.py PATTERNS["cot_gsm8k"] (google-research/FLAN 2c79a31), in order
GSM8K_TEMPLATES: tuple[tuple[str, str], ...] = (
    ("{question} Let's think first. Chain of thought:",
     "{chain_of_thought}\nTherefore, the answer is {answer}."),
    ("{question} Think carefully first, then make a decision:",
     "{chain_of_thought} So, the answer is {answer}."),
    ("{question} Let's be accurate as possible.",
     "{chain_of_thought}\nThe answer: {answer}."),
    ("{question} Give me reasons, before answering the question",
     "{chain_of_thought} So the final answer is {answer}."),
    ("Lizzy: {question}.\nMe: Hmmm, let me think. I think this is the detailed solution:",
     "{chain_of_thought} Final answer: {answer}."),
    ("Question: {question} Think carefully first, then make a decision:",
     "{chain_of_thought} So the answer is {answer}."),
    ("Give the step-by-step reasoning process and then the final answer. {question}",
     "{chain_of_thought}\nThe final answer: {answer}."),
    ("{question}\nThoughts? Step-by-step reasoning:",
     "{chain_of_thought}\nThus, the answer is {answer}."),
    ("My question is: {question} Your thoughts:",
     "{chain_of_thought} The final answer: {answer}."),
    ("{question} Let's answer step by step:",
     "{chain_of_thought} The answer: {answer}."),
)
BATCH = len(GSM8K_TEMPLATES)  # batch_apply_template batches by the number of templates
_FIELD = re.compile(r"\{(\w*)\}")
_POSITION = re.compile(r"(?::\d+|\[\d+\])$")


def fill(template: str, fields: dict[str, str]) -> str:
    """A template with each ``{name}`` replaced by ``fields[name]`` (the values are not re-read)."""
    return _FIELD.sub(lambda m: fields[m.group(1)], template)


def cot_fields(row) -> dict[str, str]:
    """``question`` / ``answer`` / ``chain_of_thought`` of one TSV line (a list of its fields)."""
    if not isinstance(row, list) or not all(isinstance(f, str) for f in row):
        raise BadRow("bad_row_type", f"expected a line of tab-separated text (a .tsv file), got {type(row).__name__}")
    if len(row) != 3:
        raise BadRow("bad_field_count", f"expected 3 tab-separated fields (question, answer, rationale), got {len(row)}")
    question, answer, rationale = row
    return {"question": question.replace("\\n", "\n"), "answer": answer,
            "chain_of_thought": rationale.replace("\\n", "\n")}


def _line_count(file: str) -> int:
    """Lines of ``file`` as the TSV reader numbers them (0 when it cannot be read: the rows count)."""
    try:
        with open(file, "rb") as f:
            lines = f.read().split(b"\n")  # as qtulu.data.sources._text_lines: a final newline ends the last line
        return len(lines) - (lines[-1] == b"")
    except OSError:
        return 0


def zsopt_rows(rows: Iterable[Row]) -> Out:
    """``(where, {"inputs", "targets", "template_type": "zs_opt", "template_idx"})`` per line, as FLAN's
    ``cot_gsm8k_template_0to10_zero_shot`` task renders it; ``BadRow`` for a malformed line,
    ``Filtered`` for a line in its file's last ``n % 10`` (positions count per file)."""
    rows = list(rows)
    lines = Counter(_POSITION.sub("", where) for where, _ in rows)
    for file in lines:  # the file's own line count: rows held out (sources.NAME.hold_out) still count
        lines[file] = max(lines[file], _line_count(file))
    seen: Counter = Counter()
    for where, row in rows:
        file = _POSITION.sub("", where)
        line = re.search(r":(\d+)$", where)
        position = int(line.group(1)) - 1 if line else seen[file]  # its place in the file, as FLAN batches
        seen[file] += 1
        if isinstance(row, BadRow):
            yield where, row
            continue
        try:
            fields = cot_fields(row)
        except BadRow as e:
            yield where, e.at(where)
            continue
        if position >= lines[file] - lines[file] % BATCH:
            yield where, Filtered("flan_batch_remainder", f"FLAN's template batches of {BATCH} drop a file's last "
                                  f"{lines[file] % BATCH} of {lines[file]} lines")
            continue
        idx = position % BATCH
        inputs, targets = GSM8K_TEMPLATES[idx]
        yield where, {"inputs": fill(inputs, fields), "targets": fill(targets, fields), "template_type": "zs_opt",
                      "template_idx": idx}


def flan_cot_raw(rows: Iterable[Row], options: dict, ctx: Context) -> Out:
    """FLAN's raw GSM8K CoT TSV rendered as its ``cot_zsopt`` rows, converted by `cot`. Option
    ``zero_shot``: how many of them to draw (null = all), as `cot` draws from ``cot_zsopt.jsonl``."""
    zsopt = []
    for where, item in zsopt_rows(rows):
        if isinstance(item, dict):
            zsopt.append((where, item))
        else:
            yield where, item
    yield from cot(zsopt, {"zero_shot": options.get("zero_shot")}, ctx)
