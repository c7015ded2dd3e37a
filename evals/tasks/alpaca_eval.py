"""AlpacaEval (v1): the 805 instructions, the model's answers against the text-davinci-003
reference outputs, win rate by a judge model (any OpenAI-compatible chat endpoint).

The pairwise prompt follows AlpacaEval's ranking annotators: the judge sees both outputs, in an
order drawn per example from a fixed seed (so position bias averages out), and names the better
one. Unparseable verdicts are counted and left out of the rate.

Data: ``alpaca_eval/text_davinci_003_outputs.json`` (list of {dataset, instruction, output, generator}).
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

from ..judge import require_judge
from ._common import TaskDataError, head, require

NAME = "alpaca_eval"
VERSION = "1.0"
DATA_SUBDIR = "alpaca_eval"
# every option load/predict/score accept: name -> (default, meaning); `qtulu eval --list-tasks` shows them
OPTIONS = {
    "max_new_tokens": (2048, "longest reply generated per instruction"),
    "seed": (0, "seed of the judge's A/B order shuffle"),
}

JUDGE_SYSTEM = "You are a helpful assistant, that ranks models by the quality of their answers."
JUDGE_TEMPLATE = """I want you to create a leaderboard of different large-language models. To do so, I will give you the instructions (prompts) given to the models, and the responses of two models. Please rank the models based on which response would be preferred by humans.

## Instruction

{instruction}

## Model Outputs

Output (a):

{output_a}

Output (b):

{output_b}

## Task

Evaluate the models based on the quality and relevance of their outputs, and select the model that generated the best output. Answer by providing the model identifier of the best model: "a" or "b". Your answer must be exactly one letter, with no other text."""


def load(data_dir, *, limit=None, **_):
    path = require(Path(data_dir) / DATA_SUBDIR / "text_davinci_003_outputs.json", "AlpacaEval reference outputs")
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise TaskDataError(f"{path}: not JSON ({e})") from e
    for i, row in enumerate(rows):
        if "instruction" not in row or "output" not in row:
            raise TaskDataError(f"{path}: item {i} lacks 'instruction' or 'output'")
    return head([{"id": str(i), "instruction": r["instruction"], "reference": r["output"],
                  "dataset": r.get("dataset")} for i, r in enumerate(rows)], limit)


def predict(lm, examples, *, max_new_tokens=2048, **_):
    prompts = [lm.chat(ex["instruction"]) for ex in examples]
    stop = ["<|user|>"] if lm.chat_format == "tulu" else []
    outs = lm.generate(prompts, max_new_tokens=max_new_tokens, stop=stop)
    return [{"id": ex["id"], "instruction": ex["instruction"], "output": o[0].strip(),
             "reference": ex["reference"], "dataset": ex["dataset"]} for ex, o in zip(examples, outs)]


def parse_verdict(text: str) -> str | None:
    """'a' or 'b' from the judge's reply, else None."""
    m = re.search(r"\b(?:output\s*)?\(?([ab])\)?\b", text.strip().lower())
    return m.group(1) if m else None


def score(predictions, *, judge=None, seed=0, **_):
    judge = require_judge(judge, NAME)
    rng = random.Random(seed)
    wins, counted, invalid = 0.0, 0, 0
    verdicts = {}
    for p in predictions:
        model_first = rng.random() < 0.5
        a, b = (p["output"], p["reference"]) if model_first else (p["reference"], p["output"])
        reply = judge.complete([
            {"role": "system", "content": JUDGE_SYSTEM},
            {"role": "user", "content": JUDGE_TEMPLATE.format(instruction=p["instruction"], output_a=a, output_b=b)},
        ])
        v = parse_verdict(reply)
        if v is None:
            invalid += 1
            verdicts[p["id"]] = None
            continue
        won = (v == "a") == model_first
        verdicts[p["id"]] = "model" if won else "reference"
        wins += float(won)
        counted += 1
    rate = wins / counted if counted else float("nan")
    return {"score": rate, "win_rate": rate, "n": counted, "invalid_verdicts": invalid, "verdicts": verdicts}
