"""Groups of sampled replies: each prompt repeated G times, in contiguous rows.

Row g of prompt i (row i * G + g) samples with the key fold_in(fold_in(key, i), g), so a
reply does not depend on its batch-mates or on how many rows one sampler call takes: the
labelers, PPO and GRPO draw the same replies from the same key however they chunk.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.generate import Completion, Generator
from jaxllm.model import Params


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
