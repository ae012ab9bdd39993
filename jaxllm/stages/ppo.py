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
   - the policy's log-probs and values, the reference's log-probs (`state.ref_params`) and
     the reward model's score (`state.reward_params`, read at the last completion token;
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
`state.critic_params`, starting as the reward model (backbone, and the reward head scaled
to give the normalised score as the value), with its own AdamW state at `ppo.critic_lr`;
it steps on the same minibatches as the policy, after it, within the same compiled call.
The value loss is then the critic's alone (no vf_coef), and the policy has no value head.

Eval (every `train.eval_every` steps) on held-out prompts: mean reward-model score
(`reward`) and gold reward (`gold_reward`) of sampled replies, the same of greedy replies
(`*_greedy`), their KL to the reference, reply length; sampled replies of the first
`train.samples` prompts go to `out_dir/samples.jsonl`. With a gold rule, a one-line
warning says when the proxy's moving average over `hacking_window` evals rose while the
gold's fell (reward hacking).

The checkpoint holds the policy, the reference, the reward model, kl_coef and a separate
critic with its optimizer state, and out_dir keeps the reward run's score statistics
(`reward_model.json`): a run resumes, and `generate`/`chat` load it, without the SFT and
reward runs' folders. The reward-hacking
watch starts afresh on a resume.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import sys
import time
from pathlib import Path

import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxllm.config import Config, check_for_stage
from jaxllm.data.prompts import rendered_prompts, train_and_eval_prompts
from jaxllm.errors import ConfigError
from jaxllm.generate import Generator
from jaxllm.model import LanguageModel
from jaxllm.rl.advantages import gae_advantages, masked_mean, masked_variance, masked_whiten
from jaxllm.rl.kl import kl_k1
from jaxllm.rl.labelers import GOLD_RULES
from jaxllm.rl.policy_losses import clipped_policy_loss, clipped_value_loss
from jaxllm.rl.rollouts import (
    completion_outputs,
    reward_model_scores,
    rollout_figures,
    rollout_rows,
    row_columns,
    trimmed_row_fields,
)
from jaxllm.rl.watch import HackingWatch
from jaxllm.sharding import put_batch, put_rows_padded, replicated
from jaxllm.stages.common import (
    announce,
    configured_mesh,
    load_configured_tokenizer,
    params_from_run,
    reward_ensemble_statistics,
    reward_params_loader,
    reward_run_dirs,
)
from jaxllm.state import TrainState, learning_rate_schedule, make_optimizer
from jaxllm.steps import LossAux, UpdateContext, minibatch_update
from jaxllm.trainer import RunResult, Stage, run_training, step_key

VALUE, REWARD = "value", "reward"


@dataclasses.dataclass(frozen=True)
class Settings:
    """The numbers the compiled PPO functions close over."""

    vocab_size: int
    temperature: float
    clip_eps: float
    value_clip_eps: float
    vf_coef: float
    entropy_coef: float
    value_stop_gradient: bool
    separate_critic: bool  # values from `state.critic_params`, not the policy's value head
    gamma: float
    lam: float
    kl_target: float | None
    kl_horizon: int
    kl_coef_min: float | None
    score_means: tuple[float, ...]  # per reward model of the ensemble
    score_stds: tuple[float, ...]
    reward_aggregation: str  # mean | min | mean_minus_std over the ensemble
    reward_clip: float | None
    missing_eos_penalty: float | None
    whiten_advantages: bool
    gold: bool  # the batch carries gold rewards (a gold rule is set)
    dual_clip: float | None = None  # ppo.dual_clip


# --- the pure parts ----------------------------------------------------------------------


def policy_outputs(model: LanguageModel, params, batch, s: Settings, entropy: bool = False):
    """(log-probs, values, entropies) of the completion tokens, each (B, N) float32: the
    policy at temperature s.temperature (`token_logprobs`, as the sampler), the value head
    at the column before each token (None with a separate critic); entropies only when
    asked (else None)."""
    out = completion_outputs(model, params, batch, s.temperature, s.vocab_size, entropy)
    if s.separate_critic:
        return out.logprobs_bn, None, out.entropies_bn
    value_input = jax.lax.stop_gradient(out.hidden_bnd) if s.value_stop_gradient else out.hidden_bnd
    return out.logprobs_bn, model.scalar_head(params, VALUE, value_input), out.entropies_bn


def critic_values(critic_model: LanguageModel, critic_params, batch) -> jax.Array:
    """(B, N') a separate critic's values, read as the value head's: at the column before
    each completion token."""
    p, n = row_columns(batch)
    hidden_btd = critic_model.hidden(
        critic_params, batch["tokens_bt"], batch["positions_bt"], batch["segment_ids_bt"]
    )
    return critic_model.scalar_head(critic_params, VALUE, hidden_btd[:, p - 1 : p + n - 1])


def critic_from_reward_model(reward_params, score_mean: float, score_std: float):
    """A separate critic's starting params (Stiennon et al.: the value function starts as
    the reward model): the reward model's backbone, and a value head (w, b) = ((w_r, b_r -
    mean) / std), so V at a token is the normalised score a reply ending there would get."""
    head = reward_params["heads"][REWARD]
    critic = {key: value for key, value in reward_params.items() if key != "heads"}
    critic = jax.tree.map(jnp.copy, critic)
    critic["heads"] = {
        VALUE: {"w_d": head["w_d"] / score_std, "bias": (head["bias"] - score_mean) / score_std}
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
    score_b = ensemble_score(normalised_scores(raw_mb, s), s.reward_aggregation)
    if s.reward_clip is not None:
        score_b = jnp.clip(score_b, -s.reward_clip, s.reward_clip)
    if s.missing_eos_penalty is not None:
        score_b = score_b - jnp.where(ended_b > 0, 0.0, s.missing_eos_penalty)
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
    if s.kl_target is None:
        return kl_coef
    error = jnp.clip(kl_per_token / s.kl_target - 1.0, -0.2, 0.2)
    adapted = kl_coef * (1.0 + error * rollouts / s.kl_horizon)
    return adapted if s.kl_coef_min is None else jnp.maximum(adapted, s.kl_coef_min)


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
        values_bn = critic_values(critic_model, state.critic_params, batch)
    ref_logprobs_bn = reference_logprobs(model, state.ref_params, batch, s)
    raw_mb = ensemble_raw_scores(reward_model, state.reward_params, batch)
    score_b = shaped_scores(raw_mb, batch["ended_b"], s)
    k1_bn = jnp.where(mask_bn > 0, kl_k1(logprobs_bn, ref_logprobs_bn), 0.0)
    rewards_bn = token_rewards(score_b, k1_bn, mask_bn, state.kl_coef)
    advantages_bn, returns_bn = gae_advantages(rewards_bn, values_bn, mask_bn, s.gamma, s.lam)
    if s.whiten_advantages:
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
        }
    )
    lengths_b = jnp.sum(mask_bn, axis=1)
    metrics = {
        "reward": jnp.mean(raw_mb),
        "score": jnp.mean(score_b),
        "kl": kl_per_token,
        "kl_sequence": jnp.mean(jnp.sum(k1_bn, axis=1)),
        "kl_coef": state.kl_coef,
        "response_length": jnp.mean(lengths_b),
        "truncated_fraction": 1.0 - jnp.mean(batch["ended_b"]),
        "value_explained_variance": explained_variance(values_bn, returns_bn, mask_bn),
        "logprob_gap": masked_mean(jnp.abs(logprobs_bn - batch["sampler_logprobs_bn"]), mask_bn),
        "returns": masked_mean(returns_bn, mask_bn),
    }
    if raw_mb.shape[0] > 1:
        metrics["reward_disagreement"] = jnp.mean(jnp.std(normalised_scores(raw_mb, s), axis=0))
    if s.gold:
        metrics["gold_reward"] = jnp.mean(batch["gold_reward_b"])
    rollouts = mask_bn.shape[0]
    return rows, metrics, adapted_kl_coef(state.kl_coef, kl_per_token, rollouts, s)


def ppo_loss(model, params, rows, *, s: Settings):
    """(loss summed over the completion tokens, LossAux) of one minibatch: clipped
    surrogate + vf_coef x clipped value loss - entropy_coef x entropy, per token (the value
    term only with the value head on the policy; a separate critic has `critic_loss`)."""
    logprobs_bn, values_bn, entropies_bn = policy_outputs(model, params, rows, s, entropy=True)
    policy = clipped_policy_loss(
        logprobs_bn,
        rows["old_logprobs_bn"],
        rows["advantages_bn"],
        eps_low=s.clip_eps,
        eps_high=s.clip_eps,
        dual_clip=s.dual_clip,
    )
    loss_bn = policy.loss_bt - s.entropy_coef * entropies_bn
    means = {
        "policy_loss": policy.loss_bt,
        "clip_fraction": policy.clipped_bt,
        "approx_kl": policy.approx_kl_bt,
        "entropy": entropies_bn,
        "ratio": jnp.exp(logprobs_bn - rows["old_logprobs_bn"]),
    }
    if s.dual_clip is not None:
        means["dual_clip_fraction"] = policy.dual_clipped_bt
    if not s.separate_critic:
        value = clipped_value_loss(
            values_bn, rows["old_values_bn"], rows["returns_bn"], clip_eps=s.value_clip_eps
        )
        loss_bn = loss_bn + s.vf_coef * value.loss_bt
        means.update(value_loss=value.loss_bt, value_clip_fraction=value.clipped_bt)
    return _token_sums(loss_bn, means, rows["mask_bn"])


def critic_loss(critic_model, critic_params, rows, *, s: Settings):
    """(loss summed over the completion tokens, LossAux) of one minibatch for a separate
    critic: the clipped value loss."""
    values_bn = critic_values(critic_model, critic_params, rows)
    value = clipped_value_loss(
        values_bn, rows["old_values_bn"], rows["returns_bn"], clip_eps=s.value_clip_eps
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
    train = minibatch_update(context, epochs=epochs, minibatches=minibatches)
    train_critic = None
    if critic is not None:
        critic_context = UpdateContext(
            critic.model,
            critic.tx,
            critic.schedule,
            functools.partial(critic_loss, s=s),
            context.grad_accum,
        )
        train_critic = minibatch_update(critic_context, epochs=epochs, minibatches=minibatches)

    def update(state: TrainState, batch):
        critic_model = None if critic is None else critic.model
        rows, metrics, kl_coef = prepare(context.model, reward_model, s, state, batch, critic_model)
        new_state, train_metrics = train(state, rows)
        if train_critic is not None:
            # The critic steps as a state of its own: same step and key, so the same
            # minibatches in the same order.
            view = TrainState(state.step, state.critic_params, state.critic_opt_state, state.rng)
            view, critic_metrics = train_critic(view, rows)
            new_state = new_state.replace(
                critic_params=view.params, critic_opt_state=view.opt_state
            )
            for name in ("loss", "grad_norm", "lr"):
                critic_metrics[f"critic_{name}"] = critic_metrics.pop(name)
            train_metrics = {**train_metrics, **critic_metrics}
        return new_state.replace(kl_coef=kl_coef), {**train_metrics, **metrics}

    return update


# --- set-up ------------------------------------------------------------------------------


def separate_critic_of(cfg: Config, model: LanguageModel) -> Critic:
    """The separate critic: the policy's shape with a `value` head, and AdamW like the
    policy's at `ppo.critic_lr` (min_lr scaled alike), on the same schedule of loop steps."""
    opt = cfg.optimizer
    lr = opt.lr if cfg.ppo.critic_lr is None else cfg.ppo.critic_lr
    scale = lr / opt.lr if opt.lr > 0 else 0.0
    critic_opt = dataclasses.replace(opt, lr=lr, min_lr=opt.min_lr * scale)
    critic_model = model.with_heads([VALUE])
    updates = cfg.ppo.epochs * cfg.ppo.minibatches
    return Critic(
        critic_model,
        make_optimizer(critic_opt, critic_model, cfg.train.steps, updates),
        learning_rate_schedule(critic_opt, cfg.train.steps, updates),
    )


def ppo(cfg: Config) -> RunResult:
    """Train a policy with PPO in `cfg.out_dir` (resuming if it holds a run)."""
    check_for_stage(cfg, "ppo")  # how rollouts split into minibatches
    p, n = cfg.ppo.max_prompt_tokens, cfg.ppo.max_new_tokens
    separate_critic = cfg.ppo.critic == "separate"
    if VALUE not in cfg.model.scalar_heads and not separate_critic:
        cfg = dataclasses.replace(
            cfg, model=dataclasses.replace(cfg.model, scalar_heads=[*cfg.model.scalar_heads, VALUE])
        )
    if p + n > cfg.model.max_seq_len:
        raise ConfigError(
            f"ppo.max_prompt_tokens={p} + ppo.max_new_tokens={n} exceed model.max_seq_len="
            f"{cfg.model.max_seq_len}; lower one of them"
        )
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, seq_len=p + n))
    if not cfg.ppo.policy_from:
        raise ConfigError("ppo.policy_from is not set; pass the out_dir of an SFT run")
    if cfg.ppo.gold_rule is not None and cfg.ppo.gold_rule not in GOLD_RULES:
        raise ConfigError(
            f"ppo.gold_rule='{cfg.ppo.gold_rule}' is unknown; use one of {', '.join(GOLD_RULES)}"
        )
    mesh = configured_mesh(cfg)
    tokenizer = load_configured_tokenizer(cfg)
    reward_runs = reward_run_dirs(cfg.ppo.reward_from, "ppo.reward_from")
    statistics = reward_ensemble_statistics(
        cfg, reward_runs, "ppo.reward_from", cfg.ppo.normalize_reward
    )
    train_prompts, eval_prompts = train_and_eval_prompts(
        cfg.data.path,
        cfg.data.eval_path,
        cfg.data.val_fraction,
        cfg.ppo.builtin_prompts,
        cfg.ppo.eval_prompts,
        cfg.train.seed,
    )
    where = f"ppo.max_prompt_tokens={p}"
    train_ids = rendered_prompts(tokenizer, train_prompts, p, where)
    eval_ids = rendered_prompts(tokenizer, eval_prompts, p, where)
    model = LanguageModel(cfg.model)
    reward_model = model.with_heads([REWARD])
    ppo_cfg, batch_size = cfg.ppo, cfg.train.batch_size
    s = Settings(
        vocab_size=tokenizer.vocab_size,
        temperature=ppo_cfg.temperature,
        clip_eps=ppo_cfg.clip_eps,
        value_clip_eps=ppo_cfg.value_clip_eps,
        vf_coef=ppo_cfg.vf_coef,
        entropy_coef=ppo_cfg.entropy_coef,
        value_stop_gradient=ppo_cfg.value_stop_gradient,
        separate_critic=separate_critic,
        gamma=ppo_cfg.gamma,
        lam=ppo_cfg.lam,
        kl_target=ppo_cfg.kl_target,
        kl_horizon=ppo_cfg.kl_horizon,
        kl_coef_min=ppo_cfg.kl_coef_min,
        score_means=tuple(member["score_mean"] for member in statistics),
        score_stds=tuple(member["score_std"] for member in statistics),
        reward_aggregation=ppo_cfg.reward_aggregation,
        reward_clip=ppo_cfg.reward_clip,
        missing_eos_penalty=ppo_cfg.missing_eos_penalty,
        whiten_advantages=ppo_cfg.whiten_advantages,
        gold=ppo_cfg.gold_rule is not None,
        dual_clip=ppo_cfg.dual_clip,
    )
    end = tokenizer.special_id("<|im_end|>")
    generator = Generator(model, tokenizer.vocab_size, tokenizer.pad_id, n, mesh)
    sampling = {"top_k": ppo_cfg.top_k, "top_p": ppo_cfg.top_p, "stop_ids": [end]}
    gold_rule = GOLD_RULES.get(ppo_cfg.gold_rule) if ppo_cfg.gold_rule else None
    order = grain.MapDataset.range(len(train_ids)).seed(cfg.train.seed).shuffle().repeat(None)
    last_rollout: dict[str, float] = {}

    def rollouts(params, prompt_ids, key, temperature):
        completion = generator(params, prompt_ids, key, temperature=temperature, **sampling)
        texts = [
            tokenizer.decode(t for t in completion.row(i) if t != end)
            for i in range(len(prompt_ids))
        ]
        gold_b = np.array([gold_rule(t) for t in texts] if gold_rule else np.zeros(len(texts)))
        host = rollout_rows(prompt_ids, completion, p, tokenizer.pad_id, end, gold_b)
        return host, texts

    def batch(state, step):
        start = time.perf_counter()
        prompt_ids = [train_ids[order[step * batch_size + j]] for j in range(batch_size)]
        host, _ = rollouts(state.params, prompt_ids, step_key(state, step), ppo_cfg.temperature)
        elapsed = time.perf_counter() - start
        last_rollout.update(rollout_figures(host, elapsed))
        return put_batch(host, mesh)

    @functools.partial(jax.jit, out_shardings=replicated(mesh))
    def eval_scores(state, batch):
        logprobs_bn, _, _ = policy_outputs(model, state.params, batch, s)
        ref_bn = reference_logprobs(model, state.ref_params, batch, s)
        k1_bn = jnp.where(batch["mask_bn"] > 0, kl_k1(logprobs_bn, ref_bn), 0.0)
        raw_mb = ensemble_raw_scores(reward_model, state.reward_params, batch)
        return raw_mb, normalised_scores(raw_mb, s), jnp.sum(k1_bn, 1)

    watch = HackingWatch(ppo_cfg.hacking_window)
    samples_path = Path(cfg.out_dir) / "samples.jsonl"

    def evaluate(state, key) -> dict[str, float]:
        step = int(jax.device_get(state.step))
        values = {}
        for name, temperature in (("", ppo_cfg.temperature), ("_greedy", 0.0)):
            host, texts = rollouts(state.params, eval_ids, key, temperature)
            with jax.set_mesh(mesh):
                raw_mb, normalised_mb, kl_b = jax.device_get(
                    eval_scores(state, put_rows_padded(host, mesh))
                )
            count = len(texts)
            raw_b, kl_b = raw_mb[:, :count].mean(0), kl_b[:count]
            tokens = host["mask_bn"].sum()
            values.update(
                {
                    f"reward{name}": float(raw_b.mean()),
                    f"reward_std{name}": float(raw_b.std()),
                    f"kl{name}": float(kl_b.sum() / tokens),
                    f"kl_sequence{name}": float(kl_b.mean()),
                    f"response_length{name}": float(host["mask_bn"].sum(1).mean()),
                }
            )
            if len(statistics) > 1:
                members_mb = normalised_mb[:, :count]
                values[f"reward_disagreement{name}"] = float(members_mb.std(0).mean())
                values[f"score{name}"] = float(
                    ensemble_score(jnp.asarray(members_mb), s.reward_aggregation).mean()
                )
            if gold_rule:
                values[f"gold_reward{name}"] = float(host["gold_reward_b"].mean())
                values[f"gold_reward_se{name}"] = float(
                    host["gold_reward_b"].std() / np.sqrt(len(texts))
                )
            if name == "" and jax.process_index() == 0 and cfg.train.samples:
                with samples_path.open("a") as file:
                    for i in range(min(cfg.train.samples, len(texts))):
                        line = {
                            "step": step,
                            "prompt": eval_prompts[i].text,
                            "completion": texts[i],
                            "reward": float(raw_b[i]),
                        }
                        if gold_rule:
                            line["gold_reward"] = float(host["gold_reward_b"][i])
                        file.write(json.dumps(line) + "\n")
        if gold_rule and jax.process_index() == 0:
            warning = watch.add(
                step, values["reward"], values["gold_reward"], values["gold_reward_se"]
            )
            if warning:
                print(warning, file=sys.stderr, flush=True)
        return values

    critic = separate_critic_of(cfg, model) if separate_critic else None

    def extend(state: TrainState) -> TrainState:
        state = state.replace(
            ref_params=jax.tree.map(jnp.copy, state.params),
            kl_coef=jnp.float32(ppo_cfg.kl_coef),
            # replaced by the reward runs' params in initial_state
            reward_params=[reward_model.init(jax.random.key(0)) for _ in statistics],
        )
        if critic is None:
            return state
        critic_params = critic.model.init(jax.random.key(0))  # replaced in initial_state
        return state.replace(
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
            out_shardings=shardings.critic_params,
        )
        with jax.set_mesh(mesh):
            return state.replace(critic_params=start_critic(state.reward_params[0]))

    stage = Stage(
        name="ppo",
        model=model,
        batch=batch,
        tokens_per_step=batch_size * (p + n) * ppo_cfg.epochs,
        **trimmed_row_fields(n),
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
        initial_params=params_from_run(ppo_cfg.policy_from, "ppo.policy_from"),
        initial_state=initial_state,
        batch_metrics=lambda: dict(last_rollout),
        rollouts=True,
    )
    announce(
        "ppo",
        f"{len(train_ids)} training and {len(eval_ids)} held-out prompts; {batch_size} rollouts "
        f"of up to {n} tokens per iteration, {ppo_cfg.epochs} epochs x {ppo_cfg.minibatches} "
        f"minibatches; reward model(s) "
        + ", ".join(
            f"{m['reward_from']} (score mean {m['score_mean']:.3f}, std {m['score_std']:.3f})"
            for m in statistics
        )
        + f", combined by {ppo_cfg.reward_aggregation}; gold rule {ppo_cfg.gold_rule}",
    )
    return run_training(cfg, stage, mesh)
