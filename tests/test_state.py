"""Optimizer pieces: nanoGPT's schedule and the weight-decay mask."""

import math

import pytest
from helpers import tiny_config

from jaxllm.config import OptimizerConfig
from jaxllm.model import LanguageModel
from jaxllm.state import learning_rate_schedule, weight_decay_mask


def nanogpt_lr(it, lr=1e-3, min_lr=1e-4, warmup=100, decay=2000):
    """nanoGPT's train.py get_lr, written out."""
    if it < warmup:
        return lr * (it + 1) / (warmup + 1)
    if it > decay:
        return min_lr
    ratio = (it - warmup) / (decay - warmup)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (lr - min_lr)


@pytest.mark.parametrize("step", [0, 1, 50, 99, 100, 101, 500, 1000, 1999, 2000, 2500])
def test_schedule_matches_nanogpt(step):
    schedule = learning_rate_schedule(
        OptimizerConfig(lr=1e-3, min_lr=1e-4, warmup_steps=100, decay_steps=2000), 2000
    )
    assert float(schedule(step)) == pytest.approx(nanogpt_lr(step), rel=1e-5)


def test_weight_decay_applies_to_matrices_only():
    cfg = tiny_config("model.tie_embeddings=false", "model.scalar_heads=[value]").model
    mask = weight_decay_mask(LanguageModel(cfg).logical_axes)
    assert mask["token_embedding_vd"] and mask["lm_head_dv"]
    assert all(mask["blocks"]["attention"].values()) and all(mask["blocks"]["mlp"].values())
    assert not mask["blocks"]["attention_norm"]["scale_d"]  # (layers, embed): a stacked vector
    assert not mask["final_norm"]["scale_d"]
    assert not mask["heads"]["value"]["w_d"] and not mask["heads"]["value"]["bias"]
