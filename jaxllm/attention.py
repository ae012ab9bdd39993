"""Attention with backends chosen by config, causal masking and packed-sequence segment ids.

Backends: `xla` (everywhere) and `cudnn` (NVIDIA GPUs), both through
`jax.nn.dot_product_attention`, which also handles grouped-query attention (fewer kv heads).

Segment ids mark which document a token belongs to (0 is padding). A query attends only
to keys of its own segment, on every backend, so packed documents never see each other;
prefix segment ids let several segments of a row also attend to one shared prefix (a
prompt held once for all its replies).
A sliding-window layer also hides keys `window` or more positions back (`window_mask`).

Rows whose keys are near their queries (prompts each followed by their replies, end to
end) can say so with `KeyBounds`: every key a query may see lies in the P columns from its
prompt's first or within the C columns ending at its own. `banded_mask` then describes the
visible keys block by block, and the XLA backend computes each block of C queries against
P + 2C keys instead of all T: (T/C)(C)(P + 2C) scores instead of T^2, the same result.

`decode_attention` serves one new token per row against a KV cache: it reads the cache in
chunks of slots, only up to the last filled one, with an online softmax (flash-decoding).

Shape letters: B batch, T queries, S keys (cache slots), C slots of one chunk, N query
heads, K kv heads, G = N / K query heads per kv head, H head dim, L layers.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct


def segment_mask(
    q_segment_ids_bt: jax.Array,
    kv_segment_ids_bs: jax.Array,
    q_prefix_segment_ids_bt: jax.Array | None = None,
) -> jax.Array:
    """(B, 1, T, S) boolean mask: True where query and key share a segment, or where the
    key's segment is the query's shared prefix (`q_prefix_segment_ids_bt`, > 0: several
    segments that continue one prompt attend to it, held once in the row)."""
    mask = q_segment_ids_bt[:, None, :, None] == kv_segment_ids_bs[:, None, None, :]
    if q_prefix_segment_ids_bt is None:
        return mask
    prefix_b1t1 = q_prefix_segment_ids_bt[:, None, :, None]
    return mask | ((prefix_b1t1 == kv_segment_ids_bs[:, None, None, :]) & (prefix_b1t1 > 0))


@dataclasses.dataclass(frozen=True)
class KeyBounds:
    """Where a row's visible keys lie (static). A row is laid out in groups: a segment with
    no prefix segment (a prompt), then the segments that name it as their prefix (its
    replies), up to the next such segment. Every key a query may see is among the
    `prefix_columns` columns from the first of its group's, or is one of the
    `recent_columns` columns ending at the query's own. A prompt packed before its replies
    (`rl.rollouts.group_rows`: one group, or several end to end) satisfies it with the
    longest prompt's columns and the longest reply's. Rows that break it get other results
    at the queries that see further (padding's, which no loss reads, may)."""

    prefix_columns: int
    recent_columns: int

    def blocks(self, columns: int) -> tuple[int, int, int]:
        """(J, C, P) of a row of `columns`: J blocks of C queries, each reading the P
        columns from its first query's group's first, and the two blocks ending at its own
        (P <= columns)."""
        c = self.recent_columns
        return -(-columns // c), c, min(self.prefix_columns, columns)

    def pays(self, columns: int) -> bool:
        """Whether the blocks score fewer query-key pairs than the whole row: J C (P + 2C)
        against T^2, with a quarter to spare for the blocks' extra copies."""
        j, c, p = self.blocks(columns)
        return j * c * (p + 2 * c) < 0.75 * columns * columns

    def keys_seen(self, columns: int) -> int:
        """The keys each query is scored against in a row of `columns`: P + 2C where the
        blocks pay, else the whole row."""
        j, c, p = self.blocks(columns)
        return p + 2 * c if self.pays(columns) else columns


@struct.dataclass
class BandedMask:
    """`segment_mask` (and causality, and a window) of rows that keep their `KeyBounds`,
    block by block: block j's C queries (columns jC .. jC + C - 1 of the row padded to J C)
    against S = P + 2C key columns, the P from the first column of the group of the
    block's first query, then the 2C columns (j - 1)C .. jC + C - 1 less those among the
    P (so no key counts twice). Columns before 0 or past the row are never visible, nor
    are any keys to queries past the row."""

    key_columns_bjs: jax.Array  # (B, J, S) int32, each block's key columns (maybe outside)
    visible_bjcs: jax.Array  # (B, J, C, S) bool


def banded_mask(
    segment_ids_bt: jax.Array,
    prefix_segment_ids_bt: jax.Array | None,
    places_bt: jax.Array,
    bounds: KeyBounds,
    window: int | None = None,
) -> BandedMask:
    """The causal `segment_mask` of rows within `bounds` as a `BandedMask`; with `window`,
    also `window_mask` by `places_bt` (positions). A group starts at each run of a segment
    that has no prefix (every segment's run, without prefix ids)."""
    b, t = segment_ids_bt.shape
    j, c, p = bounds.blocks(t)
    columns_t = jnp.arange(t)
    starts_run_bt = jnp.concatenate(
        [jnp.ones((b, 1), bool), segment_ids_bt[:, 1:] != segment_ids_bt[:, :-1]], axis=1
    )
    if prefix_segment_ids_bt is not None:
        starts_run_bt &= prefix_segment_ids_bt == 0
    group_start_bt = jax.lax.cummax(jnp.where(starts_run_bt, columns_t, 0), axis=1)
    first_bj = group_start_bt[:, ::c]  # (B, J): the group start of each block's first query
    recent_js = (jnp.arange(j) * c - c)[:, None] + jnp.arange(2 * c)
    prefix_bjs = first_bj[:, :, None] + jnp.arange(p)
    key_columns_bjs = jnp.concatenate(
        [prefix_bjs, jnp.broadcast_to(recent_js, (b, j, 2 * c))], axis=2
    )

    def at_keys(x_bt, fill):  # (B, J, S): x at each block's key columns, `fill` outside
        padded_bt = jnp.pad(x_bt, ((0, 0), (c, j * c + p - t)), constant_values=fill)
        return jnp.take_along_axis(padded_bt, (key_columns_bjs + c).reshape(b, -1), axis=1).reshape(
            b, j, -1
        )[:, :, None, :]

    def at_queries(x_bt, fill):  # (B, J, C, 1)
        padded_bt = jnp.pad(x_bt, ((0, 0), (0, j * c - t)), constant_values=fill)
        return padded_bt.reshape(b, j, c)[..., None]

    segment_q, segment_k = at_queries(segment_ids_bt, -1), at_keys(segment_ids_bt, -2)
    column_q = at_queries(jnp.broadcast_to(columns_t, (b, t)), t)
    column_k = key_columns_bjs[:, :, None, :]
    visible = (segment_q == segment_k) & (column_k <= column_q) & (column_q < t)
    if prefix_segment_ids_bt is not None:
        prefix_q = at_queries(prefix_segment_ids_bt, 0)
        visible |= (prefix_q == segment_k) & (prefix_q > 0)
    if window is not None:
        visible &= at_keys(places_bt, 0) > at_queries(places_bt, 0) - window
    inside = (column_k >= 0) & (column_k < t) & (column_k <= column_q)
    # A recent key among the block's P prefix columns is read there, not twice.
    first_b1 = first_bj[:, :, None, None]
    repeated = (jnp.arange(p + 2 * c) >= p) & (column_k >= first_b1) & (column_k < first_b1 + p)
    return BandedMask(key_columns_bjs, visible & inside & ~repeated)


def window_mask(query_places_bt: jax.Array, key_places_bs: jax.Array, window: int) -> jax.Array:
    """(B, 1, T, S) boolean mask of a sliding-window layer: key s is visible from query t
    when place t - place s < `window` (transformers' rule; causality is masked apart).
    Places are positions in a row (where a shared prompt and its replies sit apart) or
    cache slots (contiguous from a row's first token); B may be 1 for all rows."""
    return (key_places_bs[:, None, :] > query_places_bt[:, :, None] - window)[:, None]


def rotary_inverse_frequencies(head_dim: int, theta: float, scaling=None) -> tuple[float, ...]:
    """The H/2 rotation speeds theta^(-2i/H), i < H/2, as Python floats (static config).

    `scaling` (a `ModelConfig`, or None) applies its `rope_scaling`: "linear" divides every
    frequency by the factor s; "llama3" applies Llama 3.1's long-context rule: with
    wavelength w = 2pi/f and the original context C, frequencies with w < C/high_freq_factor
    stay, those with w > C/low_freq_factor become f/s, and between the two f is blended as
    (1-a) f/s + a f, a = (C/w - low)/(high - low).
    """
    exponents = np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)
    frequencies = (np.float32(1.0) / np.float32(theta) ** exponents).astype(np.float32)
    if scaling is not None and scaling.rope_scaling == "linear":
        frequencies = (frequencies / np.float32(scaling.rope_scaling_factor)).astype(np.float32)
    if scaling is not None and scaling.rope_scaling == "llama3":
        factor, context = scaling.rope_scaling_factor, scaling.rope_original_max_len
        low, high = scaling.rope_low_freq_factor, scaling.rope_high_freq_factor
        wavelengths = 2 * math.pi / frequencies
        blend = (context / wavelengths - low) / (high - low)
        scaled = np.where(wavelengths > context / low, frequencies / factor, frequencies)
        smoothed = (1 - blend) * scaled / factor + blend * scaled
        between = (wavelengths >= context / high) & (wavelengths <= context / low)
        frequencies = np.where(between, smoothed, scaled).astype(np.float32)
    return tuple(float(f) for f in frequencies)


def rotary_tables(
    positions_bt: jax.Array, inverse_frequencies: Sequence[float], num_positions: int = 0
) -> tuple[jax.Array, ...]:
    """(sin, cos), each (B, T, 1, H/2): the rotation angles of each position (position x
    each of `rotary_inverse_frequencies`), computed once per forward pass and shared by
    every layer.

    With `num_positions` (> every position; one at or past it reads NaN), sin and cos are
    computed once for positions 0 .. num_positions - 1 and each token's row is looked up.
    The values are the same, but XLA cannot fuse the lookup's sin and cos into their
    consumers (the rotation of q and k in every layer), where it evaluates them again for
    every element: on the CPU that cost a decode step of the shakespeare model at batch 128
    a tenth of its time."""
    inverse_frequencies_h = jnp.asarray(inverse_frequencies, jnp.float32)
    if num_positions:
        angles_ph = jnp.arange(num_positions, dtype=jnp.float32)[:, None] * inverse_frequencies_h
        tables = (jnp.sin(angles_ph), jnp.cos(angles_ph))
        return tuple(jnp.take(x_ph, positions_bt, axis=0)[:, :, None, :] for x_ph in tables)
    angles_bth = positions_bt[..., None].astype(jnp.float32) * inverse_frequencies_h
    return jnp.sin(angles_bth)[:, :, None, :], jnp.cos(angles_bth)[:, :, None, :]


def apply_rotary(x_btnh: jax.Array, sin_cos: tuple[jax.Array, jax.Array]) -> jax.Array:
    """Rotate pairs (x[i], x[i + H/2]) by the position's angles (Llama's convention)."""
    sin_bt1h, cos_bt1h = sin_cos
    x1, x2 = jnp.split(x_btnh.astype(jnp.float32), 2, axis=-1)
    rotated = jnp.concatenate([x1 * cos_bt1h - x2 * sin_bt1h, x2 * cos_bt1h + x1 * sin_bt1h], -1)
    return rotated.astype(x_btnh.dtype)


def rotary_embedding(x_btnh: jax.Array, positions_bt: jax.Array, theta: float) -> jax.Array:
    """`apply_rotary` with tables made for these positions."""
    frequencies = rotary_inverse_frequencies(x_btnh.shape[-1], theta)
    return apply_rotary(x_btnh, rotary_tables(positions_bt, frequencies))


def _xla_attention(q_btnh, k_bskh, v_bskh, mask_b1ts, is_causal, scale):
    """Plain-XLA attention: scores (times `scale`) in float32, masked softmax, grouped kv heads.

    Written out rather than through `jax.nn.dot_product_attention`, whose XLA backward is
    about twice as slow on CPU at small sizes."""
    b, t, n, h = q_btnh.shape
    s, kv_heads = k_bskh.shape[1], k_bskh.shape[2]
    q_btkgh = q_btnh.reshape(b, t, kv_heads, n // kv_heads, h)
    scores_bkgts = (
        jnp.einsum("btkgh,bskh->bkgts", q_btkgh, k_bskh, preferred_element_type=jnp.float32) * scale
    )
    if is_causal:
        mask_b1ts = mask_b1ts & jnp.tril(jnp.ones((t, s), bool), k=s - t)
    # Mask and softmax on the 4-D (B, N, T, S) view: rank-5 reductions are ~3x slower on CPU.
    scores_bnts = jnp.where(mask_b1ts, scores_bkgts.reshape(b, n, t, s), jnp.finfo(jnp.float32).min)
    probs_bkgts = (
        jax.nn.softmax(scores_bnts, axis=-1)
        .astype(v_bskh.dtype)
        .reshape(b, kv_heads, n // kv_heads, t, s)
    )
    out_btkgh = jnp.einsum("bkgts,bskh->btkgh", probs_bkgts, v_bskh)
    return out_btkgh.reshape(b, t, n, h)


def _banded_attention(q_btnh, k_bskh, v_bskh, mask: BandedMask, scale):
    """`_xla_attention` of rows within their `KeyBounds`: each block of C queries against
    its S = P + 2C key columns (`BandedMask`), one softmax over them."""
    b, t, n, h = q_btnh.shape
    kv_heads = k_bskh.shape[2]
    _, j, c, s = mask.visible_bjcs.shape
    p = s - 2 * c
    # Key columns run from -C to J C + P - 1: index the row padded by C before, the rest after.
    index_bx = (mask.key_columns_bjs + c).reshape(b, j * s)

    def at_keys(x_bskh):  # (B, J, S, K, H)
        padded = jnp.pad(x_bskh, ((0, 0), (c, j * c + p - t), (0, 0), (0, 0)))
        taken = jnp.take_along_axis(padded, index_bx[:, :, None, None], axis=1)
        return taken.reshape(b, j, s, kv_heads, h)

    q_bjckgh = jnp.pad(q_btnh, ((0, 0), (0, j * c - t), (0, 0), (0, 0))).reshape(
        b, j, c, kv_heads, n // kv_heads, h
    )
    scores_bjkgcs = jnp.einsum(
        "bjckgh,bjskh->bjkgcs", q_bjckgh, at_keys(k_bskh), preferred_element_type=jnp.float32
    )
    # Mask and softmax on a 4-D (B J, N, C, S) view: rank-5 reductions are ~3x slower on CPU.
    scores_xncs = jnp.where(
        mask.visible_bjcs.reshape(b * j, 1, c, s),
        scores_bjkgcs.reshape(b * j, n, c, s) * scale,
        jnp.finfo(jnp.float32).min,
    )
    probs_bjkgcs = (
        jax.nn.softmax(scores_xncs, axis=-1).astype(v_bskh.dtype).reshape(scores_bjkgcs.shape)
    )
    out_bjckgh = jnp.einsum("bjkgcs,bjskh->bjckgh", probs_bjkgcs, at_keys(v_bskh))
    return out_bjckgh.reshape(b, j * c, n, h)[:, :t].astype(q_btnh.dtype)


def decode_attention(
    q_bnh: jax.Array,
    k_bksh: jax.Array,
    v_bksh: jax.Array,
    valid_bs: jax.Array,
    num_filled: jax.Array,
    chunk_slots: int,
    scale: float | None = None,
) -> jax.Array:
    """One query per row against a layer's cached keys and values; (B, N, H).

    Reads slots [0, num_filled) rounded up to whole chunks of `chunk_slots` (which divides
    S) with an online softmax, so slots not yet filled are never read; a chunk as long as
    the cache is one pass with no loop. `valid_bs` says which slots each row may see. Scores
    (q.k times `scale`, H^-0.5 when None) and the softmax run in float32; the result equals
    masked softmax attention over S slots.
    """
    b, n, h = q_bnh.shape
    _, kv_heads, s, _ = k_bksh.shape
    q_bkgh = q_bnh.reshape(b, kv_heads, n // kv_heads, h)
    scale = h**-0.5 if scale is None else scale
    q_bkgh = (q_bkgh.astype(jnp.float32) * scale).astype(k_bksh.dtype)

    def chunk(index, carry):
        max_bkg, sum_bkg, out_bkgh = carry
        start = index * chunk_slots
        k_bkch = jax.lax.dynamic_slice_in_dim(k_bksh, start, chunk_slots, axis=2)
        v_bkch = jax.lax.dynamic_slice_in_dim(v_bksh, start, chunk_slots, axis=2)
        valid_bc = jax.lax.dynamic_slice(valid_bs, (0, start), (b, chunk_slots))
        scores_bkgc = jnp.einsum(
            "bkgh,bkch->bkgc", q_bkgh, k_bkch, preferred_element_type=jnp.float32
        )
        scores_bkgc = jnp.where(valid_bc[:, None, None, :], scores_bkgc, -jnp.inf)
        new_max_bkg = jnp.maximum(max_bkg, scores_bkgc.max(axis=-1))
        # Until a row has seen a valid slot its maximum is -inf; shift by 0 then (all 0s).
        shift_bkg = jnp.where(jnp.isfinite(new_max_bkg), new_max_bkg, 0.0)
        probs_bkgc = jnp.exp(scores_bkgc - shift_bkg[..., None])
        rescale_bkg = jnp.exp(max_bkg - shift_bkg)
        out_bkgh = out_bkgh * rescale_bkg[..., None] + jnp.einsum(
            "bkgc,bkch->bkgh",
            probs_bkgc.astype(v_bkch.dtype),
            v_bkch,
            preferred_element_type=jnp.float32,
        )
        return new_max_bkg, sum_bkg * rescale_bkg + probs_bkgc.sum(axis=-1), out_bkgh

    start = (
        jnp.full((b, kv_heads, n // kv_heads), -jnp.inf, jnp.float32),
        jnp.zeros((b, kv_heads, n // kv_heads), jnp.float32),
        jnp.zeros((b, kv_heads, n // kv_heads, h), jnp.float32),
    )
    if chunk_slots >= s:  # one pass, no loop
        _, sum_bkg, out_bkgh = chunk(0, start)
    else:
        num_chunks = (num_filled + chunk_slots - 1) // chunk_slots
        _, sum_bkg, out_bkgh = jax.lax.fori_loop(0, num_chunks, chunk, start)
    return (out_bkgh / sum_bkg[..., None]).reshape(b, n, h).astype(q_bnh.dtype)


def dot_product_attention(
    q_btnh: jax.Array,
    k_bskh: jax.Array,
    v_bskh: jax.Array,
    mask_b1ts: jax.Array,
    *,
    backend: str = "xla",
    is_causal: bool = True,
    scale: float | None = None,
) -> jax.Array:
    """Softmax attention where `mask_b1ts` allows it (see `segment_mask`); (B, T, N, H).

    N query heads share K key/value heads (N % K == 0). With `is_causal`, query t also sees
    only keys s <= t + (S - T) (the last T of S positions), which within a packed row is
    causal per document. Scores are q.k times `scale` (H^-0.5 when None). A `BandedMask`
    (rows within their `KeyBounds`, causality in the mask) is read block by block in XLA.
    """
    scale = q_btnh.shape[-1] ** -0.5 if scale is None else scale
    if isinstance(mask_b1ts, BandedMask):  # causal within the mask; any backend
        return _banded_attention(q_btnh, k_bskh, v_bskh, mask_b1ts, scale)
    if backend == "xla":
        return _xla_attention(q_btnh, k_bskh, v_bskh, mask_b1ts, is_causal, scale)
    if backend == "cudnn":
        return jax.nn.dot_product_attention(
            q_btnh,
            k_bskh,
            v_bskh,
            mask=mask_b1ts,
            scale=scale,
            is_causal=is_causal,
            implementation="cudnn",
        )
    raise ValueError(f"unknown attention backend '{backend}'; use 'xla' or 'cudnn'")
