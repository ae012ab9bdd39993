"""Decode correctness on the accelerator, float32: the cached sampler's greedy tokens equal
the argmax of a full forward pass re-run on the growing sequence, and its log-probs equal
`token_logprobs` of that forward pass. Prints PASS/FAIL lines; exits 1 on a failure.

    python experiments/gpu_decode_check.py
"""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.config import load_config
from jaxllm.generate import Generator
from jaxllm.losses import token_logprobs
from jaxllm.model import LanguageModel


def main() -> int:
    jax.config.update("jax_default_matmul_precision", "highest")  # no TF32 in this check
    # llama_1b's layer shape (GQA 32/8 heads, width 2048) with 2 layers and a small vocab.
    cfg = load_config(
        None,
        [
            "preset=llama_1b",
            "model.num_layers=2",
            "model.vocab_size=4096",
            "model.init_std=0.1",
            "model.dtype=float32",
        ],
    ).model
    model = LanguageModel(cfg)
    params = jax.jit(model.init)(jax.random.key(0))
    rng = np.random.default_rng(0)
    prompts = [rng.integers(1, 4000, n).tolist() for n in (5, 40, 17)]
    new_tokens, vocab = 8, 4000
    out = Generator(model, vocab, 0, new_tokens)(params, prompts, jax.random.key(0), temperature=0)
    # One compiled forward over a fixed width: right padding cannot change the causal logits
    # of the positions before it.
    width = max(map(len, prompts)) + new_tokens
    forward = jax.jit(model.logits)

    def logits_of(sequence):
        padded = np.zeros((1, width), np.int32)
        padded[0, : len(sequence)] = sequence
        return forward(params, jnp.asarray(padded))[:, : len(sequence)]

    failures = 0
    for row, prompt in enumerate(prompts):
        sequence = list(prompt)
        for _ in range(new_tokens):
            sequence.append(int(jnp.argmax(logits_of(sequence)[0, -1, :vocab])))
        expected_tokens = sequence[len(prompt) :]
        logits_btv = logits_of(sequence[:-1])
        expected_logprobs = token_logprobs(
            logits_btv[:, len(prompt) - 1 :],
            jnp.asarray([expected_tokens], jnp.int32),
            vocab_size=vocab,
        )[0]
        same_tokens = out.row(row) == expected_tokens
        error = float(np.max(np.abs(out.logprobs[row] - np.asarray(expected_logprobs))))
        ok = same_tokens and error < 1e-4
        failures += not ok
        print(
            f"{'PASS' if ok else 'FAIL'} prompt of {len(prompt)} tokens: greedy tokens "
            f"{'match' if same_tokens else 'differ'}; log-prob max abs error {error:.1e}",
            flush=True,
        )
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
