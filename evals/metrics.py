"""Scorers shared by the tasks: answer extraction, exact match, SQuAD F1/EM, pass@k, TruthfulQA MC.

Each follows the reference scorer it replaces (open-instruct's Tulu-1 eval, the SQuAD v1.1 script,
the Codex paper's unbiased pass@k, TruthfulQA's ``MC_calcs``) so numbers are comparable.
"""

from __future__ import annotations

import collections
import math
import re
import string
from typing import Iterable, Sequence

# open-instruct's pattern is r"[-+]?\d*\.\d+|\d+", which drops the sign of integers, so the two
# GSM8K test answers that are negative (-10, -3) could never be matched; the sign is kept here.
_NUMBER = re.compile(r"[-+]?\d*\.\d+|[-+]?\d+")


def last_number(text: str) -> str | None:
    """The last number in ``text`` (commas removed, as open-instruct's GSM scorer), or None."""
    found = _NUMBER.findall(text.replace(",", ""))
    return found[-1] if found else None


def numbers_equal(pred: str | None, gold: str) -> bool:
    """Exact match of two numeric strings, tolerant of "18" vs "18.0" (not of rounding)."""
    if pred is None:
        return False
    gold = gold.replace(",", "").strip()
    if pred == gold:
        return True
    try:
        return float(pred) == float(gold)
    except ValueError:
        return False


_ANSWER_IS = re.compile(r"[tT]he answer is (.*?)\.(?:\s|$)", re.S)


def extract_bbh_answer(output: str) -> str:
    """The answer after "So the answer is" (open-instruct: regex up to the final period), else the text."""
    match = _ANSWER_IS.search(output)
    if match:
        return match.group(1).strip()
    tail = output.split("answer is")[-1].strip()
    return tail[:-1].strip() if tail.endswith(".") else tail


# --- SQuAD v1.1 (official evaluate-v1.1.py normalization) ---------------------------------

def normalize_answer(s: str) -> str:
    """Lower, strip punctuation and English articles, collapse whitespace (SQuAD v1.1)."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def squad_f1(prediction: str, gold: str) -> float:
    pred_tokens = normalize_answer(prediction).split()
    gold_tokens = normalize_answer(gold).split()
    common = collections.Counter(pred_tokens) & collections.Counter(gold_tokens)
    num_same = sum(common.values())
    if num_same == 0:
        return 0.0
    precision = num_same / len(pred_tokens)
    recall = num_same / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def squad_em(prediction: str, gold: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(gold))


def squad_scores(prediction: str, golds: Sequence[str]) -> tuple[float, float]:
    """(EM, F1) in [0, 1], max over gold answers as the SQuAD script does."""
    if not golds:
        raise ValueError("squad_scores needs at least one gold answer")
    return max(squad_em(prediction, g) for g in golds), max(squad_f1(prediction, g) for g in golds)


# --- pass@k ---------------------------------------------------------------------------------

def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased estimator 1 - C(n-c, k) / C(n, k) (Chen et al. 2021), numerically stable form."""
    if not 0 <= c <= n:
        raise ValueError(f"need 0 <= c <= n, got n={n}, c={c}")
    if k > n:
        raise ValueError(f"pass@{k} needs at least {k} samples, got n={n}")
    if n - c < k:
        return 1.0
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


def mean(values: Iterable[float]) -> float:
    values = list(values)
    return sum(values) / len(values) if values else float("nan")


# --- TruthfulQA multiple choice (TruthfulQA's MC_calcs) --------------------------------------

def truthfulqa_mc(scores_true: Sequence[float], scores_false: Sequence[float], best_index: int) -> dict:
    """MC1/MC2 from answer log-likelihoods.

    MC1: the best answer outscores every false one. MC2: normalized probability mass on the true
    answers. ``best_index`` is the best answer's index in ``scores_true``.
    """
    if not scores_true or not scores_false:
        raise ValueError("TruthfulQA MC needs true and false answers")
    mc1 = float(scores_true[best_index] > max(scores_false))
    top = max(max(scores_true), max(scores_false))  # shift before exp, ratio unchanged
    p_true = [math.exp(s - top) for s in scores_true]
    p_false = [math.exp(s - top) for s in scores_false]
    mc2 = sum(p_true) / (sum(p_true) + sum(p_false))
    return {"mc1": mc1, "mc2": mc2}
