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
  the entropies, in one forward pass. Rows that carry `group_rows` (G rows packed into
  one, where that costs fewer FLOPs) are computed as one packed row: GRPO's group as
  [prompt | reply 1 | ... | reply G], the prompt held once and each reply attending to it
  and to itself; PPO's pack as [prompt 1 reply 1 | ... | prompt G reply G], each its own
  segment (`shared_prompt_hidden`). The results are a row each's up to rounding.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.attention import KeyBounds
from jaxllm.config import REWARD_HEAD
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
    rows, max_prompt_tokens: int, max_new_tokens: int, pack_rows: int = 1, group_size: int = 1
) -> dict[str, jax.ShapeDtypeStruct]:
    """`rows` (on device) as abstract arrays of the widest batch the stage can give: the
    whole prompt room P and completion budget N, so `*_bt` arrays P + N columns, `*_bn`
    arrays N and `group_rows`' `*_bw` arrays (packs of `pack_rows` rows in groups of
    `group_size` sharing a prompt) `pack_chunk` columns (same dtypes and shardings)."""
    p, n = max_prompt_tokens, max_new_tokens
    widths = {"_bt": p + n, "_bn": n, "_bw": pack_chunk(p, n, pack_rows, group_size)}

    def widest(name, x):
        shape = x.shape
        if name[-3:] in widths:
            shape = (shape[0], widths[name[-3:]], *shape[2:])
        return jax.ShapeDtypeStruct(shape, x.dtype, sharding=x.sharding)

    found = {name: widest(name, x) for name, x in rows.items()}
    if pack_rows > 1 and "group_tokens_bw" not in rows:  # this batch was not packed, a
        # later one may be: the widest batch is packed (the more attention memory)
        like = rows["tokens_bt"]
        for name in ("group_tokens_bw", "group_positions_bw", "group_segment_ids_bw",
                     "group_prefix_ids_bw", "group_source_bn"):  # fmt: skip
            found[name] = widest(name, like)
    return found


def trimmed_row_fields(
    max_prompt_tokens: int, max_new_tokens: int, pack_rows: int = 1, group_size: int = 1
) -> dict:
    """The `Stage` fields of a stage whose batches are `rollout_rows` (trimmed to their
    longest prompt and reply), with `group_rows` of `pack_rows` in groups of `group_size`
    where they pay: the positions the update computes per row for tokens/s and MFU (P' +
    N', or a packed row's width / its rows), and the widest batch for the memory check
    before the first step."""

    def row_length(rows) -> float:
        if "group_tokens_bw" in rows:
            return rows["group_tokens_bw"].shape[1]
        return sum(row_columns(rows))

    return {
        "row_length": row_length,
        "widest_batch": lambda rows: widest_rows(
            rows, max_prompt_tokens, max_new_tokens, pack_rows, group_size
        ),
    }


def rollout_figures(rows: dict[str, np.ndarray], elapsed_s: float) -> dict[str, float]:
    """One rollout batch's figures for its log line: completion tokens sampled per second
    (stop tokens included, padding not), the prompt and completion columns its rows kept,
    and `padding_fraction`, the share of the positions the update computes that hold no
    token: of the packed groups' rows where the rows carry `group_rows`."""
    p, n = row_columns(rows)
    segments = rows.get("group_segment_ids_bw", rows["segment_ids_bt"])
    return {
        "rollout_tokens_per_sec": float(rows["mask_bn"].sum()) / elapsed_s,
        "prompt_width": p,
        "completion_width": n,
        "padding_fraction": float(1.0 - np.mean(segments > 0)),
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


def pack_chunk(prompt_columns: int, completion_columns: int, pack_rows: int, group_size: int):
    """Columns of each of a pack's rows that hold the pack's tokens at most: its
    R / G groups (R = `pack_rows`, G = `group_size`), each a prompt of P' and G replies of
    N', in R chunks: ceil((R / G)(P' + G N') / R)."""
    return -(
        -(pack_rows // group_size) * (prompt_columns + group_size * completion_columns) // pack_rows
    )


def groups_per_pack(prompts: int, most: int, devices: int) -> int:
    """The groups each pack of `group_rows` holds, of a micro-batch of `prompts` groups:
    the largest k <= `most` that splits them into whole packs, as many on each of the
    data-parallel `devices` (a device without a pack would idle); 1 where none does. The
    mesh changes the packs (and the float order of the update) only where the micro-batch
    has too few groups for `most` per device."""
    fits = [k for k in range(1, most + 1) if prompts % k == 0 and (prompts // k) % devices == 0]
    return max(fits, default=1)


def group_rows(
    model: LanguageModel, rows: dict[str, np.ndarray], pack_rows: int, group_size: int = 1
) -> dict:
    """Host arrays that let the update compute each `pack_rows` consecutive rows of
    `rollout_rows` (R) as one packed row, when that costs fewer training FLOPs (f =
    `model.flops_per_token` at the keys a query is scored against, `KeyBounds.keys_seen`):
    W f(keys) < R (P' + N') f(P' + N'), W the packed width; {} otherwise (and for R = 1).

    A pack holds R / G groups of G = `group_size` rows that share a prompt (GRPO's groups,
    `sample_groups`' layout; G = 1 where each row has its own, as PPO's), end to end. A
    group is its prompt's L real tokens once (positions 0 .. L - 1), then each reply's n_g
    real tokens (the prompt its prefix segment, positions L .. L + n_g - 1, as in its own
    row); each prompt and each reply its own segment, numbered from 1 along the pack. Then
    padding, W columns in all (`bucket_width`, four per octave, a multiple of R). The
    packed row is held as R chunks of W / R columns, one per row, so the arrays keep the
    rows' leading dimension (sharding, minibatches of whole packs, micro-batches).
    `group_source_bn`: for each completion column, the packed column whose hidden state
    predicts its token (its prompt's last for a reply's first token, else the token
    before); 0 for padding."""
    if pack_rows == 1:
        return {}
    p, n = row_columns(rows)
    r, g = pack_rows, group_size
    segments = rows["segment_ids_bt"].reshape(-1, r // g, g, p + n) > 0
    tokens = rows["tokens_bt"].reshape(-1, r // g, g, p + n)
    packs = segments.shape[0]
    prompt_bmg = segments[..., :p].sum(axis=-1)
    reply_bmg = segments[..., p:].sum(axis=-1)
    widest = int((prompt_bmg[:, :, 0] + reply_bmg.sum(axis=2)).sum(axis=1).max())
    room = (r // g) * (p + g * n)
    width = -(-bucket_width(widest, room, per_octave=4) // r) * r
    # the keys a query is scored against: block by block in XLA, the whole row in cuDNN
    keys = KeyBounds(p, n).keys_seen(width) if model.cfg.attention == "xla" else width
    if width * model.flops_per_token(keys) >= r * (p + n) * model.flops_per_token(p + n):
        return {}
    packed = {
        name: np.zeros((packs, width), np.int32)
        for name in ("tokens", "positions", "segment_ids", "prefix_ids")
    }
    source_bmgn = np.zeros((packs, r // g, g, n), np.int32)

    def place(i: int, start: int, ids, positions, segment: int, prefix: int) -> int:
        columns = slice(start, start + len(ids))
        packed["tokens"][i, columns] = ids
        packed["positions"][i, columns] = positions
        packed["segment_ids"][i, columns] = segment
        packed["prefix_ids"][i, columns] = prefix
        return start + len(ids)

    for i in range(packs):
        start, segment = 0, 0
        for m in range(r // g):
            prompt, prompt_segment = int(prompt_bmg[i, m, 0]), segment + 1
            ids = tokens[i, m, 0, p - prompt : p]
            start = place(i, start, ids, np.arange(prompt), prompt_segment, 0)
            prompt_end, segment = start, prompt_segment
            for k in range(g):
                length = int(reply_bmg[i, m, k])
                segment += 1
                # a reply's first token is read from its prompt's last, then its own
                source_bmgn[i, m, k, :length] = np.arange(start - 1, start + length - 1)
                if length:
                    source_bmgn[i, m, k, 0] = prompt_end - 1
                ids = tokens[i, m, k, p : p + length]
                start = place(i, start, ids, prompt + np.arange(length), segment, prompt_segment)
    chunk = width // r
    return {
        **{f"group_{name}_bw": x.reshape(packs * r, chunk) for name, x in packed.items()},
        "group_source_bn": source_bmgn.reshape(packs * r, n),
    }


def shared_prompt_hidden(model: LanguageModel, params: Params, rows, pack_rows: int):
    """(B, N', D) hidden states before each completion token, from one forward pass over
    the packed rows of `group_rows` (`pack_rows` rows each), gathered at `group_source_bn`.
    A query of a pack sees only its prompt (of at most P' columns, from its group's first)
    and its own reply (at most N' columns): the attention may read those blocks alone
    (`KeyBounds`)."""
    r = pack_rows
    p, n = row_columns(rows)
    packed = {
        name: rows[f"group_{name}_bw"].reshape(-1, r * rows[f"group_{name}_bw"].shape[1])
        for name in ("tokens", "positions", "segment_ids", "prefix_ids")
    }
    hidden_bwd = model.hidden(
        params,
        packed["tokens"],
        packed["positions"],
        packed["segment_ids"],
        packed["prefix_ids"],
        key_bounds=KeyBounds(p, n),
    )
    b = hidden_bwd.shape[0]
    source_bm = rows["group_source_bn"].reshape(b, r * n)
    before_bmd = jnp.take_along_axis(hidden_bwd, source_bm[:, :, None], axis=1)
    return before_bmd.reshape(b * r, n, -1)


def completion_outputs(
    model: LanguageModel,
    params: Params,
    rows,
    temperature: float,
    vocab_size: int,
    entropy: bool = False,
    pack_rows: int = 1,
) -> CompletionOutputs:
    """One forward pass over `rollout_rows`: log-probs under log_softmax(logits /
    temperature) over the real vocabulary (as the sampler's), read at columns P - 1 ..
    P + N - 2 for the tokens in P .. P + N - 1; entropies only when asked. Rows that
    carry `group_rows` (packs of `pack_rows` rows) are computed packed
    (`shared_prompt_hidden`)."""
    p, n = row_columns(rows)
    if "group_tokens_bw" in rows:
        before_bnd = shared_prompt_hidden(model, params, rows, pack_rows)
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
