"""Masked statistics and advantage estimators: whitening, GAE and group-relative advantages.

Shape letters: B rows (sequences), T tokens per row, G groups, K completions per group
(B = G * K). A mask is 1.0 on a real (trained) token and 0.0 on padding; entries the mask
drops are selected away, so padding may hold any value, even NaN, without reaching a result.

Where these depart from the papers:
- GAE (Schulman 2016) runs over the *real* tokens of a row only: a masked step is skipped
  (the next real token's value and advantage are carried across it and gamma is not spent
  on it), its reward is ignored, and the value after a row's last real token is 0 (the
  response ends the episode; a truncated response is not bootstrapped). Padding anywhere
  in a row therefore changes nothing for its real tokens.
- GRPO (Shao 2024) divides by the group's standard deviation without naming its ddof; we
  default to ddof=1 (the sample std, as `torch.std` computes it) and floor the std at
  `eps` instead of adding `eps`, so a group with any spread is normalised exactly.
- A group whose rewards are all equal gets advantage exactly 0 in both modes (the paper's
  formula is 0 / 0 there, and a float32 mean of equal values may miss them by an ulp).
- Dr. GRPO (Liu 2025) drops the std division: `normalize_std=False`.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp


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


def group_advantages(
    rewards_b: jax.Array,
    group_size: int,
    *,
    normalize_std: bool = True,
    ddof: int = 1,
    eps: float = 1e-6,
) -> jax.Array:
    """Group-relative advantages (GRPO; Dr. GRPO with `normalize_std=False`).

    Consecutive rows form a group of `group_size` completions of one prompt. For reward
    r_i in group g:

        A_i = (r_i - mean_g) / max(std_g, eps)    if normalize_std
        A_i =  r_i - mean_g                       otherwise

    std_g = sqrt(sum_g (r - mean_g)^2 / (K - ddof)), ddof = 1 by default. A group whose
    rewards are all equal gets exactly 0.

    Args:
        rewards_b: (B,) scalar reward per completion, B = G * group_size.
    Returns:
        (B,) float32 advantages.
    """
    chex.assert_rank(rewards_b, 1)
    if group_size < 1 or rewards_b.shape[0] % group_size:
        raise ValueError(
            f"group_size={group_size} must be >= 1 and divide the {rewards_b.shape[0]} rewards"
        )
    rewards_gk = rewards_b.astype(jnp.float32).reshape(-1, group_size)
    centered_gk = rewards_gk - jnp.mean(rewards_gk, axis=1, keepdims=True)
    if normalize_std:
        variance_g1 = jnp.sum(centered_gk**2, axis=1, keepdims=True) / max(group_size - ddof, 1)
        centered_gk = centered_gk / jnp.maximum(jnp.sqrt(variance_g1), eps)
    all_equal_g1 = jnp.max(rewards_gk, axis=1, keepdims=True) == jnp.min(
        rewards_gk, axis=1, keepdims=True
    )
    return jnp.where(all_equal_g1, 0.0, centered_gk).reshape(-1)
