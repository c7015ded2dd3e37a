"""MMLU (Hendrycks et al.): 57 subjects, 0- or k-shot from the dev split, answer = the most
probable of the tokens " A".." D" after the prompt. Headline: accuracy over all 14,042 questions.

``open_instruct`` profile = eval/mmlu/run_eval.py at 171c3f163 (scripts/eval/mmlu.sh: ``--ntrain 0``
for the paper's table, ``--ntrain 5`` for the 5-shot variant), quirks kept because they are what
the paper's models were scored on:

- the CSVs are read with pandas, as there: 10 test cells holding "None" become NaN and print as
  "nan" (e.g. college_mathematics #8 offers "A. nan");
- the header says "about  abstract algebra" (two spaces: ``format_subject`` prefixes every word
  with a space);
- chat prompts end "<|assistant|>\\nThe answer is:"; plain prompts end "Answer:";
- few-shot examples are dropped, last first, while the prompt (chat markup included, BOS not) is
  over 2048 tokens; the BOS is added on top, so a fitted prompt is never cut.

``corrected``: CSV cells read as written, one space in "about abstract algebra", and the shots are
dropped until BOS + prompt fits the model's context (``lm.context_length``; 2048 when unknown).

Data: ``mmlu/{dev,test}/SUBJECT_{dev,test}.csv``, headerless: question, A, B, C, D, answer.
"""

from __future__ import annotations

import csv
from pathlib import Path

from ._common import PROFILE_OPTION, TaskDataError, check_profile, comparability, head, require

NAME = "mmlu"
VERSION = "2.0"
DATA_SUBDIR = "mmlu"
# every option load/predict/score accept: name -> (default, meaning); `qtulu eval --list-tasks` shows them
OPTIONS = {
    "k_shot": (0, "dev examples of the same subject shown before each question (the paper: 0)"),
    "subjects": (None, "list of subjects to run (None: all 57)"),
    "split": ("test", "test or dev"),
    "max_prompt_tokens": (2048, "open_instruct: drop shots while the prompt without BOS is longer "
                                "(open-instruct's constant); corrected uses the model's context"),
    "profile": PROFILE_OPTION,
}
CHOICES = ("A", "B", "C", "D")


def _read_csv(path: Path) -> list[list[str]]:
    rows = []
    with open(path, newline="", encoding="utf-8") as f:
        for lineno, row in enumerate(csv.reader(f), 1):
            if len(row) != 6 or row[5].strip() not in CHOICES:
                raise TaskDataError(f"{path}:{lineno}: expected 6 columns ending in A-D, got {row[:1]}...")
            rows.append(row)
    return rows


def _read_pandas(path: Path) -> list[list[str]]:
    """Rows as open-instruct's ``pd.read_csv(path, header=None)`` yields them, each cell formatted with
    ``"{}".format`` as its prompt code does (pandas' NA parsing and dtype inference included)."""
    import pandas as pd

    raw = _read_csv(path)  # validates the layout, names the bad line
    df = pd.read_csv(path, header=None)
    if df.shape != (len(raw), 6):
        raise TaskDataError(f"{path}: pandas reads {df.shape}, the csv module {len(raw)} rows x 6")
    return [["{}".format(df.iloc[i, j]) for j in range(6)] for i in range(len(raw))]


def format_subject(subject: str, profile: str = "open_instruct") -> str:
    if profile == "open_instruct":
        # open-instruct: `s += " " + entry` for each word, hence "about  abstract algebra"
        return "".join(" " + w for w in subject.split("_"))
    return " ".join(subject.split("_"))


def format_example(row: list[str], include_answer: bool) -> str:
    prompt = row[0]
    for letter, choice in zip(CHOICES, row[1:5]):
        prompt += f"\n{letter}. {choice}"
    prompt += "\nAnswer:"
    if include_answer:
        prompt += f" {row[5]}\n\n"
    return prompt


def load(data_dir, *, limit=None, k_shot=0, subjects=None, split="test", profile="open_instruct", **_):
    """Questions of ``split`` in subject order (``limit`` = first N per subject), each with up to
    ``k_shot`` dev exemplars; ``split="dev"`` (0-shot) gives a slice disjoint from the test set."""
    check_profile(profile)
    if split not in ("test", "dev"):
        raise ValueError(f"MMLU split must be 'test' or 'dev', got {split!r}")
    if split == "dev" and k_shot:
        raise ValueError("MMLU split='dev' is 0-shot only: the dev split holds the exemplars")
    read = _read_pandas if profile == "open_instruct" else _read_csv
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
        shots: list[list[str]] = []
        if k_shot:
            dev_path = require(root / "dev" / f"{subject}_dev.csv", "MMLU dev split")
            shots = read(dev_path)[:k_shot]
            if len(shots) < k_shot:
                raise TaskDataError(f"{dev_path}: {len(shots)} rows < k_shot={k_shot}")
        for i, row in enumerate(head(read(test_dir / f"{subject}_{split}.csv"), limit)):
            examples.append({"id": f"{subject}/{i}", "subject": subject, "row": row, "shots": shots,
                             "gold": row[5].strip()})
    return examples


def _prompt(lm, example, k: int, profile: str) -> str:
    header = ("The following are multiple choice questions (with answers) about "
              f"{format_subject(example['subject'], profile)}.\n\n")
    text = header + "".join(format_example(r, True) for r in example["shots"][:k])
    text += format_example(example["row"], False)
    if lm.chat_format is None:
        return text
    return lm.chat_then(text, "The answer is:")


def build_prompt(lm, example, *, profile="open_instruct", max_prompt_tokens=2048) -> str:
    """The prompt with as many of the example's shots as fit (see the module docstring)."""
    k = len(example["shots"])
    prompt = _prompt(lm, example, k, profile)
    if profile == "open_instruct":
        fits = lambda p: len(lm.tokens(p)) <= max_prompt_tokens  # noqa: E731  (no BOS, as open-instruct)
    else:
        budget = getattr(lm, "context_length", None) or 2048
        fits = lambda p: len(lm.encode(p)) <= budget  # noqa: E731
    while k > 0 and not fits(prompt):
        k -= 1
        prompt = _prompt(lm, example, k, profile)
    return prompt


def predict(lm, examples, *, profile="open_instruct", max_prompt_tokens=2048, **_):
    # the token of " A" (last piece: SentencePiece may emit a bare-space token first), as open-instruct
    cand = [lm.tokenizer(" " + c, add_special_tokens=False)["input_ids"][-1] for c in CHOICES]
    prompts = [build_prompt(lm, ex, profile=profile, max_prompt_tokens=max_prompt_tokens) for ex in examples]
    logps = lm.next_token_logprobs(prompts, cand)
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


def describe(*, limit=None, k_shot=0, subjects=None, split="test", profile="open_instruct",
             max_prompt_tokens=2048, **_) -> dict:
    dev = []
    if k_shot != 0:
        dev.append(f"{k_shot}-shot (the paper's column is 0-shot)")
    if subjects:
        dev.append("a subset of subjects")
    if split != "test":
        dev.append(f"split {split}")
    if max_prompt_tokens != 2048:
        dev.append(f"max_prompt_tokens {max_prompt_tokens}")
    ok, note = comparability(profile, limit, dev)
    return {"profile": profile, "subset": f"all {split} questions of {'the given' if subjects else 'all 57'} "
            f"subjects{'' if limit is None else f', first {limit} per subject'} (no sampling)",
            "metric": "accuracy over all questions (micro average)", "comparable": ok, "note": note}
