"""RLHF with PPO: roll out, score with a frozen reward model, update inside a trusted region.

One iteration is one loop step:
1. `batch(state, step)`: B prompts (the step's share of a shuffled prompt order) are
   completed by the current policy (`Generator`, key fold_in(state.rng, step), stop at
   `<|im_end|>`); each row is the prompt left-padded to P tokens then N' completion
   columns (N' the power of two that holds the batch's longest reply, at most N: one
   compiled update per width), so completion token t sits in column P + t for every row.
   The simulated labelers' gold rule, when set, scores each reply's text on the host.
2. `update(state, batch)`, one compiled call with the state donated (`prepare` then
   `minibatch_update`):
   - the policy's log-probs and values, the reference's log-probs (the `ref_params` extra) and
     the reward model's score (the `reward_params` extra, read at the last completion token;
     with several reward runs, each member's normalised score, combined by
     `reward_aggregation`: mean, min, or mean - std over members, the conservative
     ensemble of Coste et al. 2023; their std is logged as `reward_disagreement`);
   - score s = (raw - mean) / std of the reward run's scores (`normalize_reward`), clipped
     to +-`reward_clip`, less `missing_eos_penalty` (>= 0, as TRL's) for a reply cut off
     before `<|im_end|>`;
   - per-token rewards r_t = -kl_coef * k1_t, plus s at the last completion token, with
     k1_t = log pi(y_t) - log pi_ref(y_t) (so sum_t r_t = s - kl_coef * sum_t k1_t);
   - GAE(gamma, lambda) advantages and returns; advantages whitened over the batch;
   - `epochs` x `minibatches` optimizer steps on the clipped surrogate (with `dual_clip`
     c: for A < 0 at most -A c per token, `dual_clip_fraction` logged) + vf_coef x the
     clipped value loss - entropy_coef x entropy, token-mean over each minibatch;
   - the adaptive KL controller (Ziegler et al. 2019): with KL the per-token mean k1 of
     the rollouts, kl_coef *= 1 + clip(KL / kl_target - 1, -0.2, 0.2) * B / kl_horizon.
     The target is per token (so it reads the same at any reply length); `kl` (per token)
     and `kl_sequence` (summed over a reply) are both logged. `kl_coef_min` floors it.
   Value V_t is the value head at column P + t - 1, the hidden state of the tokens before
   y_t: editing y_t cannot change V_t. The "old" log-probs are the trainer's own (first
   minibatch: ratio exactly 1); `logprob_gap` logs their mean |difference| to the
   sampler's.

Critic (`ppo.critic`). `shared`, the default: a value head on the policy's backbone
(params `heads.value`, zero at the start, so the first advantages are the rewards
themselves); `ppo.value_stop_gradient` keeps the value loss out of the backbone. One model
for both halves the memory and the forward passes, at the price of the two losses sharing
features (TRL's first PPO trainer, with its value-head model, did this); the default here
because it fits small hardware. `separate` (Stiennon et al. 2020; TRL's current PPO,
OpenRLHF and verl): a critic model of its own,
the `critic_params` extra, starting as the reward model (backbone, and the reward head scaled
to give the normalised score as the value), with its own AdamW state at `ppo.critic_lr`;
it steps on the same minibatches as the policy, after it, within the same compiled call.
The value loss is then the critic's alone (no vf_coef), and the policy has no value head.

Eval (every `train.eval_every` steps) on held-out prompts: mean reward-model score
(`reward`) and gold reward (`gold_reward`) of sampled replies, the same of greedy replies
(`*_greedy`), their KL to the reference, reply length, and from the second eval on each
reward's `*_change_se`, the paired standard error of its change since the first eval
(`stages.paired`); sampled replies of the first
`train.samples` prompts go to `out_dir/samples.jsonl`. With a gold rule, a one-line
warning says when the proxy's moving average over `hacking_window` evals rose while the
gold's fell (reward hacking). A collapse watch (`rl.watch.CollapseWatch`, `ppo.collapse_window`
iterations each side) warns when the rollouts' reward-model score falls while the policy's
entropy rises (the policy breaking apart: the step is too large) or the entropy collapses.

The checkpoint holds the policy, the reference, the reward model, kl_coef and a separate
critic with its optimizer state, and out_dir keeps the reward run's score statistics
(`reward_model.json`): a run resumes, and `generate`/`chat` load it, without the SFT and
reward runs' folders. The watches start afresh on a resume.
"""

from __future__ import annotations

import dataclasses
import functools
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxllm.config import REWARD_HEAD, VALUE_HEAD, Config, PPOConfig
from jaxllm.model import LanguageModel
from jaxllm.rl.advantages import (
    ADVANTAGE_ESTIMATORS,
    AdvantageInputs,
    masked_mean,
    masked_variance,
    masked_whiten,
)
from jaxllm.rl.kl import kl_k1
from jaxllm.rl.labelers import GOLD_RULES
from jaxllm.rl.policy_losses import clipped_policy_loss, clipped_value_loss
from jaxllm.rl.rollouts import (
    completion_outputs,
    group_rows,
    reward_model_scores,
    row_columns,
)
from jaxllm.rl.watch import CollapseWatch, HackingWatch
from jaxllm.sharding import put_batch, put_rows_padded, replicated
from jaxllm.stages.common import (
    reward_ensemble_statistics,
    reward_params_loader,
    reward_run_dirs,
)
from jaxllm.stages.paired import FirstEval
from jaxllm.stages.rollout import on_policy, room_problems
from jaxllm.state import (
    TrainState,
    learning_rate_schedule,
    make_optimizer,
    reference_params,
    with_reference,
)
from jaxllm.steps import LossAux, UpdateContext, minibatch_update
from jaxllm.trainer import RunResult, step_key


@dataclasses.dataclass(frozen=True)
class Settings:
    """What the compiled PPO functions close over: the `ppo` section, the tokenizer's real
    vocabulary, and each ensemble member's recorded score mean and std."""

    ppo: PPOConfig
    vocab_size: int
    score_means: tuple[float, ...] = (0.0,)  # per reward model of the ensemble
    score_stds: tuple[float, ...] = (1.0,)
    pack: int = 1  # consecutive rows a batch's `group_rows` packs together, or 1

    @property
    def separate_critic(self) -> bool:  # values from the `critic_params` extra
        return self.ppo.critic == "separate"


# --- the pure parts ----------------------------------------------------------------------


# The options the collapse watch's advice names (`rl.watch.CollapseWatch`).
COLLAPSE_ADVICE = {
    "kl_term": "ppo.kl_coef",
    "entropy_options": "ppo.temperature or ppo.entropy_coef",
}


def policy_outputs(model: LanguageModel, params, batch, s: Settings, entropy: bool = False):
    """(log-probs, values, entropies) of the completion tokens, each (B, N) float32: the
    policy at temperature s.ppo.temperature (`token_logprobs`, as the sampler), the value head
    at the column before each token (None with a separate critic); entropies only when
    asked (else None)."""
    out = completion_outputs(
        model,
        params,
        batch,
        s.ppo.temperature,
        s.vocab_size,
        entropy,
        pack_rows=s.pack,
    )
    if s.separate_critic:
        return out.logprobs_bn, None, out.entropies_bn
    value_input = (
        jax.lax.stop_gradient(out.hidden_bnd) if s.ppo.value_stop_gradient else out.hidden_bnd
    )
    return out.logprobs_bn, model.scalar_head(params, VALUE_HEAD, value_input), out.entropies_bn


def critic_values(critic_model: LanguageModel, critic_params, batch) -> jax.Array:
    """(B, N') a separate critic's values, read as the value head's: at the column before
    each completion token."""
    p, n = row_columns(batch)
    hidden_btd = critic_model.hidden(
        critic_params, batch["tokens_bt"], batch["positions_bt"], batch["segment_ids_bt"]
    )
    return critic_model.scalar_head(critic_params, VALUE_HEAD, hidden_btd[:, p - 1 : p + n - 1])


def critic_from_reward_model(reward_params, score_mean: float, score_std: float):
    """A separate critic's starting params (Stiennon et al.: the value function starts as
    the reward model): the reward model's backbone, and a value head (w, b) = ((w_r, b_r -
    mean) / std), so V at a token is the normalised score a reply ending there would get."""
    head = reward_params["heads"][REWARD_HEAD]
    critic = {key: value for key, value in reward_params.items() if key != "heads"}
    critic = jax.tree.map(jnp.copy, critic)
    critic["heads"] = {
        VALUE_HEAD: {
            "w_d": head["w_d"] / score_std,
            "bias": (head["bias"] - score_mean) / score_std,
        }
    }
    return critic


def reference_logprobs(model: LanguageModel, ref_params, batch, s: Settings):
    """(B, N) log-probs of the completion tokens under the frozen reference."""
    return policy_outputs(model, ref_params, batch, s)[0]


def ensemble_score(normalised_mb: jax.Array, aggregation: str) -> jax.Array:
    """(B,) one score from M reward models' (M, B) normalised scores: their mean, min, or
    mean - std (population std over members; 0 for one model)."""
    if aggregation == "min":
        return jnp.min(normalised_mb, axis=0)
    mean_b = jnp.mean(normalised_mb, axis=0)
    if aggregation == "mean_minus_std":
        return mean_b - jnp.std(normalised_mb, axis=0)
    return mean_b


def normalised_scores(raw_mb: jax.Array, s: Settings) -> jax.Array:
    """(M, B): each reward model's raw scores less its recorded mean, over its std."""
    means_m, stds_m = jnp.asarray(s.score_means), jnp.asarray(s.score_stds)
    return (raw_mb - means_m[:, None]) / stds_m[:, None]


def ensemble_raw_scores(reward_model, reward_params: list, batch) -> jax.Array:
    """(M, B) raw scores of the rollouts under each reward model of the ensemble."""
    return jnp.stack([reward_model_scores(reward_model, member, batch) for member in reward_params])


def shaped_scores(raw_mb: jax.Array, ended_b: jax.Array, s: Settings) -> jax.Array:
    """(B,) the score PPO maximises: normalised per reward model, combined over the
    ensemble, clipped to +-`reward_clip`, then s - `missing_eos_penalty` for a reply that
    did not end (`ended_b` 0: cut off before `<|im_end|>`; TRL's sign)."""
    score_b = ensemble_score(normalised_scores(raw_mb, s), s.ppo.reward_aggregation)
    if s.ppo.reward_clip is not None:
        score_b = jnp.clip(score_b, -s.ppo.reward_clip, s.ppo.reward_clip)
    if s.ppo.missing_eos_penalty is not None:
        score_b = score_b - jnp.where(ended_b > 0, 0.0, s.ppo.missing_eos_penalty)
    return score_b


def token_rewards(score_b, k1_bn, mask_bn, kl_coef) -> jax.Array:
    """(B, N): -kl_coef * k1 on every completion token, plus the score on the last one."""
    last_bn = (jnp.cumsum(mask_bn, axis=1) == jnp.sum(mask_bn, axis=1, keepdims=True)) & (
        mask_bn > 0
    )
    return jnp.where(mask_bn > 0, -kl_coef * k1_bn, 0.0) + jnp.where(last_bn, score_b[:, None], 0.0)


def adapted_kl_coef(kl_coef, kl_per_token, rollouts: int, s: Settings) -> jax.Array:
    """Ziegler et al.'s controller: kl_coef * (1 + clip(KL / target - 1, +-0.2) * B / horizon),
    never under `kl_coef_min`; unchanged when there is no target (a fixed coefficient) or KL
    equals the target."""
    if s.ppo.kl_target is None:
        return kl_coef
    error = jnp.clip(kl_per_token / s.ppo.kl_target - 1.0, -0.2, 0.2)
    adapted = kl_coef * (1.0 + error * rollouts / s.ppo.kl_horizon)
    return adapted if s.ppo.kl_coef_min is None else jnp.maximum(adapted, s.ppo.kl_coef_min)


def explained_variance(values_bn, returns_bn, mask_bn) -> jax.Array:
    """1 - Var(returns - values) / Var(returns) over the completion tokens."""
    variance = masked_variance(returns_bn, mask_bn)
    residual = masked_variance(returns_bn - values_bn, mask_bn)
    return jnp.where(variance > 0, 1.0 - residual / jnp.where(variance > 0, variance, 1.0), 0.0)


def prepare(model, reward_model, s: Settings, state: TrainState, batch, critic_model=None):
    """The rollouts scored and turned into PPO's training rows: (rows, metrics, new
    kl_coef). Rows: the batch's tokens plus old log-probs and values, advantages, returns.
    `critic_model`: the separate critic's model, when there is one."""
    mask_bn = batch["mask_bn"]
    logprobs_bn, values_bn, _ = policy_outputs(model, state.params, batch, s)
    if s.separate_critic:
        values_bn = critic_values(critic_model, state.extras["critic_params"], batch)
    ref_logprobs_bn = reference_logprobs(model, reference_params(model, state), batch, s)
    raw_mb = ensemble_raw_scores(reward_model, state.extras["reward_params"], batch)
    score_b = shaped_scores(raw_mb, batch["ended_b"], s)
    k1_bn = jnp.where(mask_bn > 0, kl_k1(logprobs_bn, ref_logprobs_bn), 0.0)
    rewards_bn = token_rewards(score_b, k1_bn, mask_bn, state.extras["kl_coef"])
    gae = AdvantageInputs(
        score_b,
        mask_bn,
        1,
        token_rewards_bn=rewards_bn,
        values_bn=values_bn,
        gamma=s.ppo.gamma,
        lam=s.ppo.lam,
    )
    advantages_bn, returns_bn = ADVANTAGE_ESTIMATORS["gae"](gae)
    if s.ppo.whiten_advantages:
        advantages_bn = masked_whiten(advantages_bn, mask_bn)
    kl_per_token = masked_mean(k1_bn, mask_bn)
    rows = jax.lax.stop_gradient(
        {
            "tokens_bt": batch["tokens_bt"],
            "positions_bt": batch["positions_bt"],
            "segment_ids_bt": batch["segment_ids_bt"],
            "mask_bn": mask_bn,
            "old_logprobs_bn": logprobs_bn,
            "old_values_bn": values_bn,
            "advantages_bn": advantages_bn,
            "returns_bn": returns_bn,
            **{name: x for name, x in batch.items() if name.startswith("group_")},
        }
    )
    lengths_b = jnp.sum(mask_bn, axis=1)
    metrics = {
        "reward": jnp.mean(raw_mb),
        "score": jnp.mean(score_b),
        "kl": kl_per_token,
        "kl_sequence": jnp.mean(jnp.sum(k1_bn, axis=1)),
        "kl_coef": state.extras["kl_coef"],
        "response_length": jnp.mean(lengths_b),
        "truncated_fraction": 1.0 - jnp.mean(batch["ended_b"]),
        "value_explained_variance": explained_variance(values_bn, returns_bn, mask_bn),
        "logprob_gap": masked_mean(jnp.abs(logprobs_bn - batch["sampler_logprobs_bn"]), mask_bn),
        "returns": masked_mean(returns_bn, mask_bn),
    }
    if raw_mb.shape[0] > 1:
        metrics["reward_disagreement"] = jnp.mean(jnp.std(normalised_scores(raw_mb, s), axis=0))
    if s.ppo.gold_rule is not None:
        metrics["gold_reward"] = jnp.mean(batch["gold_reward_b"])
    rollouts = mask_bn.shape[0]
    return rows, metrics, adapted_kl_coef(state.extras["kl_coef"], kl_per_token, rollouts, s)


def ppo_loss(model, params, rows, *, s: Settings):
    """(loss summed over the completion tokens, LossAux) of one minibatch: clipped
    surrogate + vf_coef x clipped value loss - entropy_coef x entropy, per token (the value
    term only with the value head on the policy; a separate critic has `critic_loss`)."""
    logprobs_bn, values_bn, entropies_bn = policy_outputs(model, params, rows, s, entropy=True)
    policy = clipped_policy_loss(
        logprobs_bn,
        rows["old_logprobs_bn"],
        rows["advantages_bn"],
        eps_low=s.ppo.clip_eps,
        eps_high=s.ppo.clip_eps,
        dual_clip=s.ppo.dual_clip,
    )
    loss_bn = policy.loss_bt - s.ppo.entropy_coef * entropies_bn
    means = {
        "policy_loss": policy.loss_bt,
        "clip_fraction": policy.clipped_bt,
        "approx_kl": policy.approx_kl_bt,
        "entropy": entropies_bn,
        "ratio": jnp.exp(logprobs_bn - rows["old_logprobs_bn"]),
    }
    if s.ppo.dual_clip is not None:
        means["dual_clip_fraction"] = policy.dual_clipped_bt
    if not s.separate_critic:
        value = clipped_value_loss(
            values_bn, rows["old_values_bn"], rows["returns_bn"], clip_eps=s.ppo.value_clip_eps
        )
        loss_bn = loss_bn + s.ppo.vf_coef * value.loss_bt
        means.update(value_loss=value.loss_bt, value_clip_fraction=value.clipped_bt)
    return _token_sums(loss_bn, means, rows["mask_bn"])


def critic_loss(critic_model, critic_params, rows, *, s: Settings):
    """(loss summed over the completion tokens, LossAux) of one minibatch for a separate
    critic: the clipped value loss."""
    values_bn = critic_values(critic_model, critic_params, rows)
    value = clipped_value_loss(
        values_bn, rows["old_values_bn"], rows["returns_bn"], clip_eps=s.ppo.value_clip_eps
    )
    means = {"value_loss": value.loss_bt, "value_clip_fraction": value.clipped_bt}
    return _token_sums(value.loss_bt, means, rows["mask_bn"])


def _token_sums(loss_bn, means_bn: dict, mask_bn):
    """The loss summed over completion tokens, and each metric as a token mean."""
    tokens = jnp.sum(mask_bn)

    def token_sum(x_bn):
        return jnp.sum(jnp.where(mask_bn > 0, x_bn, 0.0))

    return token_sum(loss_bn), LossAux(
        tokens, means={name: (token_sum(x_bn), tokens) for name, x_bn in means_bn.items()}
    )


@dataclasses.dataclass(frozen=True)
class Critic:
    """A separate critic's model, optimizer and schedule (the loop knows only the policy's)."""

    model: LanguageModel
    tx: optax.GradientTransformation
    schedule: optax.Schedule


def ppo_update(
    context: UpdateContext,
    *,
    reward_model,
    s: Settings,
    epochs: int,
    minibatches: int,
    critic: Critic | None = None,
):
    """The stage's update: `prepare`, then epochs x minibatches steps (`minibatch_update`)
    of the policy and, when separate, of the critic on the same minibatches, then the new
    kl_coef; one compiled call."""
    train = minibatch_update(context, epochs=epochs, minibatches=minibatches, rows_together=s.pack)
    train_critic = None
    if critic is not None:
        critic_context = UpdateContext(
            critic.model,
            critic.tx,
            critic.schedule,
            functools.partial(critic_loss, s=s),
            context.grad_accum,
        )
        train_critic = minibatch_update(
            critic_context, epochs=epochs, minibatches=minibatches, rows_together=s.pack
        )

    def update(state: TrainState, batch):
        critic_model = None if critic is None else critic.model
        rows, metrics, kl_coef = prepare(context.model, reward_model, s, state, batch, critic_model)
        new_state, train_metrics = train(state, rows)
        if train_critic is not None:
            # The critic steps as a state of its own: same step and key, so the same
            # minibatches in the same order.
            view = TrainState(
                state.step,
                state.extras["critic_params"],
                state.extras["critic_opt_state"],
                state.rng,
            )
            view, critic_metrics = train_critic(view, rows)
            new_state = new_state.with_extras(
                critic_params=view.params, critic_opt_state=view.opt_state
            )
            for name in ("loss", "grad_norm", "lr"):
                critic_metrics[f"critic_{name}"] = critic_metrics.pop(name)
            train_metrics = {**train_metrics, **critic_metrics}
        return new_state.with_extras(kl_coef=kl_coef), {**train_metrics, **metrics}

    return update


# --- set-up ------------------------------------------------------------------------------


def separate_critic_of(cfg: Config, model: LanguageModel) -> Critic:
    """The separate critic: the policy's shape with a `value` head, and AdamW like the
    policy's at `ppo.critic_lr` (min_lr scaled alike), on the same schedule of loop steps."""
    opt = cfg.optimizer
    lr = opt.lr if cfg.ppo.critic_lr is None else cfg.ppo.critic_lr
    scale = lr / opt.lr if opt.lr > 0 else 0.0
    critic_opt = dataclasses.replace(opt, lr=lr, min_lr=opt.min_lr * scale)
    critic_model = model.with_heads([VALUE_HEAD])
    updates = cfg.ppo.epochs * cfg.ppo.minibatches
    return Critic(
        critic_model,
        make_optimizer(critic_opt, critic_model, cfg.train.steps, updates),
        learning_rate_schedule(critic_opt, cfg.train.steps, updates),
    )


def config_problems(cfg: Config) -> list[str]:
    """PPO's rules between its section and the rest: a reply's room in the context, the
    rollouts split into minibatches x micro-batches, a known gold rule."""
    ppo, train = cfg.ppo, cfg.train
    problems = room_problems(cfg, "ppo")
    if ppo.critic == "separate" and cfg.lora.rank:
        problems.append(
            "ppo.critic=separate trains a whole second model, which adapters would not keep "
            "small; with lora.rank use ppo.critic=shared (a value head on the policy)"
        )
    if ppo.minibatches >= 1 and train.batch_size % ppo.minibatches:
        problems.append(
            f"train.batch_size={train.batch_size} rollouts do not split into "
            f"ppo.minibatches={ppo.minibatches} equal minibatches"
        )
    elif ppo.minibatches >= 1 and train.batch_size // ppo.minibatches % max(train.grad_accum, 1):
        problems.append(
            f"a minibatch of {train.batch_size // ppo.minibatches} rollouts does not split "
            f"into train.grad_accum={train.grad_accum} micro-batches"
        )
    if ppo.gold_rule is not None and ppo.gold_rule not in GOLD_RULES:
        problems.append(
            f"ppo.gold_rule='{ppo.gold_rule}' is unknown; use one of {', '.join(GOLD_RULES)}"
        )
    return problems


def ppo(cfg: Config) -> RunResult:
    """Train a policy with PPO in `cfg.out_dir` (resuming if it holds a run)."""
    separate_critic = cfg.ppo.critic == "separate"
    if VALUE_HEAD not in cfg.model.scalar_heads and not separate_critic:
        cfg = dataclasses.replace(
            cfg,
            model=dataclasses.replace(
                cfg.model, scalar_heads=[*cfg.model.scalar_heads, VALUE_HEAD]
            ),
        )
    batch_size = cfg.train.batch_size
    run = on_policy(cfg, "ppo", batch_size, "train.batch_size", cfg.train.grad_accum)
    cfg, ppo_cfg, model, mesh = run.cfg, cfg.ppo, run.model, run.mesh
    reward_model = run.reward_model
    reward_runs = reward_run_dirs(ppo_cfg.reward_from, "ppo.reward_from")
    statistics = reward_ensemble_statistics(
        cfg, reward_runs, "ppo.reward_from", ppo_cfg.normalize_reward
    )
    # A pack's rows stay in one micro-batch. The choice ignores the mesh, so every mesh
    # takes the same minibatches (a pack split over two devices costs a reshard only).
    rows = batch_size // (ppo_cfg.minibatches * max(cfg.train.grad_accum, 1))
    packs = [k for k in range(1, ppo_cfg.pack_rollouts + 1) if rows and rows % k == 0]
    run.pack_rows = max(packs, default=1)
    s = Settings(
        ppo_cfg,
        run.tokenizer.vocab_size,
        score_means=tuple(member["score_mean"] for member in statistics),
        score_stds=tuple(member["score_std"] for member in statistics),
        pack=run.pack_rows,
    )
    sampling = {"top_k": ppo_cfg.top_k, "top_p": ppo_cfg.top_p}
    gold_rule = GOLD_RULES.get(ppo_cfg.gold_rule) if ppo_cfg.gold_rule else None

    def rollouts(params, prompts, prompt_ids, key, temperature):
        """(host rows with the gold reward of each reply, texts, the rollout)."""
        rollout = run.roll_out(
            params, prompts, prompt_ids, key, temperature=temperature, **sampling
        )
        texts = run.texts(rollout)
        gold_b = np.array([gold_rule(t) for t in texts] if gold_rule else np.zeros(len(texts)))
        return run.rows(prompt_ids, rollout, gold_b), texts, rollout

    def batch(state, step):
        chosen = run.step_prompts(step, batch_size)
        host, _, rollout = rollouts(
            state.params,
            [run.train_prompts[c] for c in chosen],
            [run.train_ids[c] for c in chosen],
            step_key(state, step),
            ppo_cfg.temperature,
        )
        host.update(group_rows(model, host, s.pack))
        run.record(host, rollout)
        return put_batch(host, mesh)

    @functools.partial(jax.jit, out_shardings=replicated(mesh))
    def eval_scores(state, batch):
        logprobs_bn, _, _ = policy_outputs(model, state.params, batch, s)
        ref_bn = reference_logprobs(model, reference_params(model, state), batch, s)
        k1_bn = jnp.where(batch["mask_bn"] > 0, kl_k1(logprobs_bn, ref_bn), 0.0)
        raw_mb = ensemble_raw_scores(reward_model, state.extras["reward_params"], batch)
        return raw_mb, normalised_scores(raw_mb, s), jnp.sum(k1_bn, 1)

    watch = HackingWatch(ppo_cfg.hacking_window)
    first_eval = FirstEval(cfg.out_dir, [q.text for q in run.eval_prompts])

    def evaluate(state, key) -> dict[str, float]:
        step = int(jax.device_get(state.step))
        values, per_prompt = {}, {}
        for name, temperature in (("", ppo_cfg.temperature), ("_greedy", 0.0)):
            host, texts, rollout = rollouts(
                state.params, run.eval_prompts, run.eval_ids, key, temperature
            )
            with jax.set_mesh(mesh):
                raw_mb, normalised_mb, kl_b = jax.device_get(
                    eval_scores(state, put_rows_padded(host, mesh))
                )
            count = len(texts)
            raw_b, kl_b = raw_mb[:, :count].mean(0), kl_b[:count]
            per_prompt[f"reward{name}"] = raw_b
            tokens = host["mask_bn"].sum()
            values.update(
                {
                    f"reward{name}": float(raw_b.mean()),
                    f"reward_std{name}": float(raw_b.std()),
                    f"kl{name}": float(kl_b.sum() / tokens),
                    f"kl_sequence{name}": float(kl_b.mean()),
                    f"response_length{name}": float(host["mask_bn"].sum(1).mean()),
                    "eval_prompts": count,
                    **run.episode_means(rollout, name),
                }
            )
            if len(statistics) > 1:
                members_mb = normalised_mb[:, :count]
                values[f"reward_disagreement{name}"] = float(members_mb.std(0).mean())
                values[f"score{name}"] = float(
                    ensemble_score(jnp.asarray(members_mb), s.ppo.reward_aggregation).mean()
                )
            if gold_rule:
                per_prompt[f"gold_reward{name}"] = host["gold_reward_b"]
                values[f"gold_reward{name}"] = float(host["gold_reward_b"].mean())
                values[f"gold_reward_se{name}"] = float(
                    host["gold_reward_b"].std() / np.sqrt(len(texts))
                )
            if name == "":
                episodes = run.episode_lines(rollout)
                lines = [
                    {
                        "step": step,
                        "prompt": prompt.text,
                        "completion": text,
                        "reward": float(raw_b[i]),
                        **({"gold_reward": float(host["gold_reward_b"][i])} if gold_rule else {}),
                        **episodes[i],
                    }
                    for i, (prompt, text) in enumerate(zip(run.eval_prompts, texts, strict=True))
                ]
                run.write_samples(lines)
        values.update(first_eval.change_errors(step, per_prompt))
        if gold_rule and jax.process_index() == 0:
            warning = watch.add(
                step, values["reward"], values["gold_reward"], values["gold_reward_se"]
            )
            if warning:
                print(warning, file=sys.stderr, flush=True)
        return values

    collapse = CollapseWatch(ppo_cfg.collapse_window, **COLLAPSE_ADVICE)

    def watch_step(step: int, values: dict[str, float]) -> None:
        """The collapse watch's view of a step: its rollouts' mean reward-model score and
        the policy's mean entropy over the update (PPO has no correct/format rewards)."""
        said = collapse.add_rollout(step, values["reward"], values["entropy"], np.nan, np.nan)
        if said and jax.process_index() == 0:
            print(said, file=sys.stderr, flush=True)

    critic = separate_critic_of(cfg, model) if separate_critic else None

    def extend(state: TrainState) -> TrainState:
        state = with_reference(model, state).with_extras(
            kl_coef=jnp.float32(ppo_cfg.kl_coef),
            # replaced by the reward runs' params in initial_state
            reward_params=[reward_model.init(jax.random.key(0)) for _ in statistics],
        )
        if critic is None:
            return state
        critic_params = critic.model.init(jax.random.key(0))  # replaced in initial_state
        return state.with_extras(
            critic_params=critic_params, critic_opt_state=critic.tx.init(critic_params)
        )

    load_reward_models = reward_params_loader(cfg, reward_model, "ppo.reward_from", statistics)

    def initial_state(state: TrainState, shardings: TrainState) -> TrainState:
        state = load_reward_models(state, shardings)
        if critic is None:
            return state
        first = statistics[0]
        start_critic = jax.jit(
            functools.partial(
                critic_from_reward_model,
                score_mean=first["score_mean"],
                score_std=first["score_std"],
            ),
            out_shardings=shardings.extras["critic_params"],
        )
        with jax.set_mesh(mesh):
            return state.with_extras(critic_params=start_critic(state.extras["reward_params"][0]))

    stage = run.stage(
        batch=batch,
        tokens_per_step=batch_size * cfg.train.seq_len * ppo_cfg.epochs,
        loss_fn=functools.partial(ppo_loss, s=s),
        update=functools.partial(
            ppo_update,
            reward_model=reward_model,
            s=s,
            epochs=ppo_cfg.epochs,
            minibatches=ppo_cfg.minibatches,
            critic=critic,
        ),
        updates_per_step=ppo_cfg.epochs * ppo_cfg.minibatches,
        extend_state=extend,
        extra_eval=evaluate,
        initial_state=initial_state,
        watch_step=watch_step,
    )
    return run.run(
        stage,
        f"{batch_size} rollouts of up to {run.new_tokens} tokens per iteration, "
        f"{ppo_cfg.epochs} epochs x {ppo_cfg.minibatches} minibatches; reward model(s) "
        + ", ".join(
            f"{m['reward_from']} (score mean {m['score_mean']:.3f}, std {m['score_std']:.3f})"
            for m in statistics
        )
        + f", combined by {ppo_cfg.reward_aggregation}; gold rule {ppo_cfg.gold_rule}",
    )
