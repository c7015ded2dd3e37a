"""Scorers against closed forms and hand-worked cases."""

from __future__ import annotations

import math

import pytest

from qtulu.evals.metrics import (
    extract_bbh_answer,
    last_number,
    numbers_equal,
    pass_at_k,
    squad_scores,
    truthfulqa_mc,
)


def closed_form(n, c, k):
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


@pytest.mark.parametrize("n,c,k,expected", [
    (5, 2, 1, 0.4), (5, 2, 2, 0.7), (10, 0, 1, 0.0), (10, 10, 10, 1.0), (1, 1, 1, 1.0), (20, 1, 10, 0.5),
])
def test_pass_at_k_hand_cases(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


def test_pass_at_k_matches_closed_form_everywhere():
    for n in range(1, 21):
        for c in range(0, n + 1):
            for k in (1, 5, 10):
                if k <= n:
                    assert pass_at_k(n, c, k) == pytest.approx(closed_form(n, c, k), abs=1e-12)


def test_pass_at_k_rejects_bad_counts():
    with pytest.raises(ValueError):
        pass_at_k(3, 4, 1)
    with pytest.raises(ValueError):
        pass_at_k(3, 1, 5)


def test_last_number_and_equality():
    assert last_number("She makes 9 * 2 = $18 a day. So the answer is 1,018.") == "1018"
    assert last_number("no digits") is None
    assert last_number("the answer is -10.") == "-10"  # open-instruct's regex loses this sign
    assert last_number("it is -3.5 then 0.25") == "0.25"
    assert numbers_equal("18.0", "18") and not numbers_equal("18.5", "18") and not numbers_equal(None, "1")


def test_bbh_extraction():
    assert extract_bbh_answer("Let's think. So the answer is (B).") == "(B)"
    assert extract_bbh_answer("... So the answer is No.") == "No"
    assert extract_bbh_answer("So the answer is 1.5.") == "1.5"
    assert extract_bbh_answer("just text") == "just text"


def test_squad_f1_em_hand_cases():
    assert squad_scores("The Seine", ["Seine"]) == (1.0, 1.0)  # articles and case removed
    em, f1 = squad_scores("the river Seine", ["Seine"])
    assert em == 0.0 and f1 == pytest.approx(2 * 0.5 * 1.0 / 1.5)
    assert squad_scores("Lyon", ["Paris", "paris!"]) == (0.0, 0.0)
    with pytest.raises(ValueError):
        squad_scores("x", [])


def test_truthfulqa_mc_hand_case():
    # true answers log p = log .5, log .1; false: log .2, log .2 -> MC2 = .6 / 1.0; best (index 0) beats all false
    out = truthfulqa_mc([math.log(.5), math.log(.1)], [math.log(.2), math.log(.2)], best_index=0)
    assert out["mc1"] == 1.0 and out["mc2"] == pytest.approx(0.6)
    out = truthfulqa_mc([math.log(.1), math.log(.5)], [math.log(.2)], best_index=0)
    assert out["mc1"] == 0.0 and out["mc2"] == pytest.approx(0.6 / 0.8)
