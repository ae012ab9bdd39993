"""Attention with backends chosen by config, causal masking and packed-sequence segment ids.

Backends: `xla` (everywhere) and `cudnn` (NVIDIA GPUs), both through
`jax.nn.dot_product_attention`, which also handles grouped-query attention (fewer kv heads).

Segment ids mark which document a token belongs to (0 is padding). A query attends only
to keys of its own segment, on every backend, so packed documents never see each other.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def segment_mask(q_segment_ids_bt: jax.Array, kv_segment_ids_bs: jax.Array) -> jax.Array:
    """(B, 1, T, S) boolean mask: True where query and key share a segment."""
    return q_segment_ids_bt[:, None, :, None] == kv_segment_ids_bs[:, None, None, :]


def rotary_embedding(x_btnh: jax.Array, positions_bt: jax.Array, theta: float) -> jax.Array:
    """Rotate pairs (x[i], x[i + H/2]) by position-dependent angles (Llama's convention)."""
    head_dim = x_btnh.shape[-1]
    inverse_frequencies_h = theta ** (-jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
    angles_bth = positions_bt[..., None].astype(jnp.float32) * inverse_frequencies_h
    sin_bt1h, cos_bt1h = jnp.sin(angles_bth)[:, :, None, :], jnp.cos(angles_bth)[:, :, None, :]
    x1, x2 = jnp.split(x_btnh.astype(jnp.float32), 2, axis=-1)
    rotated = jnp.concatenate([x1 * cos_bt1h - x2 * sin_bt1h, x2 * cos_bt1h + x1 * sin_bt1h], -1)
    return rotated.astype(x_btnh.dtype)


def dot_product_attention(
    q_btnh: jax.Array,
    k_bskh: jax.Array,
    v_bskh: jax.Array,
    q_segment_ids_bt: jax.Array,
    kv_segment_ids_bs: jax.Array,
    *,
    backend: str = "xla",
    is_causal: bool = True,
) -> jax.Array:
    """Softmax attention of queries over keys of the same segment; returns (B, T, N, H).

    N query heads share K key/value heads (N % K == 0). With `is_causal`, query t sees
    keys s <= t, which within a packed row is also causal per document.
    """
    if backend not in ("xla", "cudnn"):
        raise ValueError(f"unknown attention backend '{backend}'; use 'xla' or 'cudnn'")
    mask = segment_mask(q_segment_ids_bt, kv_segment_ids_bs)
    return jax.nn.dot_product_attention(
        q_btnh, k_bskh, v_bskh, mask=mask, is_causal=is_causal, implementation=backend
    )
