"""Sampled replies as the trainers see them.

- Groups: each prompt repeated G times in contiguous rows; row g of prompt i (row i * G + g)
  samples with the key fold_in(fold_in(key, i), g), so a reply does not depend on its
  batch-mates or on how many rows one sampler call takes: the labelers, PPO and GRPO draw
  the same replies from the same key however they chunk.
- Rows: a rollout is its prompt left-padded to P' tokens, then the completion columns, so
  completion token t sits in column P' + t of every row (`rollout_rows`). A batch keeps
  only as many prompt columns as its longest prompt needs (`prompt_width`, at most the
  stage's P) and as many completion columns as its longest reply needs
  (`completion_width`, at most N), so scoring and training skip the padding on both
  sides; the functions below read P' and the width from the rows' shapes (`row_columns`),
  and `padding_fraction` is the share of a batch's row positions that hold no token.
- `reward_model_scores`: a reward model's score of each rollout, read at its last token.
- `completion_outputs`: the policy's log-probs of the completion tokens (the sampler's
  `token_logprobs`, at its temperature), the hidden states before them, and optionally
  the entropies, in one forward pass. Given a group size G, where it costs fewer FLOPs
  (`shared_prompt_pays`) the pass computes each group's prompt once: the G rows of one
  prompt become one row [prompt | reply 1 | ... | reply G], each reply attending to the
  prompt and to itself (`shared_prompt_hidden`), with the same results up to rounding.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.config import REWARD_HEAD
from jaxllm.data.comparison_batches import FIRST_REPLY_SEGMENT, PROMPT_SEGMENT
from jaxllm.generate import Completion, Generator
from jaxllm.losses import bucket_width, scaled_vocab_logits, sequence_scores, token_logprobs
from jaxllm.model import LanguageModel, Params


def group_keys(key: jax.Array, num_prompts: int, group_size: int) -> jax.Array:
    """(num_prompts * G,) keys: row i * G + g gets fold_in(fold_in(key, i), g)."""
    prompt_keys = jax.vmap(jax.random.fold_in, (None, 0))(key, jnp.arange(num_prompts))
    return jax.vmap(lambda k: jax.vmap(jax.random.fold_in, (None, 0))(k, jnp.arange(group_size)))(
        prompt_keys
    ).reshape(num_prompts * group_size)


def sample_groups(
    generator: Generator,
    params: Params,
    prompts: Sequence[Sequence[int]],
    group_size: int,
    key: jax.Array,
    *,
    max_rows: int | None = None,
    **sampling,
) -> Completion:
    """G replies to every prompt, rows i * G .. i * G + G - 1 for prompt i, sampled in calls
    of at most `max_rows` rows (default: one call). `sampling`: the Generator's keywords
    (temperature, top_k, top_p, stop_ids)."""
    rows = [list(p) for p in prompts for _ in range(group_size)]
    keys = group_keys(key, len(prompts), group_size)
    step = max_rows or len(rows)
    parts = [
        generator(params, rows[start : start + step], keys[start : start + step], **sampling)
        for start in range(0, len(rows), step)
    ]
    if len(parts) == 1:
        return parts[0]
    return Completion(
        np.concatenate([p.tokens for p in parts]),
        np.concatenate([p.logprobs for p in parts]),
        np.concatenate([p.mask for p in parts]),
        max(p.num_steps for p in parts),
    )


def completion_width(num_steps: int, max_new_tokens: int) -> int:
    """Completion columns a batch keeps: the smallest power of two that holds its longest
    reply (`num_steps` decode steps), at least 8, at most `max_new_tokens`. The columns
    after every reply are empty (masked), so dropping them changes no log-prob, value,
    advantage or loss; powers of two bound the compiled update shapes to a few."""
    return bucket_width(num_steps, max_new_tokens)


def prompt_width(longest: int, max_prompt_tokens: int) -> int:
    """Prompt columns a batch keeps: the smallest power of two that holds its longest
    prompt, at least 8, at most `max_prompt_tokens`. Prompts are left-padded, so the
    columns dropped hold only padding (segment 0, no position), which no log-prob, value,
    advantage or loss reads."""
    return bucket_width(longest, max_prompt_tokens)


def row_columns(rows) -> tuple[int, int]:
    """(P', N'): the prompt and completion columns of `rollout_rows`' rows."""
    n = rows["mask_bn"].shape[1]
    return rows["tokens_bt"].shape[1] - n, n


def widest_rows(
    rows, max_prompt_tokens: int, max_new_tokens: int
) -> dict[str, jax.ShapeDtypeStruct]:
    """`rows` (on device) as abstract arrays of the widest batch the stage can give: the
    whole prompt room P and completion budget N, so `*_bt` arrays P + N columns and `*_bn`
    arrays N (same dtypes and shardings)."""
    widths = {"_bt": max_prompt_tokens + max_new_tokens, "_bn": max_new_tokens}

    def widest(name, x):
        shape = x.shape
        if name[-3:] in widths:
            shape = (shape[0], widths[name[-3:]], *shape[2:])
        return jax.ShapeDtypeStruct(shape, x.dtype, sharding=x.sharding)

    return {name: widest(name, x) for name, x in rows.items()}


def trimmed_row_fields(max_prompt_tokens: int, max_new_tokens: int, prompt_rows=None) -> dict:
    """The `Stage` fields of a stage whose batches are `rollout_rows` (trimmed to their
    longest prompt and reply): the positions the update computes per row, P' / k + N' for
    tokens/s and MFU (k = `prompt_rows(rows)`, the rows that share one prompt computed
    once; default 1), and the widest batch (P + N) for the memory check before the first
    step."""

    def row_length(rows) -> float:
        p, n = row_columns(rows)
        return p / (prompt_rows(rows) if prompt_rows else 1) + n

    return {
        "row_length": row_length,
        "widest_batch": lambda rows: widest_rows(rows, max_prompt_tokens, max_new_tokens),
    }


def rollout_figures(
    rows: dict[str, np.ndarray], elapsed_s: float, prompt_rows: int = 1
) -> dict[str, float]:
    """One rollout batch's figures for its log line: completion tokens sampled per second
    (stop tokens included, padding not), the prompt and completion columns its rows kept,
    and `padding_fraction`, the share of the update's row positions that hold no token
    (what it computes for nothing), with each prompt held once per `prompt_rows` rows (a
    group whose prompt is computed once) or in every row (1)."""
    p, n = row_columns(rows)
    real = rows["segment_ids_bt"] > 0
    positions = real.shape[0] // prompt_rows * p + real.shape[0] * n
    return {
        "rollout_tokens_per_sec": float(rows["mask_bn"].sum()) / elapsed_s,
        "prompt_width": p,
        "completion_width": n,
        "padding_fraction": 1.0
        - float(real[::prompt_rows, :p].sum() + real[:, p:].sum()) / positions,
    }


def rollout_rows(
    prompt_ids: Sequence[Sequence[int]],
    completion: Completion,
    max_prompt_tokens: int,
    pad_id: int,
    stop_ids: Sequence[int],
    gold_b: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """Host arrays of B rollouts: rows of P' + N' tokens (prompt left-padded to P' =
    `prompt_width` <= `max_prompt_tokens`, then the completion's first N' =
    `completion_width` columns), positions counting real tokens
    only, segment 1 on real tokens; the completion mask (the tokens the model wrote: of a
    multi-turn episode, not the tool results between its turns, which are real tokens of
    the row but never trained), the sampler's log-probs, whether each reply ended with one
    of `stop_ids`, and a gold reward per row (zeros when not given)."""
    b, n = completion.tokens.shape
    n = completion_width(completion.num_steps, n)
    prompt_len = prompt_width(max(len(ids) for ids in prompt_ids), max_prompt_tokens)
    completion_tokens, mask = completion.tokens[:, :n], completion.mask[:, :n]
    real = mask if completion.inserted is None else mask | completion.inserted[:, :n]
    tokens = np.full((b, prompt_len + n), pad_id, np.int32)
    segments = np.zeros((b, prompt_len + n), np.int32)
    for row, ids in enumerate(prompt_ids):
        tokens[row, prompt_len - len(ids) : prompt_len] = ids
        segments[row, prompt_len - len(ids) : prompt_len] = 1
    tokens[:, prompt_len:] = completion_tokens
    segments[:, prompt_len:] = real
    return {
        "tokens_bt": tokens,
        "positions_bt": np.maximum(np.cumsum(segments, axis=1) - 1, 0).astype(np.int32),
        "segment_ids_bt": segments,
        "mask_bn": mask.astype(np.float32),
        "sampler_logprobs_bn": completion.logprobs[:, :n].astype(np.float32),
        "ended_b": np.any(np.isin(completion_tokens, stop_ids) & (mask > 0), axis=1).astype(
            np.float32
        ),
        "gold_reward_b": np.zeros(b, np.float32)
        if gold_b is None
        else np.asarray(gold_b, np.float32),
    }


class CompletionOutputs(NamedTuple):
    logprobs_bn: jax.Array  # (B, N) float32 log-probs of the completion tokens
    hidden_bnd: jax.Array  # (B, N, D) hidden state before each completion token
    entropies_bn: jax.Array | None  # (B, N) float32 entropy of each next-token distribution


def shared_prompt_pays(model: LanguageModel, rows, group_size: int) -> bool:
    """Whether a group's G rows cost fewer training FLOPs (`model.flops_per_token`, f) as
    one row of the prompt once and the G replies (`shared_prompt_hidden`) than as G rows:
    (P' + G N') f(P' + G N') < G (P' + N') f(P' + N'). Each reply attends over the whole
    packed row in the dense attention, so long replies can make sharing cost more."""
    p, n = row_columns(rows)
    packed = p + group_size * n
    alone = group_size * (p + n) * model.flops_per_token(p + n)
    return group_size > 1 and packed * model.flops_per_token(packed) < alone


def shared_prompt_hidden(model: LanguageModel, params: Params, rows, group_size: int):
    """(B G, N', D) hidden states before each completion token of `rollout_rows` whose G
    consecutive rows share one prompt (`sample_groups`' layout), computed with each prompt
    once: a group is one row [prompt (P' columns) | reply 1 (N') | ... | reply G (N')],
    the prompt in segment `PROMPT_SEGMENT`, reply g's tokens in `FIRST_REPLY_SEGMENT` + g
    with the prompt as their prefix segment, at the positions they hold in their own rows.
    A reply's first token is predicted from the prompt's last column, its t-th from its
    own column t - 1."""
    p, n = row_columns(rows)
    g = group_size
    tokens, positions, segments = (
        rows[name].reshape(-1, g, p + n) for name in ("tokens_bt", "positions_bt", "segment_ids_bt")
    )
    b = tokens.shape[0]

    def packed(prompt_bp, replies_bgn):
        return jnp.concatenate([prompt_bp, replies_bgn.reshape(b, g * n)], axis=1)

    reply_segments = jnp.where(
        segments[:, :, p:] > 0, FIRST_REPLY_SEGMENT + jnp.arange(g)[:, None], 0
    )
    hidden_btd = model.hidden(
        params,
        packed(tokens[:, 0, :p], tokens[:, :, p:]),
        packed(positions[:, 0, :p], positions[:, :, p:]),
        packed(jnp.where(segments[:, 0, :p] > 0, PROMPT_SEGMENT, 0), reply_segments),
        packed(jnp.zeros_like(segments[:, 0, :p]), jnp.full_like(reply_segments, PROMPT_SEGMENT)),
    )
    column_gn = p + n * np.arange(g)[:, None] + np.arange(n)
    source_gn = np.where(np.arange(n) == 0, p - 1, column_gn - 1)
    return hidden_btd[:, source_gn.reshape(-1)].reshape(b * g, n, -1)


def completion_outputs(
    model: LanguageModel,
    params: Params,
    rows,
    temperature: float,
    vocab_size: int,
    entropy: bool = False,
    group_size: int = 1,
) -> CompletionOutputs:
    """One forward pass over `rollout_rows`: log-probs under log_softmax(logits /
    temperature) over the real vocabulary (as the sampler's), read at columns P - 1 ..
    P + N - 2 for the tokens in P .. P + N - 1; entropies only when asked. `group_size`
    G > 1: each G consecutive rows share one prompt, computed once where that pays
    (`shared_prompt_pays`, decided per batch shape when traced)."""
    p, n = row_columns(rows)
    if shared_prompt_pays(model, rows, group_size):
        before_bnd = shared_prompt_hidden(model, params, rows, group_size)
    else:
        hidden_btd = model.hidden(
            params, rows["tokens_bt"], rows["positions_bt"], rows["segment_ids_bt"]
        )
        before_bnd = hidden_btd[:, p - 1 : p + n - 1]
    logits_bnv = model.logits_from_hidden(params, before_bnd)
    logprobs_bn = token_logprobs(
        logits_bnv, rows["tokens_bt"][:, p:], temperature=temperature, vocab_size=vocab_size
    )
    entropies_bn = None
    if entropy:
        log_p_bnv = jax.nn.log_softmax(
            scaled_vocab_logits(logits_bnv, temperature, vocab_size), axis=-1
        )
        # Ids past the vocabulary have log p = -inf and p = 0: leave them out (0 * -inf in
        # the backward pass would be NaN).
        finite_log_p_bnv = jnp.where(jnp.isfinite(log_p_bnv), log_p_bnv, 0.0)
        entropies_bn = -jnp.sum(jnp.exp(log_p_bnv) * finite_log_p_bnv, axis=-1)
    return CompletionOutputs(logprobs_bn, before_bnd, entropies_bn)


def reward_model_scores(reward_model: LanguageModel, reward_params: Params, rows):
    """(B,) raw scores of the `reward` head at each reply's last token (its `<|im_end|>`,
    or where it was cut off; of an episode, its last turn's): column P + n_b - 1, n_b the
    row's real completion tokens."""
    prompt_len, _ = row_columns(rows)
    real_bn = rows["segment_ids_bt"][:, prompt_len:] > 0
    last_b = prompt_len + jnp.sum(real_bn, axis=1).astype(jnp.int32) - 1
    return sequence_scores(
        reward_model,
        reward_params,
        REWARD_HEAD,
        rows["tokens_bt"],
        rows["positions_bt"],
        rows["segment_ids_bt"],
        last_b,
    )
