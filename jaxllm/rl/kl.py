"""Per-token estimators of KL(policy || reference) on tokens sampled from the policy.

Shapes: any, typically (B, T) (B rows, T tokens); inputs are log-probabilities of the
sampled tokens, `logp_bt` under the policy that sampled them and `ref_logp_bt` under the
reference. With log r = ref_logp - logp (Schulman, "Approximating KL Divergence", 2020):

    k1 = -log r                  unbiased, high variance, may be negative
    k2 = (log r)^2 / 2           biased, low variance, >= 0
    k3 = (r - 1) - log r         unbiased, low variance, >= 0

Each is exactly 0 where policy == reference. They are registered by name in `KL_ESTIMATORS`
(the one list validation reads; `grpo.kl_estimator` picks the loss's), and a script adds
its own with `register_kl_estimator(name, fn)`. Where these depart from the blog or from
GRPO (Shao 2024):
- k3 is computed as expm1(log r) - log r, so rounding cannot make it negative near r = 1.
- As a *loss* term the estimators have different gradients than as values: in expectation
  over policy samples, grad k1 is 0, grad k2 is grad KL(policy || ref), and grad k3 (the
  GRPO penalty) is grad KL(ref || policy). No log-ratio clamp is applied.
"""

from __future__ import annotations

from collections.abc import Callable

import chex
import jax
import jax.numpy as jnp

from jaxllm.rl.registry import Registry

KLEstimator = Callable[[jax.Array, jax.Array], jax.Array]  # (logp_bt, ref_logp_bt) -> kl_bt


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


KL_ESTIMATORS: Registry[KLEstimator] = Registry(
    "KL estimator",
    "register_kl_estimator(name, fn) in your script",
    {"k1": kl_k1, "k2": kl_k2, "k3": kl_k3},
)


def register_kl_estimator(name: str, fn: KLEstimator) -> None:
    """Make `fn(logp_bt, ref_logp_bt) -> kl_bt` available as `grpo.kl_estimator=<name>`."""
    KL_ESTIMATORS.register(name, fn)


def kl_penalty(logp_bt: jax.Array, ref_logp_bt: jax.Array, estimator: str) -> jax.Array:
    """Per-token KL estimate by the registered name `estimator` ("k1", "k2", "k3", ...)."""
    return KL_ESTIMATORS[estimator](logp_bt, ref_logp_bt)
