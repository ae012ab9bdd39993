"""Attention against a float64 NumPy reference: causal, segments, grouped kv heads."""

import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm.attention import (
    dot_product_attention,
    rotary_inverse_frequencies,
    rotary_tables,
    segment_mask,
)


def reference_attention(q, k, v, segments):
    """Float64 loops: query t of head n sees keys s <= t of its own segment."""
    b, t, n, h = q.shape
    group = n // k.shape[2]
    out = np.zeros((b, t, n, h))
    for bi in range(b):
        for ni in range(n):
            for ti in range(t):
                keys = [s for s in range(ti + 1) if segments[bi, s] == segments[bi, ti]]
                scores = np.array([q[bi, ti, ni] @ k[bi, s, ni // group] for s in keys]) / h**0.5
                weights = np.exp(scores - scores.max())
                weights /= weights.sum()
                out[bi, ti, ni] = sum(
                    w * v[bi, s, ni // group] for w, s in zip(weights, keys, strict=True)
                )
    return out


@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_xla_attention_matches_float64_reference(kv_heads):
    rng = np.random.default_rng(kv_heads)
    q = rng.standard_normal((2, 9, 4, 8))
    k = rng.standard_normal((2, 9, kv_heads, 8))
    v = rng.standard_normal((2, 9, kv_heads, 8))
    segments = np.array([[1, 1, 1, 2, 2, 2, 2, 0, 0], [5, 5, 5, 5, 5, 5, 5, 5, 5]])
    out = dot_product_attention(
        jnp.asarray(q, jnp.float32),
        jnp.asarray(k, jnp.float32),
        jnp.asarray(v, jnp.float32),
        segment_mask(jnp.asarray(segments), jnp.asarray(segments)),
        backend="xla",
    )
    np.testing.assert_allclose(out, reference_attention(q, k, v, segments), rtol=1e-5, atol=1e-5)


def test_unknown_backend_is_refused():
    x = jnp.zeros((1, 2, 1, 4))
    with pytest.raises(ValueError, match="unknown attention backend 'flash'"):
        dot_product_attention(x, x, x, jnp.ones((1, 1, 2, 2), bool), backend="flash")


def test_rotary_tables_looked_up_equal_the_tables_computed_per_token():
    frequencies = rotary_inverse_frequencies(16, 10_000.0)
    positions_bt = jnp.asarray([[0, 1, 2, 63], [7, 7, 30, 5]])
    computed = rotary_tables(positions_bt, frequencies)
    looked_up = rotary_tables(positions_bt, frequencies, num_positions=64)
    for a, b in zip(computed, looked_up, strict=True):
        assert a.shape == b.shape == (2, 4, 1, 8)
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
