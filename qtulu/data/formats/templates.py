"""Instruction templates: how an (instruction, input, output) triple becomes a user turn and a reply.

Reference: open-instruct ``open_instruct/instruction_encode_templates.py`` at e44fcf588 (the June
2023 release; unchanged until the file was removed in 2024): ``encode_instruction_example`` picks
one of 14 templates (with an input) or 14 (without) by weight with ``random.choices``, and
``encode_few_shot_example`` lays out SuperNI's few-shot prompts. The template strings below are
that file's data, reproduced because they are the format (the training data of the Tülu models
was rendered through them); the code around them is ours.

``random.choices(templates, weights=...)`` draws one ``random()`` per example, whichever list it
draws from, so feeding the same ``random.Random`` the same rows in the same order gives the same
choices as open-instruct. The ``plain`` profile is open-instruct's ``random_template=False`` branch:
instruction, blank line, input.
"""

from __future__ import annotations

import random

# (prompt template, completion template, weight); open-instruct's encoding_templates_w_input
WITH_INPUT: tuple[tuple[str, str, float], ...] = (
    ("{instruction}\n\n{input}\n\n", "{output}", 0.2),
    ("{instruction}\n{input}\n\n", "{output}", 0.1),
    ("{instruction}\n{input}\n", "{output}", 0.1),
    ("{instruction}\n\nInput: {input}\n\nOutput:", "{output}", 0.05),
    ("{instruction}\nInput: {input}\nOutput:", "{output}", 0.05),
    ("{instruction}\n{input}\n\nResponse:", "{output}", 0.05),
    ("{instruction}\n\nAdditional Context:\n{input}\n\nAnswer:", "{output}", 0.05),
    ("Task: {instruction}\nInput: {input}\nOutput:", "{output}", 0.05),
    ("Task: {instruction}\n\n{input}\n\n", "{output}", 0.05),
    ("Task: {instruction}\n\n{input}\n\nAnswer:", "{output}", 0.05),
    ("You need to complete the following task:\n\n{instruction}\n\n{input}\n\nAnswer:", "{output}", 0.05),
    ("{instruction}\n\nNow complete the following instance -\nInput: {input}\nOutput:", "{output}", 0.05),
    ("Instruction:{instruction}\n\nInput: {input}\n\n", "{output}", 0.05),
    ("Below is an instruction that describes a task, paired with an input that provides further context. "
     "Write a response that appropriately completes the request.\n\n"
     "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:", "{output}", 0.1),
)

# open-instruct's encoding_templates_wo_input ("Plase" is theirs)
WITHOUT_INPUT: tuple[tuple[str, str, float], ...] = (
    ("{instruction}\n\n", "{output}", 0.2),
    ("{instruction}\n", "{output}", 0.1),
    ("{instruction}", "\n{output}", 0.1),
    ("{instruction} Output:", "{output}", 0.05),
    ("{instruction}\nResponse:", "{output}", 0.05),
    ("{instruction}\n\nAnswer:", "{output}", 0.05),
    ("Task: {instruction}\n\n", "{output}", 0.05),
    ("Instruction: {instruction}\n", "{output}", 0.05),
    ("Instruction: {instruction}\nOutput:", "{output}", 0.05),
    ("You need to complete the following task:\n\n{instruction}\n\n", "{output}", 0.05),
    ("Can you help with this?\n\n{instruction}\n", "{output}", 0.05),
    ("Plase answer the following request: {instruction}\nAnswer:", "{output}", 0.05),
    ("Tell me how would you respond to the following request.\n{instruction}\n", "{output}", 0.05),
    ("Write a response that appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:",
     "{output}", 0.1),
)

_W_WITH = [w for _, _, w in WITH_INPUT]
_W_WITHOUT = [w for _, _, w in WITHOUT_INPUT]


def has_input(inp: str | None) -> bool:
    return inp is not None and inp.strip() != ""


def encode_instruction(instruction: str, inp: str | None, output: str, rng: random.Random | None) -> tuple[str, str]:
    """``(prompt, completion)`` of one example: a weighted random template when ``rng`` is given
    (open-instruct's ``random_template=True``), else instruction + blank line + input."""
    if rng is not None:
        table, weights = (WITH_INPUT, _W_WITH) if has_input(inp) else (WITHOUT_INPUT, _W_WITHOUT)
        prompt_t, completion_t, _ = rng.choices(table, weights=weights)[0]
        prompt = prompt_t.format(instruction=instruction.strip(), input=(inp or "").strip())
        return prompt, completion_t.format(output=output.strip())
    if has_input(inp):
        return instruction.strip() + "\n\n" + inp.strip() + "\n\n", output.strip()
    return instruction.strip() + "\n\n", output.strip()


def encode_few_shot(instruction: str, exemplars: list[tuple[str, str]], inp: str, output: str) -> tuple[str, str]:
    """``(prompt, completion)`` in open-instruct's few-shot layout (``encode_few_shot_example``)::

        {instruction}\\n\\nInput:\\n{x1}\\nOutput:\\n{y1}\\n\\n ... Input:\\n{input}\\nOutput:\\n
    """
    prompt = instruction.strip() + "\n\n"
    for x, y in exemplars:
        prompt += "Input:\n" + x.strip() + "\n" + "Output:\n" + y.strip() + "\n\n"
    prompt += "Input:\n" + inp.strip() + "\n" + "Output:\n"
    return prompt, output.strip()

