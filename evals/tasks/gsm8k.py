"""GSM8K: 8-shot chain-of-thought with the exemplars of the CoT paper (Wei et al. 2022, Table 20),
or the same questions with direct answers; the last number of the output against the number after
``####``. Headline: exact match on 200 questions.

``open_instruct`` profile = eval/gsm/run_eval.py at 171c3f163 with scripts/eval/gsm.sh's settings
(``--max_num_examples 200 --n_shot 8``):

- ``random.seed(42)`` then ``random.sample`` of 200 of the 1,319 test questions, kept in the
  sampled order; with fewer than 8 shots the exemplars are sampled next from the same generator;
- the direct-answer exemplars read "Quesion:" (open-instruct's typo, kept: it is the prompt the
  paper's models saw); the question itself reads "Question:";
- plain prompts end "\\nAnswer:", chat prompts "<|assistant|>\\nAnswer:"; greedy, 512 new tokens,
  stopping at the first newline in both formats;
- prediction = the last number after removing commas between digits (one pass), integers losing
  their sign; scored with HF evaluate's exact_match (case and punctuation ignored), so "-18" counts
  for 18 while "18.0" and "$18.00" do not.

``corrected``: "Question:" in the direct exemplars, chat prompts stop at the model's EOS (as
open-instruct's 2023-12 code does), and the prediction is the last number with its sign, thousands
separators removed, compared numerically ("18.0" and "$18.00" are 18, "-18" is not).

Data: ``gsm/test.jsonl`` (``{"question", "answer"}``, the final answer after ``#### ``).
"""

from __future__ import annotations

import random
from pathlib import Path

from ..metrics import hf_exact_match, last_number, numbers_equal, oi_gsm_answer, oi_gsm_gold
from ._common import PROFILE_OPTION, TaskDataError, check_profile, comparability, head, jsonl_rows, require

NAME = "gsm8k"
VERSION = "2.0"
DATA_SUBDIR = "gsm"
# every option load/predict/score accept: name -> (default, meaning); `qtulu eval --list-tasks` shows them
OPTIONS = {
    "cot": (True, "8-shot chain-of-thought exemplars (False: direct answers)"),
    "n_shot": (8, "number of exemplars in the prompt (fewer than 8 are sampled from the 8)"),
    "max_num_examples": (200, "questions sampled with `seed` (the paper: 200; None: all 1,319)"),
    "seed": (42, "seed of the question (and exemplar) sampling"),
    "max_new_tokens": (512, "longest generation per question"),
    "profile": PROFILE_OPTION,
}

# (question, cot_answer, short_answer): the exemplars of open-instruct's eval/gsm/examplars.py, from
# the CoT paper's Table 20, in their order
EXEMPLARS = [
    ("There are 15 trees in the grove. Grove workers will plant trees in the grove today. After they are done, there will be 21 trees. How many trees did the grove workers plant today?",
     "There are 15 trees originally. Then there were 21 trees after some more were planted. So there must have been 21 - 15 = 6. So the answer is 6.", "6"),
    ("If there are 3 cars in the parking lot and 2 more cars arrive, how many cars are in the parking lot?",
     "There are originally 3 cars. 2 more cars arrive. 3 + 2 = 5. So the answer is 5.", "5"),
    ("Leah had 32 chocolates and her sister had 42. If they ate 35, how many pieces do they have left in total?",
     "Originally, Leah had 32 chocolates. Her sister had 42. So in total they had 32 + 42 = 74. After eating 35, they had 74 - 35 = 39. So the answer is 39.", "39"),
    ("Jason had 20 lollipops. He gave Denny some lollipops. Now Jason has 12 lollipops. How many lollipops did Jason give to Denny?",
     "Jason started with 20 lollipops. Then he had 12 after giving some to Denny. So he gave Denny 20 - 12 = 8. So the answer is 8.", "8"),
    ("Shawn has five toys. For Christmas, he got two toys each from his mom and dad. How many toys does he have now?",
     "Shawn started with 5 toys. If he got 2 toys each from his mom and dad, then that is 4 more toys. 5 + 4 = 9. So the answer is 9.", "9"),
    ("There were nine computers in the server room. Five more computers were installed each day, from monday to thursday. How many computers are now in the server room?",
     "There were originally 9 computers. For each of 4 days, 5 more computers were added. So 5 * 4 = 20 computers were added. 9 + 20 is 29. So the answer is 29.", "29"),
    ("Michael had 58 golf balls. On tuesday, he lost 23 golf balls. On wednesday, he lost 2 more. How many golf balls did he have at the end of wednesday?",
     "Michael started with 58 golf balls. After losing 23 on tuesday, he had 58 - 23 = 35. After losing 2 more, he had 35 - 2 = 33 golf balls. So the answer is 33.", "33"),
    ("Olivia has $23. She bought five bagels for $3 each. How much money does she have left?",
     "Olivia had 23 dollars. 5 bagels for 3 dollars each will be 5 x 3 = 15 dollars. So she has 23 - 15 dollars left. 23 - 15 is 8. So the answer is 8.", "8"),
]


def load(data_dir, *, limit=None, cot=True, n_shot=8, max_num_examples=200, seed=42, profile="open_instruct",
         **_):
    """The sampled questions in open-instruct's order (``limit``: the first N of them), each carrying
    the few-shot prefix."""
    check_profile(profile)
    path = require(Path(data_dir) / DATA_SUBDIR / "test.jsonl", "GSM8K test file")
    rows = []
    for lineno, row in jsonl_rows(path, "bad GSM8K row"):
        try:
            question, answer = row["question"], row["answer"]
        except (KeyError, TypeError) as e:
            raise TaskDataError(f"{path}:{lineno}: bad GSM8K row ({e})") from e
        if not isinstance(answer, str) or "####" not in answer:
            raise TaskDataError(f"{path}:{lineno}: answer has no '####' final answer")
        rows.append({"id": str(len(rows)), "question": question, "gold": oi_gsm_gold(answer)})
    rng = random.Random(seed)  # open-instruct: random.seed(42) once, then every draw in this order
    if max_num_examples and len(rows) > max_num_examples:
        rows = [rows[i] for i in rng.sample(range(len(rows)), max_num_examples)]
    shots = EXEMPLARS
    if n_shot and len(EXEMPLARS) > n_shot:
        shots = [EXEMPLARS[i] for i in rng.sample(range(len(EXEMPLARS)), n_shot)]
    prefix = prompt_prefix(cot, shots if n_shot else [], profile)
    return [{**r, "prefix": prefix} for r in head(rows, limit)]


def prompt_prefix(cot: bool, shots, profile: str = "open_instruct") -> str:
    if not shots:
        return "Answer the following question.\n\n"
    # open-instruct's direct-answer exemplars say "Quesion:" (sic)
    q = "Question: " if cot or profile != "open_instruct" else "Quesion: "
    demos = [q + question + "\n" + "Answer: " + (cot_answer if cot else short) for question, cot_answer, short in shots]
    return "Answer the following questions.\n\n" + "\n\n".join(demos) + "\n\n"


def build_prompt(lm, example) -> str:
    text = example["prefix"] + "Question: " + example["question"].strip()
    if lm.chat_format is None:
        return text + "\nAnswer:"
    return lm.chat_then(text, "Answer:")


def stops(lm, profile: str) -> list[str]:
    return ["\n"] if profile == "open_instruct" or lm.chat_format is None else []


def predict(lm, examples, *, max_new_tokens=512, profile="open_instruct", **_):
    outs = lm.generate([build_prompt(lm, ex) for ex in examples], max_new_tokens=max_new_tokens,
                       stop=stops(lm, profile))
    return [{"id": ex["id"], "output": o[0], "prediction": extract(o[0], profile), "gold": ex["gold"]}
            for ex, o in zip(examples, outs)]


def extract(output: str, profile: str = "open_instruct") -> str | None:
    return oi_gsm_answer(output) if profile == "open_instruct" else last_number(output)


def score(predictions, *, profile="open_instruct", **_):
    check_profile(profile)
    if profile == "open_instruct":
        hits = hf_exact_match([oi_gsm_answer(p["output"]) for p in predictions], [p["gold"] for p in predictions],
                              ignore_case=True, ignore_punctuation=True)
    else:
        hits = [numbers_equal(last_number(p["output"]), p["gold"]) for p in predictions]
    acc = sum(hits) / len(hits) if hits else float("nan")
    return {"score": acc, "exact_match": acc, "n": len(hits)}


def describe(*, limit=None, cot=True, n_shot=8, max_num_examples=200, seed=42, profile="open_instruct",
             max_new_tokens=512, **_) -> dict:
    dev = [f"{k} {v}" for k, v, paper in (("cot", cot, True), ("n_shot", n_shot, 8),
                                            ("max_num_examples", max_num_examples, 200), ("seed", seed, 42),
                                            ("max_new_tokens", max_new_tokens, 512)) if v != paper]
    ok, note = comparability(profile, limit, dev)
    n = "all 1,319" if not max_num_examples else f"{max_num_examples} sampled with random.seed({seed})"
    return {"profile": profile, "subset": n + ("" if limit is None else f", first {limit} of them"),
            "metric": "exact match of the last number", "comparable": ok, "note": note}
