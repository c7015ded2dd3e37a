"""MMLU (Hendrycks et al.): 57 subjects, 0- or k-shot from the dev split, answer = the most
probable of the letters A-D after the prompt (open-instruct's Tulu-1 setting).

Data: ``mmlu/{dev,test}/SUBJECT_{dev,test}.csv``, headerless: question, A, B, C, D, answer.
"""

from __future__ import annotations

import csv
from pathlib import Path

from ._common import TaskDataError, head, require

NAME = "mmlu"
VERSION = "1.0"
DATA_SUBDIR = "mmlu"
# every option load/predict/score accept: name -> (default, meaning); `qtulu eval --list-tasks` shows them
OPTIONS = {
    "k_shot": (0, "dev examples of the same subject shown before each question"),
    "subjects": (None, "list of subjects to run (None: all 57)"),
    "split": ("test", "test or dev"),
}
CHOICES = ("A", "B", "C", "D")


def _read(path: Path) -> list[list[str]]:
    rows = []
    with open(path, newline="", encoding="utf-8") as f:
        for lineno, row in enumerate(csv.reader(f), 1):
            if len(row) != 6 or row[5].strip() not in CHOICES:
                raise TaskDataError(f"{path}:{lineno}: expected 6 columns ending in A-D, got {row[:1]}...")
            rows.append(row)
    return rows


def format_subject(subject: str) -> str:
    return " ".join(subject.split("_"))


def format_example(row: list[str], include_answer: bool) -> str:
    prompt = row[0]
    for letter, choice in zip(CHOICES, row[1:5]):
        prompt += f"\n{letter}. {choice}"
    prompt += "\nAnswer:"
    if include_answer:
        prompt += f" {row[5].strip()}\n\n"
    return prompt


def load(data_dir, *, limit=None, k_shot=0, subjects=None, split="test", **_):
    """Examples of ``split`` (``limit`` = per subject), each with its k dev exemplars' prompt header.

    ``split="dev"`` (0-shot only) gives a slice disjoint from the test set, e.g. for merge search.
    """
    if split not in ("test", "dev"):
        raise ValueError(f"MMLU split must be 'test' or 'dev', got {split!r}")
    if split == "dev" and k_shot:
        raise ValueError("MMLU split='dev' is 0-shot only: the dev split holds the exemplars")
    root = require(Path(data_dir) / DATA_SUBDIR, "MMLU data")
    test_dir = require(root / split, f"MMLU {split} split")
    found = sorted(p.name[: -len(f"_{split}.csv")] for p in test_dir.glob(f"*_{split}.csv"))
    if not found:
        raise TaskDataError(f"no *_{split}.csv files in {test_dir}")
    if subjects:
        missing = set(subjects) - set(found)
        if missing:
            raise TaskDataError(f"MMLU subjects not in {test_dir}: {sorted(missing)}")
        found = [s for s in found if s in set(subjects)]
    examples = []
    for subject in found:
        header = f"The following are multiple choice questions (with answers) about {format_subject(subject)}.\n\n"
        if k_shot:
            dev = _read(require(root / "dev" / f"{subject}_dev.csv", "MMLU dev split"))
            if len(dev) < k_shot:
                raise TaskDataError(f"{root / 'dev' / (subject + '_dev.csv')}: {len(dev)} rows < k_shot={k_shot}")
            header += "".join(format_example(r, True) for r in dev[:k_shot])
        for i, row in enumerate(head(_read(test_dir / f"{subject}_{split}.csv"), limit)):
            examples.append({"id": f"{subject}/{i}", "subject": subject,
                             "text": header + format_example(row, False), "gold": row[5].strip()})
    return examples


def build_prompt(lm, example) -> str:
    if lm.chat_format is None:
        return example["text"]
    prompt = lm.chat(example["text"])
    return prompt + ("The answer is:" if prompt[-1] in "\n " else " The answer is:")


def predict(lm, examples, **_):
    # the token of " A" (last piece: sentencepiece may emit a bare-space token first)
    cand = [lm.tokenizer(" " + c, add_special_tokens=False)["input_ids"][-1] for c in CHOICES]
    logps = lm.next_token_logprobs([build_prompt(lm, ex) for ex in examples], cand)
    preds = []
    for ex, lp in zip(examples, logps):
        best = max(range(len(CHOICES)), key=lambda j: lp[j])
        preds.append({"id": ex["id"], "subject": ex["subject"], "logprobs": dict(zip(CHOICES, lp)),
                      "prediction": CHOICES[best], "gold": ex["gold"]})
    return preds


def score(predictions, **_):
    by_subject: dict[str, list[float]] = {}
    for p in predictions:
        by_subject.setdefault(p["subject"], []).append(float(p["prediction"] == p["gold"]))
    all_hits = [h for hits in by_subject.values() for h in hits]
    per_subject = {s: sum(h) / len(h) for s, h in sorted(by_subject.items())}
    acc = sum(all_hits) / len(all_hits) if all_hits else float("nan")
    return {"score": acc, "acc": acc,
            "acc_macro": sum(per_subject.values()) / len(per_subject) if per_subject else float("nan"),
            "n": len(all_hits), "per_subject": per_subject}
