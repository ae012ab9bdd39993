"""Per-token clipped policy and value losses, and their aggregation into (sum, denominator).

Shape letters: B rows (sequences), T tokens per row. Losses are per token; `aggregate`
reduces them over a mask to a sum and a denominator, which callers add up over every
micro-batch and device and divide once, so the loss is the same however a batch is split.

Where these depart from the papers:
- PPO (Schulman 2017) clips the ratio symmetrically at 1 +- eps; we take `eps_low` and
  `eps_high` apart (DAPO's clip-higher, Yu 2025, e.g. 0.2 and 0.28).
- Dual-clip PPO (Ye 2020): for A < 0 the loss is further capped at -A * c, c > 1, so a
  token whose ratio exploded cannot dominate the update. Off unless `dual_clip` is given.
- The PPO paper's value loss is a plain squared error; `clipped_value_loss` is the clipped
  form of OpenAI's baselines PPO2 implementation.
- GSPO (Zheng 2025) takes one importance ratio per sequence, the geometric mean of its
  tokens' ratios, and clips whole sequences: `sequence_log_ratios` gives
  `clipped_policy_loss` that ratio at every token (the GSPO-token form).
- Aggregation: GRPO (Shao 2024) averages within each sequence, then over sequences
  (`sequence_mean`); DAPO averages over all tokens of the batch (`token_mean`); Dr. GRPO
  (Liu 2025) divides the token sum by num_sequences * a fixed max completion length
  (`constant_length`). A row with no masked token is batch padding and is not counted.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import chex
import jax
import jax.numpy as jnp

from jaxllm.rl.advantages import masked_sum
from jaxllm.rl.kl import kl_k3

AggregationMode = Literal["token_mean", "sequence_mean", "constant_length"]
AGGREGATION_MODES = ("token_mean", "sequence_mean", "constant_length")


class PolicyLossTerms(NamedTuple):
    loss_bt: jax.Array  # (B, T) float32 per-token loss
    clipped_bt: jax.Array  # (B, T) 1.0 where the ratio clip is active (zero gradient)
    dual_clipped_bt: jax.Array  # (B, T) 1.0 where the dual-clip cap is active (zero gradient)
    approx_kl_bt: jax.Array  # (B, T) k3 estimate of KL(old || new) on the sampled tokens


class ValueLossTerms(NamedTuple):
    loss_bt: jax.Array  # (B, T) float32 per-token loss
    clipped_bt: jax.Array  # (B, T) 1.0 where the clipped term is the larger (zero gradient)


def clipped_policy_loss(
    logp_bt: jax.Array,
    old_logp_bt: jax.Array,
    advantages_bt: jax.Array,
    *,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    dual_clip: float | None = None,
) -> PolicyLossTerms:
    """PPO's clipped surrogate per token, with asymmetric bounds and optional dual clip.

        ratio = exp(logp - old_logp)
        loss  = max(-A * ratio, -A * clip(ratio, 1 - eps_low, 1 + eps_high))
        loss  = min(loss, -A * dual_clip)        for A < 0, when dual_clip is given

    Where the two terms of the max are equal the unclipped one is taken, so at ratio 1
    d loss / d logp = -A. A ratio that overflows float32 (log ratio > 88) has no finite
    gradient; feed log-probabilities from one function so on-policy ratios are exactly 1.

    Args:
        logp_bt: (B, T) log-probs of the sampled tokens under the policy being trained.
        old_logp_bt: (B, T) log-probs under the policy that sampled them.
        advantages_bt: (B, T) advantages A.
    Returns:
        PolicyLossTerms of (B, T) float32 arrays.
    """
    chex.assert_equal_shape([logp_bt, old_logp_bt, advantages_bt])
    if dual_clip is not None and dual_clip <= 1.0:
        raise ValueError(f"dual_clip={dual_clip} must be > 1 (Ye 2020 uses 3), or None")
    advantages_bt = advantages_bt.astype(jnp.float32)
    ratio_bt = jnp.exp(logp_bt.astype(jnp.float32) - old_logp_bt.astype(jnp.float32))
    unclipped_bt = -advantages_bt * ratio_bt
    clipped_term_bt = -advantages_bt * jnp.clip(ratio_bt, 1.0 - eps_low, 1.0 + eps_high)
    clipped_bt = clipped_term_bt > unclipped_bt
    loss_bt = jnp.where(clipped_bt, clipped_term_bt, unclipped_bt)
    dual_clipped_bt = jnp.zeros_like(clipped_bt)
    if dual_clip is not None:
        cap_bt = -advantages_bt * dual_clip
        dual_clipped_bt = (advantages_bt < 0) & (loss_bt > cap_bt)
        loss_bt = jnp.where(dual_clipped_bt, cap_bt, loss_bt)
    return PolicyLossTerms(
        loss_bt=loss_bt,
        clipped_bt=clipped_bt.astype(jnp.float32),
        dual_clipped_bt=dual_clipped_bt.astype(jnp.float32),
        approx_kl_bt=kl_k3(old_logp_bt, logp_bt),
    )


def sequence_log_ratios(
    logp_bt: jax.Array, old_logp_bt: jax.Array, mask_bt: jax.Array
) -> jax.Array:
    """GSPO's sequence-level log-ratio at every token, for `clipped_policy_loss` (as its
    `logp_bt`, with zeros as `old_logp_bt`).

        log s_b  = sum_t m_bt (logp_bt - old_bt) / n_b          (n_b = sum_t m_bt, >= 1)
        out_bt   = sg(log s_b) + logp_bt - sg(logp_bt)

    Every token of row b has the value log s_b, the reply's length-normalised likelihood
    ratio (bitwise the same at each token, so the clip keeps or drops a whole reply), and
    the gradient of exp(out_bt) is s_b grad log pi_bt (`sg`: stop_gradient). With one
    advantage per reply and `sequence_mean` aggregation, loss and gradient are GSPO's
    sequence objective; `token_mean` and `constant_length` weigh replies by their length.
    On-policy (logp = old) every ratio is exactly 1. Padding tokens count nowhere.

    Args:
        logp_bt, old_logp_bt: (B, T) log-probs of the sampled tokens, new and old policy.
        mask_bt: (B, T) 1 on the reply's tokens.
    Returns:
        (B, T) float32.
    """
    chex.assert_equal_shape([logp_bt, old_logp_bt, mask_bt])
    logp_bt = logp_bt.astype(jnp.float32)
    tokens_b = jnp.maximum(jnp.sum(mask_bt.astype(jnp.float32), axis=1), 1.0)
    log_s_b = masked_sum(logp_bt - old_logp_bt.astype(jnp.float32), mask_bt, axis=1) / tokens_b
    sg = jax.lax.stop_gradient
    return sg(log_s_b)[:, None] + (logp_bt - sg(logp_bt))


def clipped_value_loss(
    values_bt: jax.Array, old_values_bt: jax.Array, returns_bt: jax.Array, *, clip_eps: float
) -> ValueLossTerms:
    """Clipped value loss per token (PPO2):

        loss = 0.5 * max((V - R)^2, (clip(V, V_old - clip_eps, V_old + clip_eps) - R)^2)

    Args:
        values_bt: (B, T) values V under the model being trained.
        old_values_bt: (B, T) values V_old when the rollout was scored.
        returns_bt: (B, T) return targets R.
    Returns:
        ValueLossTerms of (B, T) float32 arrays.
    """
    chex.assert_equal_shape([values_bt, old_values_bt, returns_bt])
    values_bt = values_bt.astype(jnp.float32)
    old_values_bt = old_values_bt.astype(jnp.float32)
    returns_bt = returns_bt.astype(jnp.float32)
    unclipped_bt = (values_bt - returns_bt) ** 2
    clipped_values_bt = jnp.clip(values_bt, old_values_bt - clip_eps, old_values_bt + clip_eps)
    clipped_term_bt = (clipped_values_bt - returns_bt) ** 2
    clipped_bt = clipped_term_bt > unclipped_bt
    return ValueLossTerms(
        loss_bt=0.5 * jnp.where(clipped_bt, clipped_term_bt, unclipped_bt),
        clipped_bt=clipped_bt.astype(jnp.float32),
    )


def aggregate(
    loss_bt: jax.Array, mask_bt: jax.Array, mode: AggregationMode, max_length: int | None = None
) -> tuple[jax.Array, jax.Array]:
    """(sum, denominator) of masked per-token losses, float32 scalars; loss = sum / denominator.

    Sums and denominators of micro-batches add up to those of the whole batch, so
    dividing the totals once gives the full-batch loss exactly. With n_b = sum_t m_bt the
    tokens of row b and S = {b : n_b > 0} the rows with a token:

        token_mean:       sum_bt m_bt l_bt               / sum_b n_b
        sequence_mean:    sum_{b in S} (sum_t m_bt l_bt / n_b) / |S|
        constant_length:  sum_bt m_bt l_bt               / (|S| * max_length)

    `max_length` (constant_length only) is the configured maximum completion length, a
    constant: not the longest row of this batch.
    """
    chex.assert_rank(loss_bt, 2)
    chex.assert_equal_shape([loss_bt, mask_bt])
    if mode not in AGGREGATION_MODES:
        raise ValueError(f"mode={mode!r} is unknown; use one of {AGGREGATION_MODES}")
    if mode == "constant_length" and (max_length is None or max_length < 1):
        raise ValueError(
            f"mode='constant_length' needs max_length >= 1 (got {max_length}): set it to the "
            "configured maximum completion length"
        )
    row_sum_b = masked_sum(loss_bt, mask_bt, axis=1)
    row_tokens_b = jnp.sum(mask_bt.astype(jnp.float32), axis=1)
    has_tokens_b = row_tokens_b > 0
    num_sequences = jnp.sum(has_tokens_b.astype(jnp.float32))
    if mode == "token_mean":
        return jnp.sum(row_sum_b), jnp.sum(row_tokens_b)
    if mode == "sequence_mean":
        row_mean_b = row_sum_b / jnp.where(has_tokens_b, row_tokens_b, 1.0)
        return jnp.sum(row_mean_b), num_sequences
    return jnp.sum(row_sum_b), num_sequences * max_length
