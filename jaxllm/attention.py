"""Attention with backends chosen by config, causal masking and packed-sequence segment ids.

Backends: `xla` (everywhere) and `cudnn` (NVIDIA GPUs), both through
`jax.nn.dot_product_attention`, which also handles grouped-query attention (fewer kv heads).

Segment ids mark which document a token belongs to (0 is padding). A query attends only
to keys of its own segment, on every backend, so packed documents never see each other;
prefix segment ids let several segments of a row also attend to one shared prefix (a
prompt held once for all its replies).
A sliding-window layer also hides keys `window` or more positions back (`window_mask`).

Rows whose keys are near their queries (a shared prompt's G replies packed end to end after
it) can say so with `KeyBounds`: every key a query may see lies in the row's first P
columns or within the C columns ending at its own. `banded_mask` then describes the
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
    """Where a row's visible keys lie (static): every key a query may see is in the row's
    first `prefix_columns` columns, or is one of the `recent_columns` columns ending at the
    query's own. A group's shared prompt packed before its replies (`rl.rollouts.group_rows`)
    satisfies it with the prompt's columns and the longest reply. Rows that break it get
    other results at the queries that see further (padding's, which no loss reads, may)."""

    prefix_columns: int
    recent_columns: int

    def blocks(self, columns: int) -> tuple[int, int, int]:
        """(J, C, P) of a row of `columns`: J blocks of C queries, each reading the first P
        columns and the two blocks ending at its own (P <= columns)."""
        c = self.recent_columns
        return -(-columns // c), c, min(self.prefix_columns, columns)

    def pays(self, columns: int) -> bool:
        """Whether the blocks score fewer query-key pairs than the whole row: J C (P + 2C)
        against T^2, with a quarter to spare for the blocks' extra copies."""
        j, c, p = self.blocks(columns)
        return j * c * (p + 2 * c) < 0.75 * columns * columns


@struct.dataclass
class BandedMask:
    """`segment_mask` (and causality, and a window) of rows that keep their `KeyBounds`,
    in two parts over the row padded to J C columns: every query against the first P
    columns, and block j's C queries (columns jC .. jC + C - 1) against the 2C columns
    (j - 1)C .. jC + C - 1 that lie past those P (before column 0 or past the row: never
    visible). Queries past the row see nothing."""

    prefix_btp: jax.Array  # (B, J C, P) bool
    recent_bjcs: jax.Array  # (B, J, C, 2C) bool


def banded_mask(
    segment_ids_bt: jax.Array,
    prefix_segment_ids_bt: jax.Array | None,
    places_bt: jax.Array,
    bounds: KeyBounds,
    window: int | None = None,
) -> BandedMask:
    """The causal `segment_mask` of rows within `bounds` as a `BandedMask`; with `window`,
    also `window_mask` by `places_bt` (positions). Built from the rows reshaped into blocks
    (no table of key columns: at long rows it would be a large constant of the program)."""
    b, t = segment_ids_bt.shape
    j, c, p = bounds.blocks(t)
    columns_bt = jnp.broadcast_to(jnp.arange(t), (b, t))

    def queries(x_bt, fill):  # (B, J C): the row padded to J C columns
        return jnp.pad(x_bt, ((0, 0), (0, j * c - t)), constant_values=fill)

    def recent(x_bt, fill):  # (B, J, 2C): the block before each block, then the block
        x_bjc = queries(x_bt, fill).reshape(b, j, c)
        before_bjc = jnp.pad(x_bjc[:, :-1], ((0, 0), (1, 0), (0, 0)), constant_values=fill)
        return jnp.concatenate([before_bjc, x_bjc], axis=2)

    def visible(query, key):
        """Whether each query sees each key: `query(x, fill)` and `key(x, fill)` lay a row's
        values out (`fill` past the row) so that the two broadcast to the mask's shape."""
        segment_q, segment_k = query(segment_ids_bt, -1), key(segment_ids_bt, -2)
        column_q, column_k = query(columns_bt, t), key(columns_bt, t)
        shown = (segment_q == segment_k) & (column_k <= column_q) & (column_q < t)
        if prefix_segment_ids_bt is not None:
            prefix_q = query(prefix_segment_ids_bt, 0)
            shown |= (prefix_q == segment_k) & (prefix_q > 0)
        if window is not None:
            shown &= key(places_bt, 0) > query(places_bt, 0) - window
        return shown & (column_k < t)

    prefix_btp = visible(
        lambda x, fill: queries(x, fill)[:, :, None], lambda x, fill: x[:, None, :p]
    )
    # Recent keys among the first P columns are read as prefix keys, not twice.
    recent_bjcs = visible(
        lambda x, fill: queries(x, fill).reshape(b, j, c)[..., None],
        lambda x, fill: recent(x, fill)[:, :, None, :],
    ) & (recent(columns_bt, t)[:, :, None, :] >= p)
    return BandedMask(prefix_btp, recent_bjcs)


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
    """`_xla_attention` of rows within their `KeyBounds`: every query against the first P
    keys, and each block of C queries against the 2C keys ending with its block, under one
    softmax (the two parts' exponentials share a maximum and a sum)."""
    b, t, n, h = q_btnh.shape
    kv_heads = k_bskh.shape[2]
    g = n // kv_heads
    _, j, c, _ = mask.recent_bjcs.shape
    p = mask.prefix_btp.shape[2]

    def heads_first(x_btxh):  # (B, X, T', H): the row padded to J C columns
        x_btxh = jnp.pad(x_btxh, ((0, 0), (0, j * c - t), (0, 0), (0, 0)))
        return x_btxh.transpose(0, 2, 1, 3)

    def recent(x_bkth):  # (B, K, J, 2C, H): the block before each block, then the block
        x_bkjch = x_bkth.reshape(b, kv_heads, j, c, h)
        before = jnp.pad(x_bkjch[:, :, :-1], ((0, 0), (0, 0), (1, 0), (0, 0), (0, 0)))
        return jnp.concatenate([before, x_bkjch], axis=3)

    q_bkgth = heads_first(q_btnh).reshape(b, kv_heads, g, j * c, h)
    k_bkth, v_bkth = heads_first(k_bskh), heads_first(v_bskh)
    floor = jnp.finfo(jnp.float32).min
    prefix_bkgtp = jnp.einsum(
        "bkgth,bkph->bkgtp", q_bkgth, k_bkth[:, :, :p], preferred_element_type=jnp.float32
    )
    prefix_bkgtp = jnp.where(mask.prefix_btp[:, None, None], prefix_bkgtp * scale, floor)
    q_bkgjch = q_bkgth.reshape(b, kv_heads, g, j, c, h)
    recent_bkjgcs = jnp.einsum(
        "bkgjch,bkjsh->bkjgcs", q_bkgjch, recent(k_bkth), preferred_element_type=jnp.float32
    )
    recent_bkjgcs = jnp.where(mask.recent_bjcs[:, None, :, None], recent_bkjgcs * scale, floor)

    def as_recent(x_bkgt):  # (B, K, J, G, C)
        return x_bkgt.reshape(b, kv_heads, g, j, c).transpose(0, 1, 3, 2, 4)

    def as_prefix(x_bkjgc):  # (B, K, G, T')
        return x_bkjgc.transpose(0, 1, 3, 2, 4).reshape(b, kv_heads, g, j * c)

    # The maximum only steadies the exponentials (any value gives the same softmax).
    top_bkgt = jax.lax.stop_gradient(
        jnp.maximum(prefix_bkgtp.max(axis=-1), as_prefix(recent_bkjgcs.max(axis=-1)))
    )
    prefix_bkgtp = jnp.exp(prefix_bkgtp - top_bkgt[..., None])
    recent_bkjgcs = jnp.exp(recent_bkjgcs - as_recent(top_bkgt)[..., None])
    total_bkgt = prefix_bkgtp.sum(axis=-1) + as_prefix(recent_bkjgcs.sum(axis=-1))
    dtype = v_bskh.dtype
    out_bkgth = jnp.einsum(
        "bkgtp,bkph->bkgth",
        prefix_bkgtp.astype(dtype),
        v_bkth[:, :, :p],
        preferred_element_type=jnp.float32,
    )
    out_bkjgch = jnp.einsum(
        "bkjgcs,bkjsh->bkjgch",
        recent_bkjgcs.astype(dtype),
        recent(v_bkth),
        preferred_element_type=jnp.float32,
    )
    out_bkgjch = out_bkjgch.transpose(0, 1, 3, 2, 4, 5)
    out_bkgth = (out_bkgth + out_bkgjch.reshape(out_bkgth.shape)) / total_bkgt[..., None]
    out_btnh = out_bkgth.transpose(0, 3, 1, 2, 4).reshape(b, j * c, n, h)
    return out_btnh[:, :t].astype(q_btnh.dtype)


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
