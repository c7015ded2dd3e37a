"""AlpacaEval (v1): the 805 instructions, the model's answer against the text-davinci-003 reference,
judged pairwise by alpaca_eval's GPT-4 annotator; headline: the win rate over the reference.

Generation = open-instruct's eval/alpaca_farm/run_eval.py at 171c3f163 (scripts/eval/alpaca_farm.sh):
the instruction in the chat format (plain for base models), greedy, up to 2048 new tokens, no stop
string, the output kept as generated.

Judging = alpaca_eval's ``alpaca_eval_gpt4_0314`` annotator, the one open-instruct passes
(``annotators_config="alpaca_eval_gpt4_0314"``), re-implemented from tatsu-lab/alpaca_eval at
94ecb30 (2023-09-27, the library open-instruct's commit 63f870d53 moved to):

- the prompt is ``evaluators_configs/alpaca_eval_gpt4/alpaca_eval.txt`` verbatim (below; its
  sha256 is checked by the tests), its ``{instruction}``, ``{output_1}``, ``{output_2}`` replaced in
  that order, first occurrence each (``utils.make_prompts``), then split into chat messages at
  ``<|im_start|>``/``<|im_end|>`` as ``decoders/openai._prompt_to_chatml`` does;
- output_1 is the reference, output_2 the model (``main.evaluate`` -> ``annotate_head2head``); the
  two are swapped when ``random.Random("is_switched_outputs" + instruction + "0").choices([False,
  True])`` says so (``RandomSwitchTwoColumnsProcessor``, seed 0), and the verdict swapped back;
- the judge is called with temperature 0 and max_tokens 100; its reply is read with
  ``ast.literal_eval`` and the rank of "model_1" taken (``ranking_parser``): 1 or 2, anything else
  is no verdict and is left out; identical outputs are a draw without a call;
- win rate = mean over verdicts of (preference - 1), a draw counting 1/2 (``metrics.pairwise_to_winrate``).

The paper's numbers used gpt-4-0314 as the judge and open-instruct's own text-davinci-003 outputs
regenerated with 2048 tokens (``davinci_003_outputs_2048_token.json``); ../shared has alpaca_eval's
published text-davinci-003 outputs (the ``reference`` option takes another file).

Data: ``alpaca_eval/text_davinci_003_outputs.json`` (list of {dataset, instruction, output, generator}).
"""

from __future__ import annotations

import ast
import json
import math
import random
import re
from pathlib import Path

from ..judge import require_judge
from ._common import PROFILE_OPTION, TaskDataError, check_profile, comparability, head, require

NAME = "alpaca_eval"
VERSION = "2.0"
DATA_SUBDIR = "alpaca_eval"
# every option load/predict/score accept: name -> (default, meaning); `qtulu eval --list-tasks` shows them
OPTIONS = {
    "max_new_tokens": (2048, "longest reply generated per instruction"),
    "reference": (None, "reference outputs JSON (None: alpaca_eval/text_davinci_003_outputs.json)"),
    "profile": PROFILE_OPTION,
}
REFERENCE_FILE = "text_davinci_003_outputs.json"
PAPER_REFERENCE = "davinci_003_outputs_2048_token.json"
PAPER_JUDGE = "gpt-4-0314"
JUDGE_KWARGS = {"max_tokens": 100, "temperature": 0.0}  # alpaca_eval_gpt4_0314/configs.yaml
SWITCH_SEED = 0  # PairwiseAnnotator's default seed, handed to its processors

# tatsu-lab/alpaca_eval, src/alpaca_eval/evaluators_configs/alpaca_eval_gpt4/alpaca_eval.txt (94ecb30),
# verbatim: the prompt of the alpaca_eval_gpt4 and alpaca_eval_gpt4_0314 annotators
ALPACA_EVAL_GPT4_TEMPLATE = '''<|im_start|>system
You are a helpful assistant, that ranks models by the quality of their answers.
<|im_end|>
<|im_start|>user
I want you to create a leaderboard of different of large-language models. To do so, I will give you the instructions (prompts) given to the models, and the responses of two models. Please rank the models based on which responses would be preferred by humans. All inputs and outputs should be python dictionaries.

Here is the prompt:
{
    "instruction": """{instruction}""",
}

Here are the outputs of the models:
[
    {
        "model": "model_1",
        "answer": """{output_1}"""
    },
    {
        "model": "model_2",
        "answer": """{output_2}"""
    }
]

Now please rank the models by the quality of their answers, so that the model with rank 1 has the best output. Then return a list of the model names and ranks, i.e., produce the following output:
[
    {'model': <model-name>, 'rank': <model-rank>},
    {'model': <model-name>, 'rank': <model-rank>}
]

Your response must be a valid Python dictionary and should contain nothing else because we will directly execute it in Python. Please provide the ranking that the majority of humans would give.
<|im_end|>'''


def load(data_dir, *, limit=None, reference=None, profile="open_instruct", **_):
    check_profile(profile)
    path = Path(reference) if reference else require(Path(data_dir) / DATA_SUBDIR / REFERENCE_FILE,
                                                       "AlpacaEval reference outputs")
    require(path, "AlpacaEval reference outputs")
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise TaskDataError(f"{path}: not JSON ({e})") from e
    if not isinstance(rows, list):
        raise TaskDataError(f"{path}: expected a list of {{instruction, output}}")
    for i, row in enumerate(rows):
        if not isinstance(row, dict) or not isinstance(row.get("instruction"), str) or not isinstance(row.get("output"), str):
            raise TaskDataError(f"{path}: item {i} lacks a string 'instruction' or 'output'")
    return head([{"id": str(i), "instruction": r["instruction"], "reference": r["output"],
                  "dataset": r.get("dataset")} for i, r in enumerate(rows)], limit)


def build_prompt(lm, example) -> str:
    return lm.chat(example["instruction"])


def predict(lm, examples, *, max_new_tokens=2048, **_):
    outs = lm.generate([build_prompt(lm, ex) for ex in examples], max_new_tokens=max_new_tokens)
    return [{"id": ex["id"], "instruction": ex["instruction"], "output": o[0], "reference": ex["reference"],
             "dataset": ex["dataset"]} for ex, o in zip(examples, outs)]


def make_prompt(instruction: str, output_1: str, output_2: str) -> str:
    """The template with its placeholders replaced as alpaca_eval's ``make_prompts`` does."""
    prompt = ALPACA_EVAL_GPT4_TEMPLATE
    keys = list(dict.fromkeys(re.findall(r"{([^ \s]+?)}", prompt)))  # first-appearance order
    values = {"instruction": instruction, "output_1": output_1, "output_2": output_2}
    for key in keys:
        prompt = prompt.replace("{" + key + "}", str(values[key]), 1)
    return prompt


def chatml_messages(prompt: str) -> list[dict]:
    """A ``<|im_start|>role ... <|im_end|>`` prompt as chat messages (alpaca_eval's _prompt_to_chatml)."""
    prompt = prompt.strip()
    if not (prompt.startswith("<|im_start|>") and prompt.endswith("<|im_end|>")):
        raise ValueError("not a ChatML prompt")
    messages = []
    for part in prompt.split("<|im_start|>")[1:]:
        role, _, rest = part.partition("\n")
        messages.append({"role": role.strip(), "content": rest.split("<|im_end|>", 1)[0].strip()})
    return messages


def is_switched(instruction: str, seed: int = SWITCH_SEED) -> bool:
    """Whether alpaca_eval shows the two outputs swapped for ``instruction``."""
    return random.Random("is_switched_outputs" + instruction + str(seed)).choices([False, True], k=1)[0]


def parse_ranking(completion: str) -> int | None:
    """alpaca_eval's ``ranking_parser``: the rank (1 or 2) the reply gives "model_1", else None.

    The reply is read with ``ast.literal_eval`` (literals only, nothing is executed)."""
    try:
        ranking = ast.literal_eval(completion)
        rank = [c for c in ranking if c["model"] == "model_1"][0]["rank"]
    except Exception:  # noqa: BLE001 - any unreadable reply is "no verdict", as in alpaca_eval
        return None
    return rank if rank in (1, 2) else None  # as its `assert rank in [1, 2]`


def preference(judge, instruction: str, reference: str, output: str) -> tuple[float, str | None]:
    """(alpaca_eval preference, raw reply): 1 the reference wins, 2 the model wins, 0 identical
    outputs (no call), NaN no verdict."""
    if reference == output:
        return 0.0, None
    switched = is_switched(instruction)
    first, second = (output, reference) if switched else (reference, output)
    reply = judge.complete(chatml_messages(make_prompt(instruction, first, second)), **JUDGE_KWARGS)
    rank = parse_ranking(reply)
    if rank is None:
        return float("nan"), reply
    return float(3 - rank if switched else rank), reply


def win_rate(preferences) -> dict:
    """alpaca_eval's ``pairwise_to_winrate``, as fractions: NaN dropped, a draw is half a win."""
    prefs = [p for p in preferences if p in (0, 1, 2)]
    vals = [0.5 if p == 0 else p - 1 for p in prefs]
    n = len(vals)
    rate = sum(vals) / n if n else float("nan")
    se = math.sqrt(sum((v - rate) ** 2 for v in vals) / (n - 1) / n) if n > 1 else float("nan")
    return {"win_rate": rate, "standard_error": se, "n_wins": sum(p == 2 for p in prefs),
            "n_wins_base": sum(p == 1 for p in prefs), "n_draws": sum(p == 0 for p in prefs), "n_total": n}


def score(predictions, *, judge=None, **_):
    judge = require_judge(judge, NAME)
    cache: dict = {}  # alpaca_eval annotates each distinct (instruction, output_1, output_2) once
    verdicts, prefs = {}, []
    for p in predictions:
        key = (p["instruction"], p["reference"], p["output"])
        if key not in cache:
            cache[key] = preference(judge, *key)
        pref, _ = cache[key]
        prefs.append(pref)
        verdicts[p["id"]] = None if math.isnan(pref) else {0: "draw", 1: "reference", 2: "model"}[int(pref)]
    out = win_rate(prefs)
    return {"score": out["win_rate"], **out, "n": out["n_total"], "invalid_verdicts": sum(v is None for v in verdicts.values()),
            "judge_model": getattr(judge, "model", None), "verdicts": verdicts}


def describe(*, limit=None, context=None, max_new_tokens=2048, reference=None, profile="open_instruct", **_) -> dict:
    dev = [] if max_new_tokens == 2048 else [f"max_new_tokens {max_new_tokens}"]
    if Path(reference or REFERENCE_FILE).name != PAPER_REFERENCE:
        dev.append(f"reference {Path(reference or REFERENCE_FILE).name} (the paper: open-instruct's {PAPER_REFERENCE})")
    judge = (context or {}).get("judge")
    model = getattr(judge, "model", None)
    if model != PAPER_JUDGE:
        dev.append(f"judge {model} (the paper: {PAPER_JUDGE})")
    ok, note = comparability(profile, limit, dev)
    return {"profile": profile, "subset": "all 805 instructions" + ("" if limit is None else f", first {limit}"),
            "metric": "win rate over the reference (alpaca_eval_gpt4_0314 annotator)", "comparable": ok, "note": note}
