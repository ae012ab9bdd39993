"""DPO: learn from comparisons (pairs or rankings) without a reward model.

The policy and a frozen copy of it (`state.extras["ref_params"]`, no optimizer slots) both start
from `dpo.policy_from` (the reference-free losses, simpo and orpo, keep no copy). Each
comparison (a pair, or a ranking of K replies: all its pairs, averaged within it as the
reward model does) is one batch element whose K rows are scored
in one forward pass: the log-probability of each reply, summed over its tokens (contents
and closing `<|im_end|>`; `token_logprobs`, the sampler's function, over the real
vocabulary), under the policy and under the reference. The implicit reward of a reply is
r = beta * (log pi(y) - log pi_ref(y)) and the loss `dpo_loss` (DPO's -log s(r_a - r_b),
with soft targets for label smoothing, ties and `label_probability`; or IPO, or SLiC's
hinge), plus with `dpo.nll_coef` RPO's negative log-likelihood of the best reply. The
reference's log-probs are computed in the same compiled step, per micro-batch. SimPO
scores a reply by beta x its mean log-prob per token, with a target margin
`dpo.simpo_gamma`; ORPO by the log odds of that mean, plus the best reply's NLL per token
(`rl.preference_losses.reference_free_scores`); their implicit reward is beta x that score.

Train and eval lines log `loss`, and over the pairs the labels decide (not ties),
`accuracy` (share with a positive implicit-reward margin), `margin`, `reward_chosen` and
`reward_rejected` (mean implicit rewards), `logp_chosen` and `logp_rejected` (mean summed
log-probs under the policy: both often fall while the margin grows), and `nll_best`
(`best_reply_nll`: the best reply's negative log-likelihood per token). Eval is on the
held-out comparisons (`data.eval_path`, or the last `data.val_fraction`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxllm.config import REFERENCE_FREE_LOSSES, Config
from jaxllm.data.comparison_batches import (
    FIRST_REPLY_SEGMENT,
    ComparisonBatches,
    comparison_splits,
)
from jaxllm.errors import ConfigError
from jaxllm.losses import token_logprobs
from jaxllm.model import LanguageModel, Params
from jaxllm.rl.preference_losses import dpo_loss, reference_free_scores
from jaxllm.sharding import replicated
from jaxllm.stages.common import (
    announce,
    configured_mesh,
    load_configured_tokenizer,
    params_from_run,
)
from jaxllm.state import TrainState, reference_params, with_reference
from jaxllm.steps import LossAux, UpdateContext, normalised_metrics, train_step
from jaxllm.trainer import RunResult, Stage, by_step, run_training


def reply_logprobs(model: LanguageModel, params: Params, batch, vocab_size: int) -> jax.Array:
    """(B, K) float32: log pi(reply) of every reply of a packed batch of comparisons
    (`ComparisonArrays.take`: the prompt once, then each reply attending to it), the sum of
    `token_logprobs` over the tokens `reply_mask_nt` marks in reply k's segment, in one
    forward pass over its B rows. A token is read from the hidden state of its `source_nt`
    column: the one before it, or for a reply's first token the prompt's last. Padding
    (segment 0) and the other replies are neither attended to nor counted.

    Only the R reply columns of a row (`reply_columns_nr`) are read: with unrolled layers
    the last layer runs its queries, MLP and the logits there alone (the prompt's columns
    give it keys and values only)."""
    columns_br = batch["reply_columns_nr"]
    read_br = columns_br >= 0
    columns_br = jnp.maximum(columns_br, 0)

    def at_replies(x_bt):
        return jnp.take_along_axis(x_bt, columns_br, axis=1)

    hidden_brd = model.hidden(
        params,
        batch["tokens_nt"],
        batch["positions_nt"],
        batch["segment_ids_nt"],
        batch["prefix_segment_ids_nt"],
        at_replies(batch["source_nt"]),
    )
    logits_brv = model.logits_from_hidden(params, hidden_brd)
    logprobs_br = token_logprobs(logits_brv, at_replies(batch["tokens_nt"]), vocab_size=vocab_size)
    counted_brk = jnp.take_along_axis(reply_tokens(batch), columns_br[:, :, None], axis=1)
    counted_brk = jnp.where(read_br[:, :, None], counted_brk, 0.0)
    logprobs_br = jnp.where(jnp.any(counted_brk > 0, axis=-1), logprobs_br, 0.0)
    return jnp.sum(logprobs_br[:, :, None] * counted_brk, axis=1)  # exact f32 (no matmul)


def reply_tokens(batch) -> jax.Array:
    """(B, T, K) float32: 1 where a packed row's token counts toward reply k's log-prob
    (its reply mask, in segment `FIRST_REPLY_SEGMENT` + k)."""
    k = batch["end_nk"].shape[1]
    in_reply_btk = batch["segment_ids_nt"][:, :, None] == FIRST_REPLY_SEGMENT + jnp.arange(k)
    return (in_reply_btk & batch["reply_mask_nt"][:, :, None]).astype(jnp.float32)


def reply_token_counts(batch) -> jax.Array:
    """(B, K) float32: the tokens `reply_logprobs` sums over, per reply."""
    return jnp.sum(reply_tokens(batch), axis=1)


def best_reply_nll(logp_bk: jax.Array, counts_bk: jax.Array, batch) -> jax.Array:
    """(B,) float32: -log pi(y) / |y| of each comparison's best-ranked reply (`counts_bk`
    its tokens), averaged over replies tied for best; 0 for an empty comparison."""
    valid_bk = batch["valid_nk"]
    ranks_bk = jnp.where(valid_bk, batch["ranks_nk"], jnp.iinfo(jnp.int32).max)
    best_bk = valid_bk & (ranks_bk == jnp.min(ranks_bk, axis=1, keepdims=True))
    nll_bk = -logp_bk / jnp.maximum(counts_bk, 1.0)
    return jnp.sum(jnp.where(best_bk, nll_bk, 0.0), axis=1) / jnp.maximum(
        jnp.sum(best_bk, axis=1), 1
    )


def dpo_comparison_loss(
    model: LanguageModel,
    params: Params,
    batch,
    *,
    ref_params: Params | None,
    beta: float,
    loss: str,
    label_smoothing: float,
    vocab_size: int,
    nll_coef: float = 0.0,
    simpo_gamma: float = 0.0,
):
    """(loss summed over comparisons, LossAux): denominator = comparisons with a pair; the
    module docstring's metrics as (sum, count) over the decided pairs of the batch.
    `nll_coef` > 0 adds RPO's term: nll_coef x the best-ranked reply's negative
    log-likelihood per token (the mean over replies tied for best); orpo adds that term
    with weight 1 on its own. `ref_params` is not read by the reference-free losses."""
    logp_bk = reply_logprobs(model, params, batch, vocab_size)
    counts_bk = reply_token_counts(batch)
    if loss in REFERENCE_FREE_LOSSES:
        score_bk = reference_free_scores(logp_bk, counts_bk, loss)
    else:
        ref_logp_bk = jax.lax.stop_gradient(reply_logprobs(model, ref_params, batch, vocab_size))
        score_bk = logp_bk - ref_logp_bk
    target_bkk, pair_bkk = batch["target_nkk"], batch["pair_nkk"]
    loss_b = dpo_loss(
        score_bk,
        target_bkk,
        pair_bkk,
        beta=beta,
        loss=loss,
        label_smoothing=label_smoothing,
        gamma=simpo_gamma,
    )
    counted_b = jnp.any(pair_bkk, axis=(1, 2))
    nll_b = best_reply_nll(logp_bk, counts_bk, batch)
    nll_weight = nll_coef + (1.0 if loss == "orpo" else 0.0)
    if nll_weight > 0:
        loss_b = loss_b + nll_weight * nll_b
    # Decided pairs, oriented: (chosen, rejected) = (i, j) when i is preferred, else (j, i).
    decided_bkk = pair_bkk & (target_bkk != 0.5)
    i_chosen_bkk = target_bkk > 0.5
    reward_bk = beta * score_bk

    def oriented(values_bk):
        a_bkk, b_bkk = values_bk[:, :, None], values_bk[:, None, :]
        return jnp.where(i_chosen_bkk, a_bkk, b_bkk), jnp.where(i_chosen_bkk, b_bkk, a_bkk)

    reward_chosen_bkk, reward_rejected_bkk = oriented(reward_bk)
    logp_chosen_bkk, logp_rejected_bkk = oriented(logp_bk)
    margin_bkk = reward_chosen_bkk - reward_rejected_bkk
    num_decided = jnp.sum(decided_bkk)

    def decided_mean(values_bkk):
        return jnp.sum(jnp.where(decided_bkk, values_bkk, 0.0)), num_decided

    return jnp.sum(jnp.where(counted_b, loss_b, 0.0)), LossAux(
        jnp.sum(counted_b).astype(jnp.float32),
        means={
            "accuracy": decided_mean((margin_bkk > 0).astype(jnp.float32)),
            "margin": decided_mean(margin_bkk),
            "reward_chosen": decided_mean(reward_chosen_bkk),
            "reward_rejected": decided_mean(reward_rejected_bkk),
            "logp_chosen": decided_mean(logp_chosen_bkk),
            "logp_rejected": decided_mean(logp_rejected_bkk),
            "nll_best": (jnp.sum(jnp.where(counted_b, nll_b, 0.0)), jnp.sum(counted_b)),
        },
        totals={
            "decided_comparisons": jnp.sum(jnp.any(decided_bkk, axis=(1, 2)), dtype=jnp.float32)
        },
    )


def reference_of(model: LanguageModel, state: TrainState) -> Params | None:
    """The reference policy's params, None for the reference-free losses (no reference
    kept: no `ref_params` extra, no adapters)."""
    if model.lora is None and "ref_params" not in state.extras:
        return None
    return reference_params(model, state)


def dpo_update(context: UpdateContext):
    """One optimizer step on the DPO loss against the state's own frozen reference (None
    for the reference-free losses)."""

    def update(state: TrainState, batch):
        loss_fn = functools.partial(context.loss_fn, ref_params=reference_of(context.model, state))
        return train_step(
            state,
            batch,
            model=context.model,
            tx=context.tx,
            schedule=context.schedule,
            loss_fn=loss_fn,
            grad_accum=context.grad_accum,
        )

    return update


def held_out_eval(model: LanguageModel, loss_fn, batches, mesh):
    """A Stage.extra_eval: `loss_fn`'s metrics over every held-out comparison, the policy
    against the state's reference, if it keeps one (the loop's own eval step knows only the
    params)."""

    @functools.partial(jax.jit, out_shardings=replicated(mesh))
    def sums(params, ref_params, batch):
        return loss_fn(model, params, batch, ref_params=ref_params)

    def evaluate(state: TrainState, key) -> dict[str, float]:
        total = None
        with jax.set_mesh(mesh):
            for batch in batches():
                result = sums(state.params, reference_of(model, state), batch)
                total = result if total is None else jax.tree.map(jnp.add, total, result)
        metrics = normalised_metrics(*total)
        return {name: float(value) for name, value in jax.device_get(metrics).items()}

    return evaluate


def dpo(cfg: Config) -> RunResult:
    """Train the policy of `dpo.policy_from` on the comparisons of `data.path` with DPO,
    in `cfg.out_dir` (resuming if it holds a run)."""
    if not cfg.dpo.policy_from:
        raise ConfigError(
            "dpo.policy_from is not set; pass the out_dir of an SFT run (the policy, and the "
            "frozen reference if the loss has one, start from it)"
        )
    mesh = configured_mesh(cfg)
    tokenizer = load_configured_tokenizer(cfg)
    train, held_out, report = comparison_splits(
        cfg, tokenizer, cfg.dpo.max_replies, "dpo.max_replies"
    )
    model = LanguageModel(cfg.model, lora=cfg.lora)
    loss_fn = functools.partial(
        dpo_comparison_loss,
        beta=cfg.dpo.beta,
        loss=cfg.dpo.loss,
        label_smoothing=cfg.dpo.label_smoothing,
        vocab_size=tokenizer.vocab_size,
        nll_coef=cfg.dpo.nll_coef,
        simpo_gamma=cfg.dpo.simpo_gamma,
    )
    keeps_reference = cfg.dpo.loss not in REFERENCE_FREE_LOSSES
    batch_size, seq_len = cfg.train.batch_size, cfg.train.seq_len
    batches = ComparisonBatches(train, batch_size, mesh, cfg.train.seed, cfg.data.group_by_length)
    stage = Stage(
        name="dpo",
        model=model,
        batch=by_step(batches),
        tokens_per_step=batch_size * seq_len,
        **batches.stage_fields(),
        loss_fn=loss_fn,
        update=dpo_update,
        extend_state=functools.partial(with_reference, model) if keeps_reference else None,
        extra_eval=held_out_eval(
            model, loss_fn, ComparisonBatches(held_out, batch_size, mesh, 0).in_order(), mesh
        ),
        initial_params=params_from_run(cfg.dpo.policy_from, "dpo.policy_from", cfg.lora),
    )
    announce(
        "dpo",
        f"{report.summary()}; {len(train.end_nk)} train and {len(held_out.end_nk)} held-out "
        f"comparisons fit seq_len {seq_len}, {report.dropped_too_long} dropped as too long; "
        f"loss {cfg.dpo.loss}, beta {cfg.dpo.beta}"
        + (f", gamma {cfg.dpo.simpo_gamma}" if cfg.dpo.loss == "simpo" else "")
        + (", + best reply NLL" if cfg.dpo.loss == "orpo" else "")
        + (f", + {cfg.dpo.nll_coef} x best reply NLL (RPO)" if cfg.dpo.nll_coef else "")
        + ("" if keeps_reference else "; no reference policy"),
    )
    return run_training(cfg, stage, mesh)
