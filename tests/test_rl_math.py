"""RL math against float64 NumPy references, and the properties the papers rely on."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm.rl.advantages import (
    ADVANTAGE_ESTIMATORS,
    AdvantageInputs,
    gae_advantages,
    masked_mean,
    masked_sum,
    masked_variance,
    masked_whiten,
    register_advantage_estimator,
    rloo_advantages,
)
from jaxllm.rl.kl import kl_k1, kl_k2, kl_k3, kl_penalty, register_kl_estimator
from jaxllm.rl.policy_losses import aggregate, clipped_policy_loss, clipped_value_loss

# Rows with padding in the middle (a tool output, say), at the end, a full row and an empty one.
MASK = np.array(
    [
        [1, 1, 1, 0, 0, 1, 1, 1, 0, 0],
        [1, 1, 1, 1, 1, 1, 1, 1, 1, 1],
        [0, 0, 1, 1, 0, 1, 0, 0, 0, 0],
        [1, 1, 1, 1, 1, 1, 0, 0, 0, 0],
        [0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        [1, 0, 1, 0, 1, 0, 1, 0, 1, 0],
        [0, 0, 0, 0, 0, 0, 0, 0, 0, 1],
        [1, 1, 0, 0, 0, 0, 0, 0, 0, 0],
    ],
    np.float32,
)


def random_bt(seed: int, scale: float = 1.0, pad_value: float = np.nan) -> np.ndarray:
    """Float32 normal values shaped like MASK, with `pad_value` where MASK is 0."""
    values = np.random.default_rng(seed).standard_normal(MASK.shape) * scale
    return np.where(MASK > 0, values, pad_value).astype(np.float32)


def reference_gae(rewards, values, mask, gamma, lam):
    """Float64 textbook GAE on each row's real tokens, compressed; 0 on padding."""
    advantages = np.zeros(mask.shape)
    for b in range(mask.shape[0]):
        real = np.flatnonzero(mask[b])
        r, v = rewards[b, real].astype(np.float64), values[b, real].astype(np.float64)
        next_v = np.append(v[1:], 0.0)
        row, running = np.zeros(len(real)), 0.0
        for i in reversed(range(len(real))):
            running = r[i] + gamma * next_v[i] - v[i] + gamma * lam * running
            row[i] = running
        advantages[b, real] = row
    returns = np.where(mask > 0, advantages + np.nan_to_num(values.astype(np.float64)), 0.0)
    return advantages, returns


def reference_reward_to_go(rewards, mask):
    """Float64 sum of the real rewards from each real token to the end of its row."""
    real_rewards = np.where(mask > 0, rewards.astype(np.float64), 0.0)
    to_go = np.cumsum(real_rewards[:, ::-1], axis=1)[:, ::-1]
    return np.where(mask > 0, to_go, 0.0)


# Masked statistics.


@pytest.mark.parametrize("axis", [None, 1])
def test_masked_statistics_equal_float64_numpy(axis):
    values = random_bt(0, scale=3.0)
    real = np.where(MASK > 0, values.astype(np.float64), 0.0)
    count = MASK.sum(axis=axis)
    mean = np.divide(
        real.sum(axis=axis), count, out=np.zeros_like(count, np.float64), where=count > 0
    )
    centered = np.where(MASK > 0, values - (mean if axis is None else mean[:, None]), 0.0)
    population = np.divide(
        (centered**2).sum(axis=axis), count, where=count > 0, out=np.zeros_like(mean)
    )
    sample = np.divide(
        (centered**2).sum(axis=axis), count - 1, where=count > 1, out=np.zeros_like(mean)
    )

    np.testing.assert_allclose(masked_sum(values, MASK, axis), real.sum(axis=axis), rtol=1e-6)
    np.testing.assert_allclose(masked_mean(values, MASK, axis), mean, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(masked_variance(values, MASK, axis), population, rtol=1e-5)
    np.testing.assert_allclose(
        masked_variance(values, MASK, axis, unbiased=True), sample, rtol=1e-5
    )
    if axis == 1:  # the empty row and the one-token rows give 0, not NaN
        assert float(masked_mean(values, MASK, axis)[4]) == 0.0
        assert float(masked_variance(values, MASK, axis, unbiased=True)[6]) == 0.0


def test_whitened_values_have_masked_mean_0_and_variance_1():
    values = random_bt(1, scale=5.0) + 3.0
    whitened = np.asarray(masked_whiten(values, MASK), np.float64)
    real = whitened[MASK > 0]
    assert real.mean() == pytest.approx(0.0, abs=1e-6)
    assert real.var() == pytest.approx(1.0, rel=1e-5)
    assert np.all(whitened[MASK == 0] == 0.0)

    kept = np.asarray(masked_whiten(values, MASK, shift_mean=False), np.float64)[MASK > 0]
    source = values[MASK > 0].astype(np.float64)
    np.testing.assert_allclose(kept, (source - source.mean()) / source.std() + source.mean(), 1e-5)


# GAE.


@pytest.mark.parametrize("gamma, lam", [(0.99, 0.95), (0.9, 0.5), (1.0, 1.0), (0.97, 0.0)])
def test_gae_equals_float64_numpy(gamma, lam):
    rewards, values = random_bt(2), random_bt(3)
    advantages, returns = gae_advantages(rewards, values, MASK, gamma, lam)
    expected_advantages, expected_returns = reference_gae(rewards, values, MASK, gamma, lam)
    np.testing.assert_allclose(advantages, expected_advantages, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(returns, expected_returns, rtol=1e-5, atol=1e-5)


def test_gae_with_gamma_lam_1_is_reward_to_go_minus_value():
    rewards, values = random_bt(4), random_bt(5)
    advantages, returns = gae_advantages(rewards, values, MASK, 1.0, 1.0)
    to_go = reference_reward_to_go(rewards, MASK)
    expected = np.where(MASK > 0, to_go - np.nan_to_num(values.astype(np.float64)), 0.0)
    np.testing.assert_allclose(advantages, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(returns, to_go, rtol=1e-5, atol=1e-5)


def test_gae_with_lam_0_is_one_step_td_error():
    rewards, values = random_bt(6), random_bt(7)
    advantages, _ = gae_advantages(rewards, values, MASK, 0.9, 0.0)
    # Row 0's real tokens sit at 0, 1, 2, 5, 6, 7: token 2's next value is token 5's.
    row_r, row_v = rewards[0].astype(np.float64), values[0].astype(np.float64)
    assert float(advantages[0, 2]) == pytest.approx(row_r[2] + 0.9 * row_v[5] - row_v[2], 1e-6)
    assert float(advantages[0, 7]) == pytest.approx(row_r[7] - row_v[7], 1e-6)  # terminal: V = 0
    assert float(advantages[0, 0]) == pytest.approx(row_r[0] + 0.9 * row_v[1] - row_v[0], 1e-6)


def test_gae_padding_changes_nothing_and_masked_positions_are_0():
    rewards, values = random_bt(8, pad_value=0.0), random_bt(9, pad_value=0.0)
    advantages, returns = gae_advantages(rewards, values, MASK, 0.99, 0.95)
    assert np.all(np.asarray(advantages)[MASK == 0] == 0.0)
    assert np.all(np.asarray(returns)[MASK == 0] == 0.0)

    garbage = np.full((MASK.shape[0], 5), 7.0, np.float32)
    padded = gae_advantages(
        np.concatenate([rewards, garbage], 1),
        np.concatenate([values, -garbage], 1),
        np.concatenate([MASK, np.zeros_like(garbage)], 1),
        0.99,
        0.95,
    )
    np.testing.assert_array_equal(padded[0][:, : MASK.shape[1]], advantages)
    np.testing.assert_array_equal(padded[1][:, : MASK.shape[1]], returns)

    # The same real tokens packed to the left of each row give the same advantages.
    order = np.argsort(MASK == 0, axis=1, kind="stable")
    packed_mask = np.take_along_axis(MASK, order, 1)
    packed = gae_advantages(
        np.take_along_axis(rewards, order, 1),
        np.take_along_axis(values, order, 1),
        packed_mask,
        0.99,
        0.95,
    )
    np.testing.assert_allclose(packed[0][packed_mask > 0], np.asarray(advantages)[MASK > 0], 1e-6)


# Advantage estimators, by name.

# Three groups of K = 4 completions of 1-3 of N = 3 tokens (the rest padding): rewards with
# spread, a group of equal rewards (float32's mean of four 0.1 misses 0.1 by an ulp), and
# rewards whose sample std is 1.
REWARDS = np.array([1, 0, 0, 0, 0.1, 0.1, 0.1, 0.1, 0, 0, 2, 0], np.float32)
LENGTHS = np.array([3, 2, 2, 2, 1, 1, 1, 1, 2, 2, 2, 2])
COMPLETION_MASK = (np.arange(3)[None] < LENGTHS[:, None]).astype(np.float32)
# Each reward minus its group's mean (0.25, 0.1 and 0.5).
CENTERED = [0.75, -0.25, -0.25, -0.25, 0, 0, 0, 0, -0.5, -0.5, 1.5, -0.5]
GROUP_ESTIMATORS = ("grpo", "dr_grpo", "rloo", "reinforce_pp")


def estimate(name, rewards=REWARDS, mask=COMPLETION_MASK, group_size=4, **inputs) -> np.ndarray:
    inputs = AdvantageInputs(jnp.asarray(rewards), jnp.asarray(mask), group_size, **inputs)
    return np.asarray(ADVANTAGE_ESTIMATORS[name](inputs).advantages_bn)


def at_each_token(values_b) -> np.ndarray:
    """One value per completion at each of its tokens, 0 on padding, float64."""
    return np.where(COMPLETION_MASK > 0, np.asarray(values_b, np.float64)[:, None], 0.0)


@pytest.mark.parametrize(
    "name, inputs, expected_b",
    [
        # (r - mean) / (std + 1e-4), sample stds sqrt(0.75 / 3) = 0.5 and sqrt(3 / 3) = 1.
        (
            "grpo",
            {},
            [0.75 / 0.5001]
            + [-0.25 / 0.5001] * 3
            + [0] * 4
            + [-0.5 / 1.0001] * 2
            + [1.5 / 1.0001, -0.5 / 1.0001],
        ),
        ("grpo", {"std_eps": 0.0}, [1.5, -0.5, -0.5, -0.5, 0, 0, 0, 0, -0.5, -0.5, 1.5, -0.5]),
        ("dr_grpo", {}, CENTERED),
        # r_i - the mean of the 3 others: 1 - 0, 0 - 1/3; 0 - 2/3, 2 - 0. The group's
        # mean (with r_i in it) would give dr_grpo's 0.75 and -0.25.
        ("rloo", {}, [1, -1 / 3, -1 / 3, -1 / 3, 0, 0, 0, 0, -2 / 3, -2 / 3, 2, -2 / 3]),
    ],
)
def test_group_estimators_by_hand(name, inputs, expected_b):
    advantages = estimate(name, **inputs)
    np.testing.assert_allclose(advantages, at_each_token(expected_b), rtol=1e-6, atol=0)
    assert advantages[4:8].tolist() == [[0.0] * 3] * 4  # equal rewards: exactly 0


def test_reinforce_pp_whitens_the_centred_rewards_over_the_trained_tokens():
    advantages = estimate("reinforce_pp")
    # 21 tokens (row 0 has 3, group 1's rows 1 each); over them the centred rewards have
    # mean (3 x 0.75 - 2 x 3 x 0.25 + 0 + 2 x 0) / 21 and mean square
    # (3 x 0.5625 + 2 x 3 x 0.0625 + 0 + 2 x 3) / 21.
    mu = 0.75 / 21
    var = 8.0625 / 21 - mu**2
    expected = at_each_token([(a - mu) / np.sqrt(var + 1e-8) for a in CENTERED])
    np.testing.assert_allclose(advantages, expected, rtol=1e-5, atol=1e-7)
    # The group of equal rewards is moved off 0 by the batch's mean.
    assert advantages[4, 0] == pytest.approx(-mu / np.sqrt(var), rel=1e-5)  # -0.058


@pytest.mark.parametrize("name", GROUP_ESTIMATORS)
def test_padding_and_completions_left_out_move_no_advantage(name):
    """Two more padding tokens per row and a fourth group the mask leaves out whole,
    holding NaN and 1e9: the trained tokens' advantages do not move, the rest are 0."""
    advantages = estimate(name)
    rewards = np.concatenate([REWARDS, [np.nan, 1e9, 0, 0]]).astype(np.float32)
    mask = np.pad(COMPLETION_MASK, ((0, 4), (0, 2)))
    padded = estimate(name, rewards, mask)
    np.testing.assert_allclose(padded[:12, :3], advantages, rtol=1e-6, atol=1e-7)
    assert np.all(padded[COMPLETION_MASK.shape[0] :] == 0) and np.all(padded[:, 3:] == 0)
    assert np.all(advantages[COMPLETION_MASK == 0] == 0)


def test_rloo_is_trls_rloo_advantage():
    """TRL 1.16's RLOOTrainer computes its advantage inside `_generate_and_score_completions`,
    reachable only through a full trainer (models, tokenizer, accelerate), so its formula is
    written here as TRL states it: rewards viewed as (prompts, num_generations); each
    completion's baseline is (its group's reward sum - its own reward) / (the group's
    count - 1); advantage = reward - baseline; then, only when `normalize_advantages`
    (default False), a batch-wide (a - mean) / (std + 1e-4), so by default nothing more."""
    rng = np.random.default_rng(20)
    binary, normal = rng.integers(0, 2, 24), rng.standard_normal(24) * 3
    rewards = np.concatenate([binary, normal, np.full(8, 0.3)]).astype(np.float32)
    grouped = rewards.astype(np.float64).reshape(-1, 8)
    baseline = (grouped.sum(axis=1, keepdims=True) - grouped) / (8 - 1)
    trl = (grouped - baseline).reshape(-1)
    ours = estimate("rloo", rewards, np.ones((56, 1), np.float32), group_size=8)
    np.testing.assert_allclose(ours[:, 0], trl, rtol=1e-5, atol=1e-6)


def test_gae_by_name_is_ppos_gae():
    rewards, values = random_bt(2), random_bt(3)
    inputs = AdvantageInputs(
        jnp.zeros(8), MASK, 1, token_rewards_bn=rewards, values_bn=values, gamma=0.9, lam=0.5
    )
    advantages, returns = ADVANTAGE_ESTIMATORS["gae"](inputs)
    expected = gae_advantages(rewards, values, MASK, 0.9, 0.5)
    np.testing.assert_array_equal(advantages, expected[0])
    np.testing.assert_array_equal(returns, expected[1])
    with pytest.raises(ValueError, match="needs token_rewards_bn and values_bn"):
        ADVANTAGE_ESTIMATORS["gae"](AdvantageInputs(jnp.zeros(8), MASK, 1))


def test_estimators_refuse_groups_that_do_not_fit_and_unknown_or_builtin_names():
    with pytest.raises(ValueError, match="group_size=4 must be >= 1 and divide the 6 rewards"):
        estimate("grpo", np.zeros(6), np.ones((6, 1)))
    with pytest.raises(ValueError, match="rloo needs group_size >= 2"):
        estimate("rloo", np.zeros(6), np.ones((6, 1)), group_size=1)
    with pytest.raises(ValueError, match="advantage estimator 'ppo' is unknown; use grpo, "):
        ADVANTAGE_ESTIMATORS["ppo"]
    with pytest.raises(ValueError, match="'rloo' is a built-in advantage estimator"):
        register_advantage_estimator("rloo", rloo_advantages)


# KL estimators.


def test_kl_estimators_equal_float64_numpy():
    rng = np.random.default_rng(11)
    logp = -rng.exponential(2.0, (4, 9)).astype(np.float32)
    ref_logp = (logp + rng.standard_normal((4, 9)) * 0.5).astype(np.float32)
    log_r = ref_logp.astype(np.float64) - logp
    expected = {"k1": -log_r, "k2": 0.5 * log_r**2, "k3": np.expm1(log_r) - log_r}
    named = {"k1": kl_k1, "k2": kl_k2, "k3": kl_k3}
    for name, reference in expected.items():
        np.testing.assert_allclose(
            kl_penalty(logp, ref_logp, name), reference, rtol=1e-5, atol=1e-7
        )
        np.testing.assert_array_equal(kl_penalty(logp, ref_logp, name), named[name](logp, ref_logp))
    assert np.all(np.asarray(kl_k2(logp, ref_logp)) >= 0)
    assert np.all(np.asarray(kl_k3(logp, ref_logp)) >= 0)
    with pytest.raises(ValueError, match="KL estimator 'k4' is unknown; use k1, k2, k3 or "):
        kl_penalty(logp, ref_logp, "k4")
    register_kl_estimator("twice_k2", lambda logp, ref_logp: 2.0 * kl_k2(logp, ref_logp))
    np.testing.assert_allclose(
        kl_penalty(logp, ref_logp, "twice_k2"), log_r**2, rtol=1e-5, atol=1e-7
    )
    with pytest.raises(ValueError, match="'k2' is a built-in KL estimator"):
        register_kl_estimator("k2", kl_k1)


def test_kl_estimators_are_exactly_0_at_the_reference_and_k3_never_negative():
    logp = -np.random.default_rng(12).exponential(3.0, (3, 50)).astype(np.float32)
    for estimator in (kl_k1, kl_k2, kl_k3):
        assert np.asarray(estimator(logp, logp)).tolist() == np.zeros(logp.shape).tolist()
    tiny_log_r = np.linspace(-1e-3, 1e-3, 20001, dtype=np.float32)
    assert float(jnp.min(kl_k3(np.zeros_like(tiny_log_r), tiny_log_r))) >= 0.0


# Clipped policy loss.


def reference_policy_loss(logp, old_logp, advantages, eps_low, eps_high, dual_clip):
    ratio = np.exp(logp.astype(np.float64) - old_logp)
    a = advantages.astype(np.float64)
    unclipped, clipped = -a * ratio, -a * np.clip(ratio, 1 - eps_low, 1 + eps_high)
    loss = np.maximum(unclipped, clipped)
    dual = (a < 0) & (loss > -a * dual_clip)
    loss = np.where(dual, -a * dual_clip, loss)
    return loss, clipped > unclipped, dual, ratio - 1 - np.log(ratio)


def test_clipped_policy_loss_equals_float64_numpy():
    rng = np.random.default_rng(13)
    old_logp = -rng.exponential(2.0, (6, 20)).astype(np.float32)
    logp = (old_logp + rng.standard_normal((6, 20)) * 0.6).astype(np.float32)
    advantages = rng.standard_normal((6, 20)).astype(np.float32)
    advantages[0, :4] = 0.0
    terms = clipped_policy_loss(
        logp, old_logp, advantages, eps_low=0.2, eps_high=0.28, dual_clip=3.0
    )
    loss, clipped, dual, approx_kl = reference_policy_loss(
        logp, old_logp, advantages, 0.2, 0.28, 3.0
    )
    assert 10 < clipped.sum() < 110 and dual.sum() > 0  # every branch is exercised
    np.testing.assert_allclose(terms.loss_bt, loss, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(terms.clipped_bt, clipped.astype(np.float32))
    np.testing.assert_array_equal(terms.dual_clipped_bt, dual.astype(np.float32))
    np.testing.assert_allclose(terms.approx_kl_bt, approx_kl, rtol=1e-4, atol=1e-6)


def policy_loss_and_grad(log_ratio, advantage, **clip):
    def total_loss(logp):
        return jnp.sum(clipped_policy_loss(logp, jnp.zeros_like(logp), advantage, **clip).loss_bt)

    logp = jnp.full((1, 1), log_ratio, jnp.float32)
    advantage = jnp.full((1, 1), advantage, jnp.float32)
    loss, grad = jax.value_and_grad(total_loss)(logp)
    return float(loss), float(grad[0, 0])


@pytest.mark.parametrize("advantage", [1.5, -0.7])
def test_policy_loss_at_ratio_1_has_the_plain_policy_gradient(advantage):
    for clip in ({}, {"eps_low": 0.2, "eps_high": 0.28, "dual_clip": 3.0}):
        loss, grad = policy_loss_and_grad(0.0, advantage, **clip)
        assert loss == pytest.approx(-advantage) and grad == pytest.approx(-advantage)


def test_clip_higher_lets_ratio_1_25_through_for_positive_advantage():
    log_ratio = float(np.log(1.25))
    assert policy_loss_and_grad(log_ratio, 1.0, eps_high=0.28) == pytest.approx((-1.25, -1.25))
    assert policy_loss_and_grad(log_ratio, 1.0, eps_high=0.2) == pytest.approx((-1.2, 0.0))
    # For A < 0 the low side clips: ratio 0.75 < 1 - 0.2.
    assert policy_loss_and_grad(float(np.log(0.75)), -1.0, eps_low=0.2) == pytest.approx((0.8, 0.0))


def test_dual_clip_caps_the_loss_for_negative_advantage():
    ratio_10 = float(np.log(10.0))
    assert policy_loss_and_grad(ratio_10, -1.0) == pytest.approx((10.0, 10.0), rel=1e-5)
    assert policy_loss_and_grad(ratio_10, -1.0, dual_clip=3.0) == pytest.approx((3.0, 0.0))
    assert policy_loss_and_grad(float(np.log(2.0)), -1.0, dual_clip=3.0) == pytest.approx(
        (2.0, 2.0)
    )
    assert policy_loss_and_grad(ratio_10, 1.0, dual_clip=3.0) == pytest.approx((-1.2, 0.0))
    with pytest.raises(ValueError, match="dual_clip=1.0 must be > 1"):
        clipped_policy_loss(jnp.zeros(2), jnp.zeros(2), jnp.zeros(2), dual_clip=1.0)


# Clipped value loss.


def test_clipped_value_loss_equals_float64_numpy():
    rng = np.random.default_rng(14)
    old_values, returns = rng.standard_normal((2, 5, 16)).astype(np.float32)
    values = (old_values + rng.standard_normal((5, 16)) * 0.4).astype(np.float32)
    terms = clipped_value_loss(values, old_values, returns, clip_eps=0.2)
    v, v_old, r = (x.astype(np.float64) for x in (values, old_values, returns))
    unclipped, clipped = (v - r) ** 2, (np.clip(v, v_old - 0.2, v_old + 0.2) - r) ** 2
    assert 5 < (clipped > unclipped).sum() < 75
    np.testing.assert_allclose(terms.loss_bt, 0.5 * np.maximum(unclipped, clipped), rtol=1e-5)
    np.testing.assert_array_equal(terms.clipped_bt, (clipped > unclipped).astype(np.float32))


def test_value_loss_clip_zeroes_the_gradient_past_the_trust_region():
    def loss_and_grad(value):
        fn = lambda v: jnp.sum(
            clipped_value_loss(v, jnp.zeros(1), jnp.full(1, 1.0), clip_eps=0.2).loss_bt
        )
        loss, grad = jax.value_and_grad(fn)(jnp.full(1, value))
        return float(loss), float(grad[0])

    assert loss_and_grad(0.1) == pytest.approx((0.405, -0.9))  # inside: plain squared error
    assert loss_and_grad(-0.5) == pytest.approx((1.125, -1.5))  # moving away: unclipped is larger
    assert loss_and_grad(0.5) == pytest.approx((0.32, 0.0))  # moving toward R past V_old + eps


# Aggregation.


def reference_aggregate(loss, mask, mode, max_length):
    """Float64 full-batch loss in each mode, with the formulas of the docstring."""
    real = np.where(mask > 0, loss.astype(np.float64), 0.0)
    tokens = mask.sum(axis=1)
    rows = tokens > 0
    if mode == "token_mean":
        return real.sum() / tokens.sum()
    if mode == "sequence_mean":
        return np.mean(real.sum(axis=1)[rows] / tokens[rows])
    return real.sum() / (rows.sum() * max_length)


@pytest.mark.parametrize("mode", ["token_mean", "sequence_mean", "constant_length"])
def test_micro_batches_add_up_to_the_full_batch(mode):
    loss = random_bt(15, scale=2.0)
    max_length = 16
    full_sum, full_denominator = aggregate(loss, MASK, mode, max_length)
    micro_sum, micro_denominator = 0.0, 0.0
    for micro_loss, micro_mask in zip(np.split(loss, 4), np.split(MASK, 4), strict=True):
        part_sum, part_denominator = aggregate(micro_loss, micro_mask, mode, max_length)
        micro_sum, micro_denominator = micro_sum + part_sum, micro_denominator + part_denominator

    expected = reference_aggregate(loss, MASK, mode, max_length)
    expected_denominator = {"token_mean": 33.0, "sequence_mean": 7.0, "constant_length": 7.0 * 16}
    assert float(full_denominator) == float(micro_denominator) == expected_denominator[mode]
    assert float(full_sum / full_denominator) == pytest.approx(expected, rel=1e-6)
    assert float(micro_sum / micro_denominator) == pytest.approx(expected, rel=1e-6)
    assert full_sum.dtype == full_denominator.dtype == jnp.float32


def test_aggregate_refuses_unknown_mode_and_missing_max_length():
    with pytest.raises(ValueError, match="mode='mean' is unknown"):
        aggregate(jnp.zeros((2, 3)), jnp.ones((2, 3)), "mean")
    with pytest.raises(ValueError, match="needs max_length >= 1"):
        aggregate(jnp.zeros((2, 3)), jnp.ones((2, 3)), "constant_length")


# jit.

JITTABLE = {
    "masked_sum": (masked_sum, lambda: (random_bt(16), MASK)),
    "masked_mean": (masked_mean, lambda: (random_bt(16), MASK)),
    "masked_variance": (masked_variance, lambda: (random_bt(16), MASK)),
    "masked_whiten": (masked_whiten, lambda: (random_bt(16), MASK)),
    "gae_advantages": (gae_advantages, lambda: (random_bt(16), random_bt(17), MASK, 0.99, 0.95)),
    **{
        f"advantage_estimator_{name}": (
            functools.partial(
                lambda rewards, mask, name: ADVANTAGE_ESTIMATORS[name](
                    AdvantageInputs(rewards, mask, 4)
                ),
                name=name,
            ),
            lambda: (random_bt(16, pad_value=0.0)[:, 0], MASK),
        )
        for name in GROUP_ESTIMATORS
    },
    "kl_penalty": (
        functools.partial(kl_penalty, estimator="k3"),
        lambda: (random_bt(16, pad_value=0.0), random_bt(17, pad_value=0.0)),
    ),
    "clipped_policy_loss": (
        functools.partial(clipped_policy_loss, eps_high=0.28, dual_clip=3.0),
        lambda: tuple(random_bt(seed, pad_value=0.0) for seed in (16, 17, 18)),
    ),
    "clipped_value_loss": (
        functools.partial(clipped_value_loss, clip_eps=0.2),
        lambda: tuple(random_bt(seed, pad_value=0.0) for seed in (16, 17, 18)),
    ),
    "aggregate": (
        functools.partial(aggregate, mode="constant_length", max_length=16),
        lambda: (random_bt(16), MASK),
    ),
}


@pytest.mark.parametrize("name", sorted(JITTABLE))
def test_every_function_jits_to_the_eager_result(name):
    fn, make_args = JITTABLE[name]
    args = make_args()
    jax.tree.map(
        functools.partial(np.testing.assert_allclose, rtol=1e-6, atol=1e-6),
        jax.jit(fn)(*args),
        fn(*args),
    )
