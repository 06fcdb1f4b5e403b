"""eval.metrics: SQuAD normalization, EM/F1/contains, answer extraction, bootstrap, McNemar."""

from __future__ import annotations

import math

import pytest

from eval.metrics import (
    bootstrap_ci,
    contains,
    exact_match,
    extract_answer,
    f1_score,
    mcnemar,
    normalize_answer,
)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("The Eiffel Tower!", "eiffel tower"),
        ("  A   cat  ", "cat"),
        ("an apple", "apple"),
        ("Theater of the Absurd", "theater of absurd"),  # only whole-word articles go
        ("U.S.A.", "usa"),
        ("Rock-n-roll", "rocknroll"),
        ("Washington, D.C.", "washington dc"),
        ("", ""),
        ("the", ""),
    ],
)
def test_normalize_answer(raw: str, expected: str) -> None:
    assert normalize_answer(raw) == expected


def test_exact_match_squad_cases() -> None:
    assert exact_match("the Denver Broncos", ["Denver Broncos"])
    assert exact_match("Denver Broncos.", "Denver Broncos")  # a single string is one gold
    assert not exact_match("Broncos", ["Denver Broncos"])
    assert exact_match("  DENVER   broncos ", ["Carolina Panthers", "Denver Broncos"])


def test_exact_match_aliases_and_empty_golds() -> None:
    golds = ["Pound sterling", "British pound", "pound"]
    assert exact_match("the pound", golds)
    assert exact_match("British Pound", golds)
    assert not exact_match("euro", golds)
    assert not exact_match("", [""])  # an empty gold never matches
    assert not exact_match("the", ["a"])  # both normalize to empty
    assert not exact_match("Rome", [])


def test_f1_score_known_values() -> None:
    assert f1_score("Denver Broncos", ["Denver Broncos"]) == 1.0
    assert f1_score("the Broncos", ["Denver Broncos"]) == pytest.approx(2 / 3)
    assert f1_score("New York City", ["New York"]) == pytest.approx(0.8)
    assert f1_score("rome rome", ["rome"]) == pytest.approx(2 / 3)  # repeated tokens count once each
    assert f1_score("Paris", ["Rome"]) == 0.0
    assert f1_score("", ["Rome"]) == 0.0
    assert f1_score("Rome", [""]) == 0.0


def test_f1_score_best_over_golds() -> None:
    assert f1_score("United States", ["USA", "United States of America"]) == pytest.approx(2 / 3)
    assert f1_score("United States", ["USA", "United States of America", "United States Army"]) == pytest.approx(0.8)
    assert f1_score("USA", ["USA", "United States of America"]) == 1.0


def test_contains_whole_words() -> None:
    assert contains("The capital is Rome.", ["Rome"])
    assert not contains("Romeo and Juliet", ["Rome"])
    assert contains("I live in new york city", ["New York"])
    assert not contains("York, New", ["New York"])
    assert contains("It's in The Hague", ["The Hague"])
    assert contains("washington dc is the capital", ["Washington, D.C."])
    assert contains("Rome", "Rome")  # a single string is one gold


def test_contains_edge_cases() -> None:
    assert not contains("anything at all", [""])
    assert not contains("anything at all", ["the"])  # normalizes to empty
    assert not contains("", ["Rome"])
    assert not contains("Rome", [])
    assert contains("...Rome!!!", ["rome"])


@pytest.mark.parametrize(
    ("continuation", "expected"),
    [
        (" Rome\nQ: What is the capital of Spain?\nA: Madrid", "Rome"),
        ("\n\n  Rome  \n", "Rome"),
        ("A: Paris", "Paris"),
        ("Answer: Paris.", "Paris"),
        ("answer:Paris", "Paris"),
        (" Rome. Q: What is the capital of Spain?", "Rome"),
        (" Rome Q: What is the capital of Spain?", "Rome"),
        (" Rome! Q: next", "Rome"),
        (" Rome is the capital. It is old.", "Rome is the capital. It is old"),  # no "Q:": whole line
        ("", ""),
        ("\n", ""),
    ],
)
def test_extract_answer_rule(continuation: str, expected: str) -> None:
    assert extract_answer(continuation) == expected


def test_extract_answer_keeps_abbreviations() -> None:
    got = extract_answer(" Washington, D.C. Q: What is the capital of France?")
    assert normalize_answer(got) == normalize_answer("Washington, D.C.")


def test_extract_answer_cot() -> None:
    text = "The Colosseum is in Italy. The capital of Italy is Rome. So the answer is Rome.\nQ: next"
    assert extract_answer(text, cot=True) == "Rome"
    assert extract_answer("the answer is Paris. Wait, no: The Answer Is: Rome\nmore", cot=True) == "Rome"
    assert extract_answer("So THE ANSWER IS New York City", cot=True) == "New York City"
    # Without the phrase, cot=True falls back to the first-line rule.
    assert extract_answer(" Rome\nQ: next", cot=True) == "Rome"
    # cot=False ignores the phrase.
    assert extract_answer("So the answer is Rome.", cot=False) == "So the answer is Rome"


def test_bootstrap_ci_deterministic_and_sane() -> None:
    values = [1, 0, 1, 1, 0, 1, 0, 1, 1, 1] * 5
    a = bootstrap_ci(values, n_resamples=500, seed=3)
    b = bootstrap_ci(values, n_resamples=500, seed=3)
    assert a == b
    low, high = a
    mean = sum(values) / len(values)
    assert 0.0 <= low <= mean <= high <= 1.0
    assert bootstrap_ci([True, True, True]) == (1.0, 1.0)
    wide = bootstrap_ci(values, alpha=0.01)
    narrow = bootstrap_ci(values, alpha=0.5)
    assert wide[0] <= narrow[0] and narrow[1] <= wide[1]


def test_bootstrap_ci_rejects_bad_input() -> None:
    with pytest.raises(ValueError):
        bootstrap_ci([])
    with pytest.raises(ValueError):
        bootstrap_ci([1, 0], alpha=1.5)


def test_mcnemar_known_values() -> None:
    # 5 fixed, 0 broken: p = 2 * 0.5**5
    a = [False] * 5 + [True] * 5
    b = [True] * 10
    r = mcnemar(a, b)
    assert (r["b_fixed"], r["b_broken"], r["statistic"]) == (5, 0, 0)
    assert r["p_value"] == pytest.approx(0.0625)

    # 9 fixed, 1 broken: p = 2 * (C(10,0) + C(10,1)) / 2**10 = 22 / 1024
    a = [False] * 9 + [True]
    b = [True] * 9 + [False]
    r = mcnemar(a, b)
    assert (r["b_fixed"], r["b_broken"], r["statistic"]) == (9, 1, 1)
    assert r["p_value"] == pytest.approx(22 / 1024)


def test_mcnemar_symmetric_and_degenerate() -> None:
    assert mcnemar([True, False], [True, False])["p_value"] == 1.0  # no discordant pair
    r = mcnemar([True, True, True, False, False, False], [False, False, False, True, True, True])
    assert r["p_value"] == 1.0  # balanced: capped at 1
    a, b = [False] * 30 + [True] * 2, [True] * 30 + [False] * 2
    forward, backward = mcnemar(a, b), mcnemar(b, a)
    assert forward["p_value"] == backward["p_value"]
    assert forward["b_fixed"] == backward["b_broken"] == 30
    expected = 2 * sum(math.comb(32, k) for k in range(3)) / 2**32
    assert forward["p_value"] == pytest.approx(expected)


def test_mcnemar_large_n_does_not_overflow() -> None:
    r = mcnemar([False] * 2000, [True] * 2000)
    assert r["p_value"] == 0.0 or r["p_value"] < 1e-300


def test_mcnemar_length_mismatch() -> None:
    with pytest.raises(ValueError):
        mcnemar([True], [True, False])
