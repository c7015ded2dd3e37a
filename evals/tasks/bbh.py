"""BIG-Bench Hard: the 3-shot chain-of-thought prompts of ``bbh/cot-prompts/TASK.txt`` (or the same
exemplars without the reasoning, "direct"); exact match on the answer after "So the answer is",
per task, averaged over tasks.
"""

from __future__ import annotations

import json
import re
import string
from pathlib import Path

from ..metrics import extract_bbh_answer
from ._common import TaskDataError, answer_after, head, require

NAME = "bbh"
VERSION = "1.0"
DATA_SUBDIR = "bbh"
# every option load/predict/score accept: name -> (default, meaning); `qtulu eval --list-tasks` shows them
OPTIONS = {
    "cot": (True, "chain-of-thought 3-shot prompts (False: the same shots with direct answers)"),
    "subtasks": (None, "list of BBH subtask names to run (None: all 27)"),
    "max_new_tokens": (512, "longest generation per example"),
}

_COT = re.compile(r"A: Let's think step by step\..*?So the answer is ", re.S)


def read_prompt(path: Path, cot: bool = True) -> str:
    text = path.read_text(encoding="utf-8")
    if "-----\n" not in text:
        raise TaskDataError(f"{path}: expected a canary line then '-----' before the prompt")
    prompt = text.split("-----\n", 1)[1].strip()
    if not cot:
        prompt = _COT.sub("A: ", prompt)
    return prompt


def load(data_dir, *, limit=None, cot=True, subtasks=None, **_):
    """Examples of every task (``limit`` = per task), each carrying its task's few-shot prompt."""
    root = require(Path(data_dir) / DATA_SUBDIR, "BBH data")
    task_dir = require(root / "bbh", "BBH task files")
    names = sorted(p.stem for p in task_dir.glob("*.json"))
    if subtasks:
        missing = set(subtasks) - set(names)
        if missing:
            raise TaskDataError(f"BBH tasks not in {task_dir}: {sorted(missing)}")
        names = [n for n in names if n in set(subtasks)]
    if not names:
        raise TaskDataError(f"no BBH task files in {task_dir}")
    examples = []
    for name in names:
        fewshot = read_prompt(require(root / "cot-prompts" / f"{name}.txt", "BBH prompt"), cot)
        path = task_dir / f"{name}.json"
        try:
            rows = json.loads(path.read_text(encoding="utf-8"))["examples"]
        except (json.JSONDecodeError, KeyError) as e:
            raise TaskDataError(f"{path}: expected {{'examples': [...]}} ({e})") from e
        for i, row in enumerate(head(rows, limit)):
            examples.append({"id": f"{name}/{i}", "task": name, "fewshot": fewshot,
                             "input": row["input"], "gold": row["target"]})
    return examples


def build_prompt(lm, example) -> str:
    return lm.chat(example["fewshot"] + "\n\nQ: " + example["input"], answer_after(lm, "A:"))


def predict(lm, examples, *, max_new_tokens=512, **_):
    stop = ["\n\n"] if lm.chat_format is None else ["\n\nQ:", "<|user|>"]
    outs = lm.generate([build_prompt(lm, ex) for ex in examples], max_new_tokens=max_new_tokens, stop=stop)
    return [{"id": ex["id"], "task": ex["task"], "output": o[0], "prediction": extract_bbh_answer(o[0]),
             "gold": ex["gold"]} for ex, o in zip(examples, outs)]


def _norm(s: str) -> str:
    # HF evaluate's exact_match with ignore_case and ignore_punctuation, as open-instruct scores BBH
    return s.lower().translate(str.maketrans("", "", string.punctuation)).strip()


def score(predictions, **_):
    by_task: dict[str, list[float]] = {}
    for p in predictions:
        hit = _norm(extract_bbh_answer(p["output"])) == _norm(p["gold"])
        by_task.setdefault(p["task"], []).append(float(hit))
    per_task = {t: sum(h) / len(h) for t, h in sorted(by_task.items())}
    avg = sum(per_task.values()) / len(per_task) if per_task else float("nan")
    return {"score": avg, "exact_match": avg, "n": len(predictions), "per_task": per_task}
