"""GSM8K: 8-shot chain-of-thought with the standard exemplars (Wei et al. 2022, Table 20), or
direct answers; the last number of the output against the number after ``####``.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..metrics import last_number, numbers_equal
from ._common import TaskDataError, answer_after, head, require

NAME = "gsm8k"
VERSION = "1.0"
DATA_SUBDIR = "gsm"
# every option load/predict/score accept: name -> (default, meaning); `qtulu eval --list-tasks` shows them
OPTIONS = {
    "cot": (True, "8-shot chain-of-thought exemplars (False: direct answers)"),
    "n_shot": (8, "number of exemplars in the prompt"),
    "max_new_tokens": (512, "longest generation per question"),
}

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


def load(data_dir, *, limit=None, **_):
    path = require(Path(data_dir) / DATA_SUBDIR / "test.jsonl", "GSM8K test file")
    examples = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                gold = row["answer"].split("####")[-1].strip().replace(",", "")
                question = row["question"]
            except (json.JSONDecodeError, KeyError, AttributeError) as e:
                raise TaskDataError(f"{path}:{lineno}: bad GSM8K row ({e})") from e
            if "####" not in row["answer"]:
                raise TaskDataError(f"{path}:{lineno}: answer has no '####' final answer")
            examples.append({"id": str(lineno - 1), "question": question, "gold": gold})
    return head(examples, limit)


def prompt_prefix(cot: bool, n_shot: int = 8) -> str:
    demos = [f"Question: {q}\nAnswer: {cot_a if cot else short}" for q, cot_a, short in EXEMPLARS[:n_shot]]
    if not demos:
        return "Answer the following question.\n\n"
    return "Answer the following questions.\n\n" + "\n\n".join(demos) + "\n\n"


def build_prompt(lm, question: str, cot: bool = True, n_shot: int = 8) -> str:
    return lm.chat(prompt_prefix(cot, n_shot) + "Question: " + question.strip(), answer_after(lm, "Answer:"))


def predict(lm, examples, *, cot=True, n_shot=8, max_new_tokens=512, **_):
    prompts = [build_prompt(lm, ex["question"], cot, n_shot) for ex in examples]
    stop = ["\n\n", "\nQuestion:"] if lm.chat_format is None else ["\nQuestion:", "<|user|>"]
    outs = lm.generate(prompts, max_new_tokens=max_new_tokens, stop=stop)
    return [{"id": ex["id"], "output": o[0], "prediction": last_number(o[0]), "gold": ex["gold"]}
            for ex, o in zip(examples, outs)]


def score(predictions, **_):
    hits = [float(numbers_equal(last_number(p["output"]), p["gold"])) for p in predictions]
    acc = sum(hits) / len(hits) if hits else float("nan")
    return {"score": acc, "exact_match": acc, "n": len(hits)}
