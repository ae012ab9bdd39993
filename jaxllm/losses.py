"""Pure losses and the causal-LM batch layout they read.

A causal-LM batch is a dict of (B, T) arrays:
- `tokens`: input ids; `targets`: the next id at each position;
- `positions`: position of each token within its document (restarts per packed document);
- `segment_ids`: document id within the row, 0 for padding;
- `loss_mask`: 1.0 where the target is trained, else 0.0.

`lm_batch_from_rows` builds it from rows of T + 1 ids. A target is trained only where it
belongs to the same document as its input (never across a packed boundary) and the
caller's mask allows it.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np

LM_BATCH_KEYS = ("tokens", "targets", "positions", "segment_ids", "loss_mask")


def bucket_width(length: int, limit: int, smallest: int = 8, per_octave: int = 1) -> int:
    """The width a batch's rows are cut to when they vary in length (padding columns
    dropped, a few compiled shapes): the smallest m x 2^e that holds `length` tokens, with
    `per_octave` <= m < 2 `per_octave` (a power of two): powers of two for 1; for 4 the
    widths 8, 10, 12, 14, 16, 20, 24, 28, 32, 40, ..., so at most a fifth of the widest row
    is padding. At least `smallest`, at most `limit`."""
    need = max(length, smallest, 1)
    step = 1 << max(0, need.bit_length() - per_octave.bit_length())
    return min(limit, -(-need // step) * step)


def positions_from_segments(segment_ids_bt: np.ndarray) -> np.ndarray:
    """Position of each token within its segment: 0, 1, ... restarting at each new segment."""
    segment_ids_bt = np.asarray(segment_ids_bt)
    index_bt = np.broadcast_to(
        np.arange(segment_ids_bt.shape[1], dtype=np.int32), segment_ids_bt.shape
    )
    starts_bt = np.ones(segment_ids_bt.shape, bool)
    starts_bt[:, 1:] = segment_ids_bt[:, 1:] != segment_ids_bt[:, :-1]
    segment_start_bt = np.maximum.accumulate(np.where(starts_bt, index_bt, 0), axis=1)
    return (index_bt - segment_start_bt).astype(np.int32)


def lm_batch_from_rows(
    rows_bt1: np.ndarray,
    segment_ids_bt1: np.ndarray | None = None,
    loss_mask_bt1: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """A causal-LM batch (host NumPy arrays) from rows of T + 1 token ids.

    Args:
        rows_bt1: (B, T + 1) int token ids.
        segment_ids_bt1: (B, T + 1) document ids (0 = padding); default: one document.
        loss_mask_bt1: (B, T + 1) 1 where a token may be *predicted*; default: all.
    Returns:
        dict with `LM_BATCH_KEYS`, each (B, T).
    """
    rows_bt1 = np.asarray(rows_bt1, np.int32)
    segment_ids_bt1 = (
        np.ones_like(rows_bt1) if segment_ids_bt1 is None else np.asarray(segment_ids_bt1, np.int32)
    )
    loss_mask_bt1 = (
        np.ones(rows_bt1.shape, np.float32)
        if loss_mask_bt1 is None
        else np.asarray(loss_mask_bt1, np.float32)
    )
    chex.assert_equal_shape([rows_bt1, segment_ids_bt1, loss_mask_bt1])
    segment_ids_bt = segment_ids_bt1[:, :-1]
    same_document = (segment_ids_bt1[:, 1:] == segment_ids_bt) & (segment_ids_bt != 0)
    return {
        "tokens": rows_bt1[:, :-1],
        "targets": rows_bt1[:, 1:],
        "positions": positions_from_segments(segment_ids_bt),
        "segment_ids": segment_ids_bt,
        "loss_mask": same_document.astype(np.float32) * loss_mask_bt1[:, 1:],
    }


def token_logprobs(
    logits_btv: jax.Array,
    tokens_bt: jax.Array,
    *,
    temperature: float | jax.Array = 1.0,
    vocab_size: int | None = None,
) -> jax.Array:
    """log p(token) under log_softmax(logits / temperature) over the real vocabulary, (B, T).

    The one log-prob function of the library: the sampler, the LM losses and every RL
    trainer read their log-probabilities here, so an importance ratio of on-policy tokens
    is exactly 1. Ids at or above `vocab_size` (the model's padding rows of the embedding
    table) get probability 0; temperature <= 0 (greedy) is read as 1.

    Args:
        logits_btv: (B, T, V) logits of the token at each position.
        tokens_bt: (B, T) int ids whose log-probability is read (< vocab_size).
        temperature: scalar, may be traced.
        vocab_size: the tokenizer's number of ids; None keeps all V.
    Returns:
        (B, T) float32 log-probabilities.
    """
    chex.assert_rank(logits_btv, 3)
    chex.assert_equal_shape_prefix([logits_btv, tokens_bt], 2)
    scaled_btv = scaled_vocab_logits(logits_btv, temperature, vocab_size)
    log_normaliser_bt = jax.nn.logsumexp(scaled_btv, axis=-1)
    token_logit_bt = jnp.take_along_axis(scaled_btv, tokens_bt[..., None], axis=-1)[..., 0]
    return token_logit_bt - log_normaliser_bt


def scaled_vocab_logits(
    logits_bxv: jax.Array, temperature: float | jax.Array = 1.0, vocab_size: int | None = None
) -> jax.Array:
    """float32 logits / temperature with ids >= `vocab_size` set to -inf; any leading shape.

    temperature <= 0 (greedy) divides by 1."""
    logits_bxv = logits_bxv.astype(jnp.float32)
    if vocab_size is not None and vocab_size < logits_bxv.shape[-1]:
        in_vocab_v = jnp.arange(logits_bxv.shape[-1]) < vocab_size
        logits_bxv = jnp.where(in_vocab_v, logits_bxv, -jnp.inf)
    return logits_bxv / jnp.where(temperature > 0, temperature, 1.0)


def token_cross_entropy(
    logits_btv: jax.Array, targets_bt: jax.Array, vocab_size: int | None = None
) -> jax.Array:
    """Per-token negative log-likelihood (B, T) in float32 (`-token_logprobs` at T = 1)."""
    return -token_logprobs(logits_btv, targets_bt, vocab_size=vocab_size)


def masked_causal_lm_loss(
    logits_btv: jax.Array,
    targets_bt: jax.Array,
    loss_mask_bt: jax.Array,
    vocab_size: int | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Sum of masked per-token NLL and the number of trained tokens, both float32 scalars.

    Callers divide the sum by the count over the *global* batch (all micro-batches and
    devices), so every trained token weighs the same however the batch is split. Untrained
    positions are selected away (not multiplied by 0), so a padding target outside the
    real vocabulary (NLL +inf) cannot turn the sum into NaN.
    """
    chex.assert_equal_shape([targets_bt, loss_mask_bt])
    loss_mask_bt = loss_mask_bt.astype(jnp.float32)
    nll_bt = token_cross_entropy(logits_btv, targets_bt, vocab_size)
    return jnp.sum(jnp.where(loss_mask_bt > 0, nll_bt * loss_mask_bt, 0.0)), jnp.sum(loss_mask_bt)


def sequence_scores(
    model,
    params,
    head: str,
    tokens_bt,
    positions_bt,
    segment_ids_bt,
    index_b,
    prefix_segment_ids_bt=None,
) -> jax.Array:
    """float32 of `index_b`'s shape, (B,) or (B, K): the scalar head `head` (a reward or
    value head) read at position `index_b` of each row (each of K positions of a packed
    row), e.g. a reply's closing `<|im_end|>`. Padding is any tokens with segment id 0, on
    either side: a score does not depend on it, on other rows or on other segments (but
    on the shared prefix `prefix_segment_ids_bt` names, see `LanguageModel.hidden`)."""
    index_b = jnp.asarray(index_b)
    index_bk = index_b.reshape(index_b.shape[0], -1)
    hidden_bkd = model.hidden(
        params, tokens_bt, positions_bt, segment_ids_bt, prefix_segment_ids_bt, index_bk
    )
    return model.scalar_head(params, head, hidden_bkd).reshape(index_b.shape)
