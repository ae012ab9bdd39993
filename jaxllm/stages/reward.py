"""Reward model: the backbone plus a scalar `reward` head, trained on comparisons.

Each comparison (a prompt and K >= 2 replies, ranked; see `jaxllm.data.preferences`) is
one batch element: its K prompt+reply rows are scored in the same forward pass, the score
read at each reply's closing `<|im_end|>`. The loss is Bradley-Terry over every pair of a
comparison, averaged within it (`reward.loss=pairs`; ties and soft labels are targets of
0.5 and p), or the Plackett-Luce likelihood of the ranking (`plackett_luce`), plus an
optional centring term c * (mean score)^2. A comparison's rows stay together, so micro-
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
import numpy as np

from jaxllm.checkpoint import load_run_params
from jaxllm.config import Config
from jaxllm.data.preferences import PreferenceReport, read_comparisons, render_comparison
from jaxllm.errors import ConfigError, DataError
from jaxllm.losses import sequence_scores
from jaxllm.model import LanguageModel
from jaxllm.rl.preference_losses import all_pairs_loss, plackett_luce_loss
from jaxllm.sharding import put_batch, tree_shardings
from jaxllm.stages.common import (
    SCORES_FILE,
    announce,
    configured_mesh,
    load_configured_tokenizer,
    params_from_run,
)
from jaxllm.state import abstract_with_shardings
from jaxllm.steps import LossAux
from jaxllm.tokenizer import Tokenizer
from jaxllm.trainer import RunResult, Stage, by_step, run_training

HEAD = "reward"


@dataclasses.dataclass
class ComparisonArrays:
    """N comparisons of up to K replies as rows of T tokens (right-padded)."""

    tokens_nkt: np.ndarray  # int32
    segment_ids_nkt: np.ndarray  # int32: 1 on a reply's prompt + reply, 0 on padding
    end_nk: np.ndarray  # int32: index of each reply's closing <|im_end|>
    ranks_nk: np.ndarray  # int32: 0 = best
    valid_nk: np.ndarray  # bool: a real reply (not padding of a shorter ranking)
    target_nkk: np.ndarray  # float32: P(reply i beats reply j)
    pair_nkk: np.ndarray  # bool: pairs i < j that the loss compares

    def take(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        """The batch of comparisons `rows` (-1: an empty comparison that counts nothing)."""
        batch = {
            name: getattr(self, name)[np.maximum(rows, 0)].copy()
            for name in (field.name for field in dataclasses.fields(self))
        }
        for name in ("valid_nk", "pair_nkk"):
            batch[name][rows < 0] = False
        return batch


def comparison_arrays(
    comparisons, tokenizer: Tokenizer, seq_len: int, max_replies: int, report: PreferenceReport
) -> ComparisonArrays:
    """Render every comparison; those with a reply longer than `seq_len` tokens are
    dropped (counted in `report.dropped_too_long`)."""
    kept = []
    for where, comparison in comparisons:
        if len(comparison.replies) > max_replies:
            raise DataError(
                f"{where}: {len(comparison.replies)} replies but reward.max_replies="
                f"{max_replies}; raise reward.max_replies"
            )
        rendered = render_comparison(tokenizer, comparison)
        if max(len(ids) for ids, _ in rendered) > seq_len:
            report.dropped_too_long += 1
            continue
        kept.append((comparison, rendered))
    n, k = len(kept), max_replies
    arrays = ComparisonArrays(
        tokens_nkt=np.full((n, k, seq_len), tokenizer.pad_id, np.int32),
        segment_ids_nkt=np.zeros((n, k, seq_len), np.int32),
        end_nk=np.zeros((n, k), np.int32),
        ranks_nk=np.zeros((n, k), np.int32),
        valid_nk=np.zeros((n, k), bool),
        target_nkk=np.full((n, k, k), 0.5, np.float32),
        pair_nkk=np.zeros((n, k, k), bool),
    )
    for row, (comparison, rendered) in enumerate(kept):
        for reply, (ids, end) in enumerate(rendered):
            arrays.tokens_nkt[row, reply, : len(ids)] = ids
            arrays.segment_ids_nkt[row, reply, : len(ids)] = 1
            arrays.end_nk[row, reply] = end
            arrays.valid_nk[row, reply] = True
        arrays.ranks_nk[row, : len(rendered)] = comparison.ranks
        for i, j, probability in comparison.pairs():
            arrays.target_nkk[row, i, j], arrays.pair_nkk[row, i, j] = probability, True
    return arrays


def comparison_scores(model, params, batch) -> jax.Array:
    """(B, K) float32: the reward head's score of every reply of a batch of comparisons,
    all B * K rows in one forward pass."""
    b, k, t = batch["tokens_nkt"].shape
    return sequence_scores(
        model,
        params,
        HEAD,
        batch["tokens_nkt"].reshape(b * k, t),
        jnp.broadcast_to(jnp.arange(t), (b * k, t)),
        batch["segment_ids_nkt"].reshape(b * k, t),
        batch["end_nk"].reshape(b * k),
    ).reshape(b, k)


def reward_loss(model, params, batch, *, loss: str, center_coefficient: float):
    """(loss summed over comparisons, LossAux): denominator = comparisons with a pair;
    means `accuracy` over pairs (ties 0.5), and `decided_accuracy` and `margin` over the
    pairs whose label is not a tie."""
    scores_bk = comparison_scores(model, params, batch)
    target_bkk, pair_bkk, valid_bk = batch["target_nkk"], batch["pair_nkk"], batch["valid_nk"]
    if loss == "plackett_luce":
        loss_b = plackett_luce_loss(scores_bk, batch["ranks_nk"], valid_bk)
    else:
        loss_b = all_pairs_loss(scores_bk, target_bkk, pair_bkk)
    counted_b = jnp.any(pair_bkk, axis=(1, 2))
    if center_coefficient:
        mean_score_b = jnp.sum(jnp.where(valid_bk, scores_bk, 0.0), 1) / jnp.maximum(
            jnp.sum(valid_bk, 1), 1
        )
        loss_b = loss_b + center_coefficient * mean_score_b**2
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
    )


class ComparisonBatches:
    """Global batches of `batch_size` comparisons by step: a fresh permutation of all
    comparisons each epoch (seeded by (seed, epoch)), so step s is the same batch after a
    resume. Every process builds the host batch and keeps its own rows."""

    def __init__(self, arrays: ComparisonArrays, batch_size: int, mesh, seed: int):
        self.arrays, self.batch_size, self.seed = arrays, batch_size, seed
        self.num = len(arrays.end_nk)
        self.mesh = mesh

    def rows(self, step: int) -> np.ndarray:
        positions = np.arange(step * self.batch_size, (step + 1) * self.batch_size)
        epochs = positions // self.num
        permutations = {
            epoch: np.random.default_rng([self.seed, int(epoch)]).permutation(self.num)
            for epoch in np.unique(epochs)
        }
        return np.array(
            [permutations[e][p % self.num] for e, p in zip(epochs, positions, strict=True)]
        )

    def place(self, host: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        return put_batch(host, self.mesh)

    def __call__(self, step: int) -> dict[str, jax.Array]:
        return self.place(self.arrays.take(self.rows(step)))

    def in_order(self):
        """Every comparison once, in order, the last batch filled with empty ones."""
        count = -(-self.num // self.batch_size)
        order = np.full(count * self.batch_size, -1)
        order[: self.num] = np.arange(self.num)
        return lambda: (
            self.place(self.arrays.take(rows)) for rows in order.reshape(count, self.batch_size)
        )


def reward(cfg: Config) -> RunResult:
    """Train a reward model on `data.path` in `cfg.out_dir` (resuming if it holds a run)."""
    if HEAD not in cfg.model.scalar_heads:  # recorded in config.yaml: the run loads whole
        heads = [*cfg.model.scalar_heads, HEAD]
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, scalar_heads=heads))
    mesh = configured_mesh(cfg)
    tokenizer = load_configured_tokenizer(cfg)
    if not cfg.data.path:
        raise DataError("data.path is not set; pass a preference .jsonl file or folder")
    report = PreferenceReport()
    comparisons = list(read_comparisons(cfg.data.path, report))
    if cfg.data.eval_path:
        train_comparisons = comparisons
        held_out_comparisons = list(read_comparisons(cfg.data.eval_path, report))
    else:
        split = int(round(len(comparisons) * (1 - cfg.data.val_fraction)))
        train_comparisons, held_out_comparisons = comparisons[:split], comparisons[split:]
    if cfg.reward.loss == "plackett_luce" and report.soft_labels:
        raise ConfigError(
            f"reward.loss=plackett_luce has no soft labels, but {report.soft_labels} comparisons "
            "carry a label_probability; use reward.loss=pairs"
        )
    seq_len, k = cfg.train.seq_len, cfg.reward.max_replies
    train = comparison_arrays(train_comparisons, tokenizer, seq_len, k, report)
    held_out = comparison_arrays(held_out_comparisons, tokenizer, seq_len, k, report)
    for name, arrays, needed in (
        ("training", train, cfg.train.batch_size),
        ("held-out", held_out, 1),
    ):
        if len(arrays.end_nk) < needed:
            raise DataError(
                f"{cfg.data.path}: {len(arrays.end_nk)} {name} comparisons fit "
                f"train.seq_len={seq_len} but at least {needed} are needed; add comparisons, "
                "raise train.seq_len, or change data.val_fraction"
            )
    model = LanguageModel(cfg.model)
    batches = ComparisonBatches(train, cfg.train.batch_size, mesh, cfg.train.seed)
    stage = Stage(
        name="reward",
        model=model,
        batch=by_step(batches),
        tokens_per_step=cfg.train.batch_size * k * seq_len,
        loss_fn=functools.partial(
            reward_loss, loss=cfg.reward.loss, center_coefficient=cfg.reward.center_coefficient
        ),
        eval_batches=ComparisonBatches(held_out, cfg.train.batch_size, mesh, 0).in_order(),
        initial_params=params_from_run(cfg.reward.init_from, "reward.init_from")
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
