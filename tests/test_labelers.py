"""Simulated labelers: gold rules, Bradley-Terry noise of the right size, records the
reward stage reads, and the Bayes ceiling of their labels."""

import json
import math

import numpy as np
import pytest

from jaxllm.data.preferences import read_comparisons
from jaxllm.rl.labelers import (
    GOLD_RULES,
    bayes_ceiling,
    label,
    length_rule,
    liked_words_rule,
    noisy_ranking,
)


def test_gold_rules_score_what_they_say():
    rule = length_rule(40)
    assert [rule("x" * n) for n in (40, 20, 60, 0)] == [0.0, -0.5, -0.5, -1.0]
    assert liked_words_rule("Good, kind help") == 1.0
    assert liked_words_rule("good good good") == pytest.approx(1 / 3)  # repetition costs
    assert liked_words_rule("the cat sat") == 0.0 and liked_words_rule("") == 0.0
    assert set(GOLD_RULES) == {"length", "liked_words"}


def test_two_replies_are_ordered_with_the_bradley_terry_probability():
    rng = np.random.default_rng(0)
    draws = [noisy_ranking([1.0, 0.5], 0.5, rng)[0] == 0 for _ in range(20_000)]
    assert np.mean(draws) == pytest.approx(1 / (1 + math.exp(-1.0)), abs=0.01)  # 0.731
    assert noisy_ranking([0.2, 0.9, 0.2], 0, rng) == [1, 0, 2]  # tau 0: by gold, ties by index


def test_the_gold_rule_agrees_with_noisy_labels_as_often_as_the_bayes_ceiling_says(tmp_path):
    rng = np.random.default_rng(1)
    rule, tau = GOLD_RULES["length"], 0.2
    records = [
        label(
            "say something", ["x" * rng.integers(5, 80), "y" * rng.integers(5, 80)], rule, tau, rng
        )
        for _ in range(3000)
    ]
    path = tmp_path / "labels.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    comparisons = [c for _, c in read_comparisons(path)]
    agree = [
        (record["gold"][0] > record["gold"][1]) == (comparison.ranks[0] < comparison.ranks[1])
        for record, comparison in zip(records, comparisons, strict=True)
        if record["gold"][0] != record["gold"][1]
    ]
    gold_pairs = [tuple(r["gold"]) for r in records if r["gold"][0] != r["gold"][1]]
    ceiling = bayes_ceiling(gold_pairs, tau)
    assert 0.6 < ceiling < 0.95  # noisy enough to matter, informative enough to learn
    assert np.mean(agree) == pytest.approx(ceiling, abs=0.02)


def test_equal_gold_is_a_tie_and_the_rest_keeps_the_noisy_order():
    rng = np.random.default_rng(0)
    record = label("p", ["aa", "bb", "a"], length_rule(2), 0.0, rng)
    assert record["scores"] == [1.5, 1.5, 0.0]  # the two best (equal gold) tie
    record = label("p", ["aaa", "a", "aa"], length_rule(3), 0.0, rng)
    assert record["scores"] == [2.0, 0.0, 1.0]


def test_bayes_ceiling_exact_values():
    assert bayes_ceiling([(1.0, 0.0), (0.3, 0.3)], 1.0) == pytest.approx(
        (1 / (1 + math.exp(-1.0)) + 0.5) / 2
    )
    assert bayes_ceiling([(1.0, 0.0), (0.3, 0.3)], 0) == 0.75
