"""Losses that learn from comparisons, per comparison (B rows, K replies): a reward
model's, and DPO's, which needs none.

- `pairwise_loss`: Bradley-Terry with a target probability p that reply a beats reply b,
  -[p log s(d) + (1 - p) log s(-d)], d = r_a - r_b, s the logistic function. Hard labels
  (p = 1), ties (p = 0.5) and soft AI labels are one formula.
- `all_pairs_loss`: a ranking of K replies as its C(K, 2) pairs, each pair's target from
  the ranks (1, 0, or 0.5 for a tie), averaged within the ranking so every ranking weighs
  the same (InstructGPT, Ouyang 2022, which also scores all K replies in one batch). A
  pair's `margin` m shifts d to d - m: -log s(r_chosen - r_rejected - m), TRL's reward loss.
- `centring_penalty`: (r_a + r_b)^2 per pair, averaged within the comparison, which a
  reward model adds x c to pull each comparison's scores to 0 (TRL's
  `center_rewards_coefficient`, Eisenstein et al. 2023; a ranking as its pairs).
- `plackett_luce_loss`: -sum_i [r_(i) - logsumexp_{j >= i} r_(j)] over the replies in
  rank order (best first): the likelihood of the whole ranking (Plackett 1975, Luce 1959;
  for K = 2 it is Bradley-Terry). Ties are broken by reply index, since Plackett-Luce has
  no tie; use `all_pairs_loss` for data with many ties.
- `dpo_loss`: DPO (Rafailov et al. 2023) over the same pairs, with the policy's implicit
  reward beta * (log pi(y) - log pi_ref(y)) as the score: for a pair with margin
  d = logratio_a - logratio_b and target p, -[p log s(beta d) + (1 - p) log s(-beta d)]
  (hard labels: -log s(beta d); a soft target is label smoothing, the "conservative DPO"
  of Mitchell 2023, with p -> (1 - e) p + e (1 - p)); or IPO (Azar et al. 2023),
  p (d - 1/(2 beta))^2 + (1 - p) (d + 1/(2 beta))^2, which for p = 1 is the paper's
  (d - 1/(2 beta))^2 and in general is least at d = (2p - 1) / (2 beta).
- Two reference-free members of the family (no frozen reference; the score of a reply is
  its own, from `reference_free_scores`): SimPO (Meng et al. 2024), the mean log-prob per
  token with a target margin gamma, -[p log s(beta d - gamma) + (1 - p) log s(-beta d -
  gamma)]; and ORPO (Hong et al. 2024), the log odds of that mean, a - log(1 - e^a), under
  beta x Bradley-Terry (the caller adds ORPO's NLL of the preferred reply).

Where this departs from the papers: InstructGPT averages the pair losses of a ranking; we
do the same, and callers average over rankings with the (sum, denominator) contract. IPO's
log-probabilities are sums over the reply, as DPO's (TRL divides them by the length). A soft
target p weighs SimPO's two directions each with its margin gamma (TRL's CPO trainer
instead subtracts gamma from the preferred side in both of its label-smoothed terms); for
p = 1 the two agree.
Scores are float32 whatever the compute dtype.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp

from jaxllm.config import DPO_LOSSES, REFERENCE_FREE_LOSSES


def bradley_terry_loss(margin: jax.Array, probability: jax.Array) -> jax.Array:
    """float32, any shape: -[p log s(d) + (1 - p) log s(-d)], d the margin of a over b and
    p = P(a beats b)."""
    margin = margin.astype(jnp.float32)
    p = probability.astype(jnp.float32)
    return -(p * jax.nn.log_sigmoid(margin) + (1 - p) * jax.nn.log_sigmoid(-margin))


def pairwise_loss(
    score_a_b: jax.Array, score_b_b: jax.Array, probability_a_b: jax.Array
) -> jax.Array:
    """(B,) float32: -[p log s(r_a - r_b) + (1 - p) log s(r_b - r_a)], p = P(a beats b)."""
    chex.assert_equal_shape([score_a_b, score_b_b, probability_a_b])
    margin_b = score_a_b.astype(jnp.float32) - score_b_b.astype(jnp.float32)
    return bradley_terry_loss(margin_b, probability_a_b)


def mean_over_pairs(loss_bkk: jax.Array, pair_bkk: jax.Array) -> jax.Array:
    """(B,): each comparison's mean of `loss_bkk` over the pairs `pair_bkk` marks (0 when it
    has none). Unmarked entries are selected away, so they may hold inf or NaN."""
    num_pairs_b = jnp.sum(pair_bkk, axis=(1, 2))
    return jnp.sum(jnp.where(pair_bkk, loss_bkk, 0.0), axis=(1, 2)) / jnp.maximum(num_pairs_b, 1)


def rank_targets(ranks_bk: jax.Array, valid_bk: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(target_bkk, pair_bkk) of rankings: target[b, i, j] = P(reply i beats reply j) = 1
    when i ranks better (lower rank), 0 when worse, 0.5 for a tie; pair[b, i, j] marks each
    pair i < j of valid replies once."""
    chex.assert_equal_shape([ranks_bk, valid_bk])
    k = ranks_bk.shape[1]
    rank_i, rank_j = ranks_bk[:, :, None], ranks_bk[:, None, :]
    target_bkk = jnp.where(rank_i < rank_j, 1.0, jnp.where(rank_i > rank_j, 0.0, 0.5))
    upper_kk = jnp.triu(jnp.ones((k, k), bool), k=1)
    return target_bkk, upper_kk & valid_bk[:, :, None] & valid_bk[:, None, :]


def all_pairs_loss(
    scores_bk: jax.Array,
    target_bkk: jax.Array,
    pair_bkk: jax.Array,
    required_margin_bkk: jax.Array | None = None,
) -> jax.Array:
    """(B,) float32: per comparison, the mean over the pairs `pair_bkk` marks of
    -[p log s(d - m) + (1 - p) log s(m - d)], reply i against reply j: d = r_i - r_j,
    p = target[b, i, j] (from `rank_targets`, or a soft label) and m = the gap i should
    win by, `required_margin_bkk` (TRL's `margin`; 0 when None). A comparison without
    pairs gives 0."""
    chex.assert_equal_shape([target_bkk, pair_bkk])
    scores_bk = scores_bk.astype(jnp.float32)
    margin_bkk = scores_bk[:, :, None] - scores_bk[:, None, :]
    if required_margin_bkk is not None:
        chex.assert_equal_shape([required_margin_bkk, pair_bkk])
        margin_bkk = margin_bkk - required_margin_bkk.astype(jnp.float32)
    return mean_over_pairs(bradley_terry_loss(margin_bkk, target_bkk), pair_bkk)


def centring_penalty(scores_bk: jax.Array, pair_bkk: jax.Array) -> jax.Array:
    """(B,) float32: per comparison, the mean of (r_i + r_j)^2 over the pairs `pair_bkk`
    marks (0 without pairs). A pair gives TRL's term, (r_chosen + r_rejected)^2. K replies
    with all C(K, 2) pairs marked give ((K - 2) sum_i r_i^2 + (sum_i r_i)^2) / C(K, 2):
    beyond K = 2 it also shrinks the scores' spread, as TRL would on a ranking's pairs."""
    b, k = scores_bk.shape
    chex.assert_shape(pair_bkk, (b, k, k))
    scores_bk = scores_bk.astype(jnp.float32)
    sum_bkk = scores_bk[:, :, None] + scores_bk[:, None, :]
    return mean_over_pairs(sum_bkk**2, pair_bkk)


def plackett_luce_loss(scores_bk: jax.Array, ranks_bk: jax.Array, valid_bk: jax.Array) -> jax.Array:
    """(B,) float32 negative log-likelihood of each ranking under Plackett-Luce:
    -sum over positions i of [r_(i) - logsumexp_{j >= i} r_(j)], replies in rank order
    (ties broken by index), padding replies (`valid_bk` False) left out."""
    chex.assert_equal_shape([scores_bk, ranks_bk, valid_bk])
    k = scores_bk.shape[1]
    # Order replies best first; padding goes last (rank k) and is masked out.
    sort_key_bk = jnp.where(valid_bk, ranks_bk, k) * k + jnp.arange(k)
    order_bk = jnp.argsort(sort_key_bk, axis=1)
    scores_bk = jnp.take_along_axis(scores_bk.astype(jnp.float32), order_bk, axis=1)
    valid_bk = jnp.take_along_axis(valid_bk, order_bk, axis=1)
    masked_bk = jnp.where(valid_bk, scores_bk, -jnp.inf)
    # logsumexp over the suffix j >= i: a reverse cumulative logsumexp.
    suffix_bk = jax.lax.cumlogsumexp(masked_bk, axis=1, reverse=True)
    term_bk = jnp.where(valid_bk, scores_bk - suffix_bk, 0.0)
    return -jnp.sum(term_bk, axis=1)


# ORPO's log odds need a mean log-prob below 0; a reply the policy is sure of (every token
# at probability 1 in float32) is read at this mean instead of at infinite odds.
ORPO_MAX_MEAN_LOGP = -1e-6


def reference_free_scores(logp_bk: jax.Array, tokens_bk: jax.Array, loss: str) -> jax.Array:
    """(B, K) float32 score of each reply for `loss` (simpo or orpo) from its summed
    log-prob `logp_bk` and its token count `tokens_bk`: the mean a = logp / tokens
    (simpo), or its log odds a - log(1 - e^a) (orpo; a at most `ORPO_MAX_MEAN_LOGP`)."""
    mean_bk = logp_bk.astype(jnp.float32) / jnp.maximum(tokens_bk.astype(jnp.float32), 1.0)
    if loss == "simpo":
        return mean_bk
    if loss == "orpo":
        mean_bk = jnp.minimum(mean_bk, ORPO_MAX_MEAN_LOGP)
        return mean_bk - jnp.log(-jnp.expm1(mean_bk))
    raise ValueError(f"'{loss}' is not one of {', '.join(REFERENCE_FREE_LOSSES)}")


def dpo_loss(
    score_bk: jax.Array,
    target_bkk: jax.Array,
    pair_bkk: jax.Array,
    *,
    beta: float,
    loss: str = "sigmoid",
    label_smoothing: float = 0.0,
    gamma: float = 0.0,
) -> jax.Array:
    """(B,) float32: per comparison, the mean DPO (`sigmoid`), IPO (`ipo`), SLiC hinge
    (`hinge`), SimPO (`simpo`) or ORPO (`orpo`, its preference term) loss over the pairs
    `pair_bkk` marks, reply i against reply j with target P(i better) = target[b, i, j]
    = p and d = score_i - score_j:

        sigmoid:  -p log s(beta d) - (1 - p) log s(-beta d)
        ipo:      p (d - 1 / (2 beta))^2 + (1 - p) (d + 1 / (2 beta))^2
        hinge:    p max(0, 1 - beta d) + (1 - p) max(0, 1 + beta d)
        simpo:    -p log s(beta d - gamma) - (1 - p) log s(-beta d - gamma)
        orpo:     beta x (-p log s(d) - (1 - p) log s(-d))

    Args:
        score_bk: (B, K) per reply: log pi(y_k) - log pi_ref(y_k), each summed over the
            reply (sigmoid, ipo, hinge), or `reference_free_scores` (simpo, orpo).
        target_bkk: (B, K, K) from `rank_targets` or a soft label; `label_smoothing` e
            turns p into (1 - e) p + e (1 - p).
        pair_bkk: (B, K, K) bool, each compared pair i < j once.
        gamma: SimPO's target margin (simpo only).
    """
    chex.assert_equal_shape([target_bkk, pair_bkk])
    score_bk = score_bk.astype(jnp.float32)
    d_bkk = score_bk[:, :, None] - score_bk[:, None, :]
    p_bkk = target_bkk.astype(jnp.float32)
    p_bkk = (1 - label_smoothing) * p_bkk + label_smoothing * (1 - p_bkk)
    if loss == "sigmoid":
        loss_bkk = bradley_terry_loss(beta * d_bkk, p_bkk)
    elif loss == "ipo":
        half_gap = 1 / (2 * beta)
        loss_bkk = p_bkk * (d_bkk - half_gap) ** 2 + (1 - p_bkk) * (d_bkk + half_gap) ** 2
    elif loss == "hinge":
        relu = jax.nn.relu
        loss_bkk = p_bkk * relu(1 - beta * d_bkk) + (1 - p_bkk) * relu(1 + beta * d_bkk)
    elif loss == "simpo":
        loss_bkk = -(
            p_bkk * jax.nn.log_sigmoid(beta * d_bkk - gamma)
            + (1 - p_bkk) * jax.nn.log_sigmoid(-beta * d_bkk - gamma)
        )
    elif loss == "orpo":
        loss_bkk = beta * bradley_terry_loss(d_bkk, p_bkk)
    else:
        raise ValueError(f"unknown DPO loss '{loss}'; use one of {', '.join(DPO_LOSSES)}")
    return mean_over_pairs(loss_bkk, pair_bkk)
