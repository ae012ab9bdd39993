"""Judges of a pair of replies: the gold rule's and a reward run's probabilities flip
exactly when the replies swap; the policy judge cancels position bias by asking both ways."""

import jax
import numpy as np
import pytest
from helpers import tiny_config

from jaxllm.errors import UserError
from jaxllm.model import LanguageModel
from jaxllm.rl.judges import GoldJudge, PolicyJudge, RewardModelJudge, judge_one
from jaxllm.rl.labelers import length_rule
from jaxllm.stages.common import LoadedRun
from jaxllm.tokenizer import load_tokenizer

PROMPTS = [[{"role": "user", "content": "say something"}]] * 3
REPLIES_A = ["a reply of about forty characters, fine.", "short", "same"]
REPLIES_B = ["tiny", "a somewhat longer reply than the other", "same"]


def tiny_run(*overrides: str) -> LoadedRun:
    cfg = tiny_config(*overrides)
    model = LanguageModel(cfg.model)
    return LoadedRun(cfg, load_tokenizer("bytes"), model, model.init(jax.random.key(1)))


def test_the_gold_judge_is_the_labelers_logistic_and_flips_exactly():
    rule = length_rule()
    judge = GoldJudge(rule, tau=0.1)
    p = judge(PROMPTS, REPLIES_A, REPLIES_B)
    gaps = np.array([rule(a) - rule(b) for a, b in zip(REPLIES_A, REPLIES_B, strict=True)])
    np.testing.assert_allclose(p, 1 / (1 + np.exp(-gaps / 0.1)), rtol=1e-12)
    np.testing.assert_array_equal(judge(PROMPTS, REPLIES_B, REPLIES_A), 1 - p)
    assert p[2] == 0.5
    exact = GoldJudge(rule, tau=0)(PROMPTS, REPLIES_A, REPLIES_B)
    np.testing.assert_array_equal(exact, [1.0, 0.0, 0.5])
    with pytest.raises(UserError, match="tau must be >= 0"):
        GoldJudge(rule, tau=-1)


def test_the_reward_model_judge_is_sigmoid_of_the_score_gap_and_flips_exactly():
    run = tiny_run("model.scalar_heads=[reward]", "model.max_seq_len=96")
    run.params["heads"]["reward"] = jax.tree.map(lambda x: x + 0.3, run.params["heads"]["reward"])
    judge = RewardModelJudge(run, rows_per_call=4)
    p = judge(PROMPTS, REPLIES_A, REPLIES_B)
    scores_a = judge.scores(PROMPTS, REPLIES_A)
    scores_b = judge.scores(PROMPTS, REPLIES_B)
    np.testing.assert_allclose(p, 1 / (1 + np.exp(-(scores_a - scores_b))), rtol=1e-12)
    assert len(set(np.round(p, 6))) > 1 and p[2] == 0.5  # same reply: exactly even
    np.testing.assert_array_equal(judge(PROMPTS, REPLIES_B, REPLIES_A), 1 - p)
    # A reply's score does not depend on the company it is scored in.
    alone = judge.scores(PROMPTS[:1], REPLIES_A[:1])
    assert alone[0] == scores_a[0]
    assert judge_one(judge, PROMPTS[0], REPLIES_A[0], REPLIES_B[0]) == p[0]
    with pytest.raises(UserError, match="no 'reward' head"):
        RewardModelJudge(tiny_run())


def test_the_policy_judge_averages_both_orders():
    run = tiny_run("model.max_seq_len=320")
    judge = PolicyJudge(run)
    p = judge(PROMPTS, REPLIES_A, REPLIES_B)
    assert np.all((p > 0) & (p < 1))
    np.testing.assert_allclose(judge(PROMPTS, REPLIES_B, REPLIES_A), 1 - p, atol=1e-6)
    # A judge that always answers "A" has no view: 0.5 for every pair.
    judge.probability_of_a = lambda prompts, first, second: np.ones(len(prompts))
    np.testing.assert_array_equal(judge(PROMPTS, REPLIES_A, REPLIES_B), 0.5)
