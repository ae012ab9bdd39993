"""Per-token estimators of KL(policy || reference) on tokens sampled from the policy.

Shapes: any, typically (B, T) (B rows, T tokens); inputs are log-probabilities of the
sampled tokens, `logp_bt` under the policy that sampled them and `ref_logp_bt` under the
reference. With log r = ref_logp - logp (Schulman, "Approximating KL Divergence", 2020):

    k1 = -log r                  unbiased, high variance, may be negative
    k2 = (log r)^2 / 2           biased, low variance, >= 0
    k3 = (r - 1) - log r         unbiased, low variance, >= 0

Each is exactly 0 where policy == reference. Where these depart from the blog or from
GRPO (Shao 2024):
- k3 is computed as expm1(log r) - log r, so rounding cannot make it negative near r = 1.
- As a *loss* term the estimators have different gradients than as values: in expectation
  over policy samples, grad k1 is 0, grad k2 is grad KL(policy || ref), and grad k3 (the
  GRPO penalty) is grad KL(ref || policy). No log-ratio clamp is applied.
"""

from __future__ import annotations

from typing import Literal

import chex
import jax
import jax.numpy as jnp

KLEstimator = Literal["k1", "k2", "k3"]


def _log_ratio(logp_bt: jax.Array, ref_logp_bt: jax.Array) -> jax.Array:
    chex.assert_equal_shape([logp_bt, ref_logp_bt])
    return ref_logp_bt.astype(jnp.float32) - logp_bt.astype(jnp.float32)


def kl_k1(logp_bt: jax.Array, ref_logp_bt: jax.Array) -> jax.Array:
    """k1 = -log r = logp - ref_logp, float32, same shape."""
    return -_log_ratio(logp_bt, ref_logp_bt)


def kl_k2(logp_bt: jax.Array, ref_logp_bt: jax.Array) -> jax.Array:
    """k2 = (log r)^2 / 2, float32, same shape."""
    return 0.5 * _log_ratio(logp_bt, ref_logp_bt) ** 2


def kl_k3(logp_bt: jax.Array, ref_logp_bt: jax.Array) -> jax.Array:
    """k3 = (r - 1) - log r = expm1(log r) - log r, float32, same shape."""
    log_ratio_bt = _log_ratio(logp_bt, ref_logp_bt)
    return jnp.expm1(log_ratio_bt) - log_ratio_bt


_ESTIMATORS = {"k1": kl_k1, "k2": kl_k2, "k3": kl_k3}


def kl_penalty(logp_bt: jax.Array, ref_logp_bt: jax.Array, estimator: KLEstimator) -> jax.Array:
    """Per-token KL estimate by name: "k1", "k2" or "k3"."""
    if estimator not in _ESTIMATORS:
        raise ValueError(f"estimator={estimator!r} is unknown; use one of {sorted(_ESTIMATORS)}")
    return _ESTIMATORS[estimator](logp_bt, ref_logp_bt)
