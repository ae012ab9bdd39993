"""Reward model: the backbone plus a scalar `reward` head, trained on comparisons.

Each comparison (a prompt and K >= 2 replies, ranked; see `jaxllm.data.preferences`) is
one batch element: its K prompt+reply rows are scored in the same forward pass, the score
read at each reply's closing `<|im_end|>`. The loss is Bradley-Terry over every pair of a
comparison, averaged within it (`reward.loss=pairs`; ties and soft labels are targets of
0.5 and p; a pair's TRL `margin` m makes it -log s(r_chosen - r_rejected - m)), or the
Plackett-Luce likelihood of the ranking (`plackett_luce`, which refuses margins), plus an
optional centring term c * (r_a + r_b)^2, averaged over the comparison's pairs (TRL's
`center_rewards_coefficient` for a pair). A comparison's rows stay together, so micro-
batches and devices never split one. Eval (held-out `data.val_fraction` of the
comparisons) logs `loss`, `accuracy` (share of pairs the scores order like the labels,
ties 0.5), `decided_accuracy` (the same over pairs the labels do not tie) and `margin`
(mean score of the better reply minus the worse); `data.eval_path`
names a held-out file instead. A finished run writes the mean and std of its scores on its
training replies to `reward_scores.json`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp

from jaxllm.checkpoint import load_run_params
from jaxllm.config import REWARD_HEAD, Config
from jaxllm.data.comparison_batches import ComparisonBatches, comparison_splits
from jaxllm.errors import ConfigError
from jaxllm.losses import sequence_scores
from jaxllm.model import LanguageModel
from jaxllm.rl.preference_losses import all_pairs_loss, centring_penalty, plackett_luce_loss
from jaxllm.sharding import tree_shardings
from jaxllm.stages.common import (
    SCORES_FILE,
    announce,
    configured_mesh,
    load_configured_tokenizer,
    params_from_run,
)
from jaxllm.state import abstract_with_shardings
from jaxllm.steps import LossAux
from jaxllm.trainer import RunResult, Stage, by_step, run_training


def comparison_scores(model, params, batch) -> jax.Array:
    """(B, K) float32: the reward head's score of every reply of a packed batch of
    comparisons (`ComparisonArrays.take`), in one forward pass over its B rows."""
    return sequence_scores(
        model,
        params,
        REWARD_HEAD,
        batch["tokens_nt"],
        batch["positions_nt"],
        batch["segment_ids_nt"],
        batch["end_nk"],
        batch["prefix_segment_ids_nt"],
    )


def reward_loss(model, params, batch, *, loss: str, center_coefficient: float):
    """`comparison_loss` of the reward head's scores of `batch`."""
    scores_bk = comparison_scores(model, params, batch)
    return comparison_loss(scores_bk, batch, loss=loss, center_coefficient=center_coefficient)


def comparison_loss(scores_bk, batch, *, loss: str, center_coefficient: float):
    """(loss summed over comparisons, LossAux) of the (B, K) scores of a batch's replies:
    per comparison, `all_pairs_loss` (`pairs`, less each pair's required margin inside
    the logistic: -log s(r_chosen - r_rejected - m) for a pair) or `plackett_luce_loss`
    (which has no margin: `reward` refuses data with one), plus c x
    `centring_penalty`, c = `center_coefficient`: c (r_chosen + r_rejected)^2 for a pair,
    c x the mean of (r_i + r_j)^2 over a ranking's pairs; padding replies count nowhere.
    Denominator = comparisons with a pair; means `accuracy` over pairs (ties 0.5), and
    `decided_accuracy` and `margin` over the pairs whose label is not a tie."""
    target_bkk, pair_bkk, valid_bk = batch["target_nkk"], batch["pair_nkk"], batch["valid_nk"]
    if loss == "plackett_luce":
        loss_b = plackett_luce_loss(scores_bk, batch["ranks_nk"], valid_bk)
    else:
        loss_b = all_pairs_loss(scores_bk, target_bkk, pair_bkk, batch["required_margin_nkk"])
    counted_b = jnp.any(pair_bkk, axis=(1, 2))
    if center_coefficient:
        loss_b = loss_b + center_coefficient * centring_penalty(scores_bk, pair_bkk)
    margin_bkk = scores_bk[:, :, None] - scores_bk[:, None, :]
    agreement_bkk = jnp.where(
        (target_bkk == 0.5) | (margin_bkk == 0),
        0.5,
        ((target_bkk > 0.5) == (margin_bkk > 0)).astype(jnp.float32),
    )
    decided_bkk = pair_bkk & (target_bkk != 0.5)
    better_margin_bkk = jnp.where(target_bkk > 0.5, margin_bkk, -margin_bkk)
    return jnp.sum(jnp.where(counted_b, loss_b, 0.0)), LossAux(
        jnp.sum(counted_b).astype(jnp.float32),
        means={
            "accuracy": (jnp.sum(jnp.where(pair_bkk, agreement_bkk, 0.0)), jnp.sum(pair_bkk)),
            "decided_accuracy": (
                jnp.sum(jnp.where(decided_bkk, agreement_bkk, 0.0)),
                jnp.sum(decided_bkk),
            ),
            "margin": (
                jnp.sum(jnp.where(decided_bkk, better_margin_bkk, 0.0)),
                jnp.sum(decided_bkk),
            ),
        },
        # comparisons with a decided pair: the count an accuracy's noise is judged on (a
        # ranking's pairs share replies, so counting its pairs would understate it)
        totals={
            "decided_comparisons": jnp.sum(jnp.any(decided_bkk, axis=(1, 2)), dtype=jnp.float32)
        },
    )


def reward(cfg: Config) -> RunResult:
    """Train a reward model on `data.path` in `cfg.out_dir` (resuming if it holds a run)."""
    if REWARD_HEAD not in cfg.model.scalar_heads:  # recorded in config.yaml: the run loads whole
        heads = [*cfg.model.scalar_heads, REWARD_HEAD]
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, scalar_heads=heads))
    mesh = configured_mesh(cfg)
    tokenizer = load_configured_tokenizer(cfg)
    max_replies = cfg.reward.max_replies
    train, held_out, report = comparison_splits(cfg, tokenizer, max_replies, "reward.max_replies")
    if cfg.reward.loss == "plackett_luce" and report.soft_labels:
        raise ConfigError(
            f"reward.loss=plackett_luce has no soft labels, but {report.soft_labels} comparisons "
            "carry a label_probability; use reward.loss=pairs"
        )
    if cfg.reward.loss == "plackett_luce" and report.margins:
        raise ConfigError(
            f"reward.loss=plackett_luce has no margins, but {report.margins} pairs carry a "
            "'margin'; use reward.loss=pairs"
        )
    seq_len = cfg.train.seq_len
    model = LanguageModel(cfg.model, lora=cfg.lora)
    batches = ComparisonBatches(
        train, cfg.train.batch_size, mesh, cfg.train.seed, cfg.data.group_by_length
    )
    stage = Stage(
        name="reward",
        model=model,
        batch=by_step(batches),
        tokens_per_step=cfg.train.batch_size * seq_len,
        **batches.stage_fields(),
        loss_fn=functools.partial(
            reward_loss, loss=cfg.reward.loss, center_coefficient=cfg.reward.center_coefficient
        ),
        eval_batches=ComparisonBatches(held_out, cfg.train.batch_size, mesh, 0).in_order(),
        initial_params=params_from_run(cfg.reward.init_from, "reward.init_from", cfg.lora)
        if cfg.reward.init_from
        else None,
    )
    announce(
        "reward",
        f"{report.summary()}; {len(train.end_nk)} train and {len(held_out.end_nk)} held-out "
        f"comparisons fit seq_len {seq_len}, {report.dropped_too_long} dropped as too long",
    )
    result = run_training(cfg, stage, mesh)
    if result.stopped_by_signal is None:
        scoring = ComparisonBatches(train, cfg.train.batch_size, mesh, 0).in_order()
        write_score_statistics(cfg, model, mesh, scoring)
    return result


def write_score_statistics(cfg: Config, model: LanguageModel, mesh, batches) -> dict:
    """Mean and std of the trained model's scores over every reply of `batches` (its
    training data: the SFT model's own samples when the labels came from `jaxllm label`),
    written to `out_dir/reward_scores.json`; PPO normalises its reward with them."""
    shardings = tree_shardings(mesh, model.abstract_params, model.logical_axes, model.rules)
    abstract = abstract_with_shardings(model.abstract_params, shardings)
    params = load_run_params(cfg.out_dir, abstract, None, "out_dir")

    @jax.jit
    def sums(params, batch):
        scores_bk = comparison_scores(model, params, batch)
        valid_bk = batch["valid_nk"]
        return (
            jnp.sum(valid_bk),
            jnp.sum(jnp.where(valid_bk, scores_bk, 0.0)),
            jnp.sum(jnp.where(valid_bk, scores_bk**2, 0.0)),
        )

    count = total = squares = 0.0
    with jax.set_mesh(mesh):
        for batch in batches():
            c, s, q = (float(x) for x in jax.device_get(sums(params, batch)))
            count, total, squares = count + c, total + s, squares + q
    mean = total / count
    statistics = {
        "mean": mean,
        "std": max(squares / count - mean**2, 0.0) ** 0.5,
        "replies": int(count),
        "data": cfg.data.path,
    }
    if jax.process_index() == 0:
        path = Path(cfg.out_dir) / SCORES_FILE
        partial = path.with_name(path.name + ".partial")
        partial.write_text(json.dumps(statistics, indent=1) + "\n")
        os.replace(partial, path)
    return statistics
