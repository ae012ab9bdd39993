"""Masked statistics and advantage estimators by name: GRPO, Dr. GRPO, RLOO, REINFORCE++, GAE.

Shape letters: B rows (sequences), T tokens per row, N completion tokens per row (an
estimator's rows are completions), G groups, K completions per group (B = G * K). A mask
is 1.0 on a real (trained) token and 0.0 on padding; entries the mask drops are selected
away, so padding may hold any value, even NaN, without reaching a result.

An advantage estimator is `fn(AdvantageInputs) -> Advantages`, registered by name in
`ADVANTAGE_ESTIMATORS` (the table at the end, the one list validation reads) and chosen by
`grpo.advantage_estimator`; a script adds its own with `register_advantage_estimator`.

Where these depart from the papers:
- GAE (Schulman 2016) runs over the *real* tokens of a row only: a masked step is skipped
  (the next real token's value and advantage are carried across it and gamma is not spent
  on it), its reward is ignored, and the value after a row's last real token is 0 (the
  response ends the episode; a truncated response is not bootstrapped). Padding anywhere
  in a row therefore changes nothing for its real tokens.
- GRPO (Shao 2024) divides by the group's standard deviation without naming its ddof or
  an epsilon; we follow TRL: the sample std (ddof = 1, as `torch.std`) plus `std_eps`.
- A group whose rewards are all equal gets advantage exactly 0 from grpo, dr_grpo and
  rloo (the paper's formula is 0 / 0 there, and a float32 mean of equal values may miss
  them by an ulp). reinforce_pp whitens afterwards, which moves such a group to
  -mu / sigma of the batch (see `reinforce_pp_advantages`).
- REINFORCE++-baseline (Hu 2025) as OpenRLHF runs it folds the per-token KL penalty into
  the reward before whitening; here the KL stays in the loss (`grpo.beta`), so every
  token of a completion has the same advantage before whitening.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp

from jaxllm.rl.registry import Registry


def masked_sum(values: jax.Array, mask: jax.Array, axis: int | None = None) -> jax.Array:
    """sum(values * mask) over `axis` (all axes when None), float32; any shape."""
    chex.assert_equal_shape([values, mask])
    mask = mask.astype(jnp.float32)
    return jnp.sum(jnp.where(mask > 0, values.astype(jnp.float32) * mask, 0.0), axis=axis)


def _divide_or_zero(numerator: jax.Array, denominator: jax.Array) -> jax.Array:
    """numerator / denominator where denominator > 0, else exactly 0 (never NaN)."""
    positive = denominator > 0
    return jnp.where(positive, numerator / jnp.where(positive, denominator, 1.0), 0.0)


def masked_mean(values: jax.Array, mask: jax.Array, axis: int | None = None) -> jax.Array:
    """sum(values * mask) / sum(mask) over `axis`; 0 where the mask holds no token."""
    return _divide_or_zero(masked_sum(values, mask, axis), jnp.sum(mask.astype(jnp.float32), axis))


def masked_variance(
    values: jax.Array, mask: jax.Array, axis: int | None = None, unbiased: bool = False
) -> jax.Array:
    """Variance over the masked entries along `axis`.

    var = sum(mask * (values - mean)^2) / (n - ddof), n = sum(mask), with ddof = 0 by
    default (the population variance) and ddof = 1 when `unbiased`. 0 where n <= ddof.
    """
    mean = masked_mean(values, mask, axis)
    mean_keepdims = mean if axis is None else jnp.expand_dims(mean, axis)
    squares = masked_sum((values.astype(jnp.float32) - mean_keepdims) ** 2, mask, axis)
    ddof = 1.0 if unbiased else 0.0
    return _divide_or_zero(squares, jnp.sum(mask.astype(jnp.float32), axis) - ddof)


def masked_whiten(
    values: jax.Array, mask: jax.Array, shift_mean: bool = True, eps: float = 1e-8
) -> jax.Array:
    """(values - mean) / sqrt(var + eps) over all masked entries; masked-out entries are 0.

    mean and var (ddof = 0) are taken over every masked entry of the array, so the result
    has masked mean 0 and masked variance 1. `shift_mean=False` adds the mean back:
    only the scale changes.
    """
    mean = masked_mean(values, mask)
    variance = masked_variance(values, mask)
    whitened = (values.astype(jnp.float32) - mean) * jax.lax.rsqrt(variance + eps)
    if not shift_mean:
        whitened = whitened + mean
    return jnp.where(mask > 0, whitened, 0.0)


def gae_advantages(
    rewards_bt: jax.Array,
    values_bt: jax.Array,
    mask_bt: jax.Array,
    gamma: float | jax.Array,
    lam: float | jax.Array,
) -> tuple[jax.Array, jax.Array]:
    """Generalised advantage estimates and returns over the real tokens of each row.

    With n(t) the first real token after t (V_n(t) = A_n(t) = 0 when there is none),
    by a reverse scan over time, at each real token t:

        delta_t = r_t + gamma * V_n(t) - V_t
        A_t     = delta_t + gamma * lam * A_n(t)
        R_t     = A_t + V_t

    Masked steps pass the carried (V, A) through and output A = R = 0. With
    gamma = lam = 1, A_t is the reward-to-go minus V_t; with lam = 0, the one-step TD error.

    Args:
        rewards_bt: (B, T) per-token rewards (read on real tokens only).
        values_bt: (B, T) value estimates V_t.
        mask_bt: (B, T) 1.0 on real tokens.
        gamma: discount; lam: GAE lambda. Scalars, may be traced.
    Returns:
        (advantages_bt, returns_bt), both (B, T) float32, 0 where the mask is 0.
    """
    chex.assert_rank(rewards_bt, 2)
    chex.assert_equal_shape([rewards_bt, values_bt, mask_bt])
    real_bt = mask_bt > 0
    values_bt = values_bt.astype(jnp.float32)

    def backward_step(carry, inputs):
        next_value_b, next_advantage_b = carry
        reward_b, value_b, real_b = inputs
        delta_b = reward_b + gamma * next_value_b - value_b
        advantage_b = delta_b + gamma * lam * next_advantage_b
        carry = (
            jnp.where(real_b, value_b, next_value_b),
            jnp.where(real_b, advantage_b, next_advantage_b),
        )
        return carry, jnp.where(real_b, advantage_b, 0.0)

    zeros_b = jnp.zeros(rewards_bt.shape[:1], jnp.float32)
    time_major = (rewards_bt.astype(jnp.float32).T, values_bt.T, real_bt.T)  # each (T, B)
    _, advantages_tb = jax.lax.scan(backward_step, (zeros_b, zeros_b), time_major, reverse=True)
    advantages_bt = advantages_tb.T
    return advantages_bt, jnp.where(real_bt, advantages_bt + values_bt, 0.0)


@dataclasses.dataclass(frozen=True)
class AdvantageInputs:
    """What an advantage estimator reads: consecutive `group_size` rows complete one prompt."""

    rewards_b: jax.Array  # (B,) float32 reward of each completion, B = G * K
    mask_bn: jax.Array  # (B, N) 1.0 on the completion tokens that are trained
    group_size: int  # K
    std_eps: float = 1e-4  # added to a std before dividing by it (TRL's 1e-4)
    token_rewards_bn: jax.Array | None = None  # (B, N) per-token rewards (gae)
    values_bn: jax.Array | None = None  # (B, N) the critic's value of each token (gae)
    gamma: float | jax.Array = 1.0  # gae's discount
    lam: float | jax.Array = 1.0  # gae's lambda


class Advantages(NamedTuple):
    advantages_bn: jax.Array  # (B, N) float32, 0 where mask_bn is 0
    returns_bn: jax.Array | None = None  # (B, N) the critic's targets, where there is one


AdvantageEstimator = Callable[[AdvantageInputs], Advantages]


def centered_groups(inputs: AdvantageInputs) -> jax.Array:
    """(G, K) float32: each reward minus the mean of its group, exactly 0 for a group
    whose rewards are all equal."""
    rewards_b, k = inputs.rewards_b, inputs.group_size
    chex.assert_rank(rewards_b, 1)
    if k < 1 or rewards_b.shape[0] % k:
        raise ValueError(f"group_size={k} must be >= 1 and divide the {rewards_b.shape[0]} rewards")
    rewards_gk = rewards_b.astype(jnp.float32).reshape(-1, k)
    all_equal_g1 = jnp.max(rewards_gk, axis=1, keepdims=True) == jnp.min(
        rewards_gk, axis=1, keepdims=True
    )
    return jnp.where(all_equal_g1, 0.0, rewards_gk - jnp.mean(rewards_gk, axis=1, keepdims=True))


def per_token(advantages_gk: jax.Array, mask_bn: jax.Array) -> Advantages:
    """One advantage per completion, at each of its tokens; 0 where the mask is 0."""
    chex.assert_shape(mask_bn, (advantages_gk.size, None))
    return Advantages(jnp.where(mask_bn > 0, advantages_gk.reshape(-1, 1), 0.0))


def grpo_advantages(inputs: AdvantageInputs) -> Advantages:
    """GRPO (Shao 2024) in TRL's form, for reward r_i in group g:

        A_i   = (r_i - mean_g) / (std_g + std_eps)
        std_g = sqrt(sum_g (r - mean_g)^2 / (K - 1))

    std_g is the sample std (ddof 1, as `torch.std`).
    """
    centered_gk = centered_groups(inputs)
    variance_g1 = jnp.sum(centered_gk**2, axis=1, keepdims=True) / max(inputs.group_size - 1, 1)
    scaled_gk = _divide_or_zero(centered_gk, jnp.sqrt(variance_g1) + inputs.std_eps)
    return per_token(scaled_gk, inputs.mask_bn)


def dr_grpo_advantages(inputs: AdvantageInputs) -> Advantages:
    """Dr. GRPO (Liu 2025): GRPO without the division by the std, A_i = r_i - mean_g."""
    return per_token(centered_groups(inputs), inputs.mask_bn)


def rloo_advantages(inputs: AdvantageInputs) -> Advantages:
    """RLOO (Ahmadian 2024): a completion's baseline is the mean reward of the K - 1 other
    completions of its prompt,

        A_i = r_i - sum_{j != i} r_j / (K - 1) = K / (K - 1) * (r_i - mean_g)

    and nothing rescales it afterwards (TRL's RLOO default, `normalize_advantages=False`).
    """
    k = inputs.group_size
    if k < 2:
        raise ValueError(f"rloo needs group_size >= 2 (a baseline of the others), got {k}")
    return per_token(centered_groups(inputs) * (k / (k - 1)), inputs.mask_bn)


def reinforce_pp_advantages(inputs: AdvantageInputs) -> Advantages:
    """REINFORCE++-baseline (Hu 2025; OpenRLHF's `reinforce_baseline`): the group mean is
    subtracted, then the result is whitened over every trained token of the batch,

        a_i  = r_i - mean_g                           at each token of completion i
        A_it = (a_i - mu) / sqrt(var + 1e-8)          mu, var (ddof 0) over the mask's tokens

    so a long completion weighs more in mu and var than a short one, and padding or a
    completion the mask leaves out counts nowhere. A group of equal rewards has a_i = 0
    and so A_it = -mu / sqrt(var + 1e-8), not 0: `grpo.dynamic_sampling` leaves such
    groups out of the mask, hence out of mu and var too.
    """
    centered_bn = per_token(centered_groups(inputs), inputs.mask_bn).advantages_bn
    return Advantages(masked_whiten(centered_bn, inputs.mask_bn))


def gae_estimate(inputs: AdvantageInputs) -> Advantages:
    """PPO's `gae_advantages` (see there) on `token_rewards_bn` and the critic's
    `values_bn`, with `gamma` and `lam`: advantages and returns."""
    if inputs.token_rewards_bn is None or inputs.values_bn is None:
        raise ValueError("the gae advantage estimator needs token_rewards_bn and values_bn")
    return Advantages(
        *gae_advantages(
            inputs.token_rewards_bn, inputs.values_bn, inputs.mask_bn, inputs.gamma, inputs.lam
        )
    )


ADVANTAGE_ESTIMATORS: Registry[AdvantageEstimator] = Registry(
    "advantage estimator",
    "register_advantage_estimator(name, fn) in your script",
    {
        "grpo": grpo_advantages,
        "dr_grpo": dr_grpo_advantages,
        "rloo": rloo_advantages,
        "reinforce_pp": reinforce_pp_advantages,
        "gae": gae_estimate,
    },
)
CRITIC_ESTIMATORS = ("gae",)  # they read values_bn: PPO's, not GRPO's


def register_advantage_estimator(name: str, fn: AdvantageEstimator) -> None:
    """Make `fn(AdvantageInputs) -> Advantages` available as `grpo.advantage_estimator=<name>`
    (an experiment script calls this before the stage starts)."""
    ADVANTAGE_ESTIMATORS.register(name, fn)
