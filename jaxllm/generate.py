"""Text sampling for eval-time samples: a jitted full forward over a sliding window.

Each new token costs one forward pass over the last `max_seq_len` tokens. Simple and exact;
the KV-cache engine for chat and RL rollouts is a separate, faster path.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.model import LanguageModel, Params
from jaxllm.tokenizer import Tokenizer


def make_sampler(model: LanguageModel, tokenizer: Tokenizer):
    """A jitted `(params, window_1t, length, key, temperature) -> next token id`.

    Ids past the tokenizer's vocabulary (the model's padding) are never sampled."""

    @jax.jit
    def next_token(params, window_1t, length, key, temperature):
        logits_v = model.logits(params, window_1t)[0, length - 1]
        in_vocab = jnp.arange(logits_v.shape[0]) < tokenizer.vocab_size
        logits_v = jnp.where(in_vocab, logits_v, -jnp.inf)
        greedy = jnp.argmax(logits_v)
        sampled = jax.random.categorical(key, logits_v / jnp.maximum(temperature, 1e-6))
        return jnp.where(temperature > 0, sampled, greedy)

    return next_token


def sample_text(
    model: LanguageModel,
    params: Params,
    tokenizer: Tokenizer,
    prompt_ids: list[int],
    num_tokens: int,
    key: jax.Array,
    temperature: float = 0.8,
    sampler=None,
) -> str:
    """Continue `prompt_ids` by `num_tokens` sampled tokens (stopping at `<|end|>`)."""
    sampler = sampler or make_sampler(model, tokenizer)
    window_len = model.cfg.max_seq_len
    ids = list(prompt_ids)
    for index in range(num_tokens):
        context = ids[-window_len:]
        window = np.full((1, window_len), tokenizer.pad_id, np.int32)
        window[0, : len(context)] = context
        token = int(
            sampler(params, window, len(context), jax.random.fold_in(key, index), temperature)
        )
        if token == tokenizer.end_id:
            break
        ids.append(token)
    return tokenizer.decode(ids[len(prompt_ids) :])
