"""R1-style reasoning RL with GRPO: G replies per prompt, rewards by rules, no value model.

One iteration is one loop step:
1. `batch(state, step)`: `train.batch_size` prompts, each repeated G = `grpo.group_size`
   times in contiguous rows (`jaxllm.rl.rollouts`: row i * G + g samples with key
   fold_in(fold_in(fold_in(state.rng, step), i), g)), completed by the current policy up
   to `<|im_end|>`; each reply is scored on the host by the named rewards of
   `grpo.rewards` (`jaxllm.rl.rewards`), r = sum_name w_name * r_name, float32 throughout
   (the `reward_model` reward is a reward run's normalised score, computed on the device
   with the frozen `reward_params` extra from `grpo.reward_from`).
2. `update(state, batch)`, one compiled call: the trainer's own log-probs (the "old"
   ones; with one optimizer step per batch, `grpo.iterations` = `grpo.minibatches` = 1,
   every ratio is 1 and they are the loss's own forward pass held fixed, as TRL's, so no
   pass is spent on them), the reference's when beta > 0, the
   advantages of the estimator named by `grpo.advantage_estimator`
   (`rl.advantages.ADVANTAGE_ESTIMATORS`): `grpo`, A_i = (r_i - mean_g) / (std_g +
   std_eps) (GRPO); `dr_grpo`, r_i - mean_g (Dr. GRPO); `rloo`, r_i - the mean of the
   group's other rewards (RLOO); `reinforce_pp`, r_i - mean_g whitened over the batch's
   trained tokens (REINFORCE++-baseline); the first three give exactly 0 to a group
   whose rewards are all equal, reinforce_pp gives it -mu / sigma of the batch unless
   `dynamic_sampling` leaves it out; then `iterations` x `minibatches` optimizer steps on

       loss_t = max(-A r_t, -A clip(r_t, 1 - eps_low, 1 + eps_high)) + beta * kl_t

   with r_t = pi(y_t) / pi_old(y_t), or at `importance_sampling_level=sequence` (GSPO)
   r_t = s_i, the reply's length-normalised likelihood ratio (the geometric mean of its
   tokens' ratios), clipped as a whole (`rl.policy_losses.sequence_log_ratios`;
   `clip_fraction` is then the share of tokens in clipped replies; GSPO's objective is
   `sequence_mean`'s, the other aggregations weigh replies by length)

   aggregated by `loss_aggregation` (`sequence_mean`: GRPO's 1 / (n_i B);
   `token_mean`: DAPO's 1 / sum n; `constant_length`: Dr. GRPO's 1 / (B L_max)). The
   KL term kl_t is `grpo.kl_estimator`'s (`rl.kl.KL_ESTIMATORS`), by default k2 =
   (log pi - log pi_ref)^2 / 2: its gradient, (log pi - log pi_ref) grad log pi, is the
   gradient of KL(pi || pi_ref) on the policy's own samples (k3 in the loss, as GRPO's
   paper writes it, has the gradient of KL(pi_ref || pi)); the logged `kl` is k3's value.
   `dynamic_sampling` leaves groups of equal rewards out of the loss (they would only
   dilute it; DAPO also resamples to refill the batch, which this does not), and
   `mask_truncated` leaves out replies cut off at `max_new_tokens`; the estimator sees
   the rewards of every reply but only the tokens trained (what reinforce_pp whitens over).
   With `share_prompt` (on), the update's forward passes compute each group's prompt
   once, in one row with its G replies each at its own length, and `pack_groups` groups
   end to end in that row (`rl.rollouts.group_rows`), where that costs fewer FLOPs;
   minibatches then hold whole packs.

`grpo.shuffled_answers` makes a control run: the training prompts' answers permuted among
them, the held-out ones true.

A collapse watch (`rl.watch.CollapseWatch`, `grpo.collapse_window` iterations each side)
warns once, in one line naming the likely cause, when the rollouts' reward falls while
their entropy rises (a step too large), the `correct` reward falls while `format` holds (a
shortcut), the entropy collapses, or held-out accuracy falls below its best at two evals.

Eval on held-out prompts: greedy accuracy overall and per family (`accuracy_<family>`),
pass@k from G samples per prompt (the unbiased 1 - C(n - c, k) / C(n, k)), format rate,
reply and think lengths; from the second eval on, `accuracy_change_se`, the paired standard
error of the accuracy's change since the first eval (`stages.paired`); greedy replies of
the first `train.samples` prompts go to `samples.jsonl`.
"""

from __future__ import annotations

import dataclasses
import functools
import sys

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.config import Config, GRPOConfig
from jaxllm.data.prompts import Prompt, shuffled_answers
from jaxllm.errors import ConfigError, DataError
from jaxllm.eval import answer_figures
from jaxllm.model import LanguageModel
from jaxllm.rl.advantages import (
    ADVANTAGE_ESTIMATORS,
    CRITIC_ESTIMATORS,
    AdvantageInputs,
    masked_mean,
)
from jaxllm.rl.episodes import Rollout
from jaxllm.rl.kl import KL_ESTIMATORS, kl_k3, kl_penalty
from jaxllm.rl.policy_losses import aggregate, clipped_policy_loss, sequence_log_ratios
from jaxllm.rl.rewards import format_ok, make_rewards, score_replies
from jaxllm.rl.rollouts import (
    completion_outputs,
    group_keys,
    group_rows,
    groups_per_pack,
    reward_model_scores,
    sample_groups,
)
from jaxllm.rl.watch import CollapseWatch
from jaxllm.sharding import data_parallel_size, put_batch, put_rows_padded
from jaxllm.stages.common import (
    reward_ensemble_statistics,
    reward_params_loader,
    reward_run_dirs,
)
from jaxllm.stages.paired import FirstEval
from jaxllm.stages.rollout import on_policy, room_problems
from jaxllm.state import TrainState, reference_params, with_reference
from jaxllm.steps import LossAux, UpdateContext, minibatch_update
from jaxllm.tokenizer import Tokenizer
from jaxllm.trainer import RunResult, step_key


@dataclasses.dataclass(frozen=True)
class Settings:
    """What the compiled GRPO functions close over: the `grpo` section, and the tokenizer's
    real vocabulary (log-probs are over its ids only)."""

    grpo: GRPOConfig
    vocab_size: int
    pack_rows: int = 1  # consecutive rows computed as one packed row (`group_rows`), or 1

    @property
    def on_policy(self) -> bool:
        """One optimizer step per batch (`iterations` = `minibatches` = 1; micro-batches
        share its params): the old policy's log-probs are the loss's own, held fixed."""
        return self.grpo.iterations == 1 and self.grpo.minibatches == 1


def think_lengths(tokenizer: Tokenizer, replies: list[list[int]]) -> np.ndarray:
    """(B,) tokens between `<think>` and `</think>` of each reply (0 without both)."""
    if tokenizer.think_ids() is None:
        return np.zeros(len(replies), np.float32)
    think, end_think = tokenizer.think_ids()
    lengths = []
    for ids in replies:
        ok = think in ids and end_think in ids[ids.index(think) :]
        lengths.append(ids.index(end_think, ids.index(think)) - ids.index(think) - 1 if ok else 0)
    return np.array(lengths, np.float32)


def prepare(model: LanguageModel, s: Settings, state: TrainState, batch):
    """The scored rollouts as GRPO's training rows: (rows, metrics)."""
    g = s.grpo
    mask_bn = batch["mask_bn"]
    rewards_b = batch["reward_b"]
    rewards_gk = rewards_b.reshape(-1, g.group_size)
    flat_g = jnp.max(rewards_gk, axis=1) == jnp.min(rewards_gk, axis=1)
    keep_b = jnp.ones_like(rewards_b)
    if g.dynamic_sampling:
        keep_b = keep_b * jnp.repeat(~flat_g, g.group_size)
    if g.mask_truncated:
        keep_b = keep_b * batch["ended_b"]
    trained_bn = mask_bn * keep_b[:, None]
    estimator = ADVANTAGE_ESTIMATORS[g.advantage_estimator]
    estimate = estimator(AdvantageInputs(rewards_b, trained_bn, g.group_size, g.std_eps))
    rows = {
        "tokens_bt": batch["tokens_bt"],
        "positions_bt": batch["positions_bt"],
        "segment_ids_bt": batch["segment_ids_bt"],
        "mask_bn": trained_bn,
        "advantages_bn": estimate.advantages_bn,
        **{name: x for name, x in batch.items() if name.startswith("group_")},
    }
    metrics = {}
    if s.on_policy:  # the loss's own forward pass is the old policy's: no pass here
        rows["sampler_logprobs_bn"] = batch["sampler_logprobs_bn"]
        rows["written_bn"] = mask_bn  # every written token, trained or not
    else:
        old_logprobs_bn = completion_outputs(
            model, state.params, batch, g.temperature, s.vocab_size, pack_rows=s.pack_rows
        ).logprobs_bn
        rows["old_logprobs_bn"] = old_logprobs_bn
        metrics["logprob_gap"] = masked_mean(
            jnp.abs(old_logprobs_bn - batch["sampler_logprobs_bn"]), mask_bn
        )
    if g.beta > 0:
        rows["ref_logprobs_bn"] = completion_outputs(
            model,
            reference_params(model, state),
            batch,
            g.temperature,
            s.vocab_size,
            pack_rows=s.pack_rows,
        ).logprobs_bn
    lengths_b = jnp.sum(mask_bn, axis=1)
    correct_b = batch["correct_b"]
    metrics |= {
        "reward": jnp.mean(rewards_b),
        "accuracy": jnp.mean(correct_b),
        "format_rate": jnp.mean(batch["format_b"]),
        "frac_zero_std_groups": jnp.mean(flat_g.astype(jnp.float32)),
        "response_length": jnp.mean(lengths_b),
        "response_length_correct": masked_mean(lengths_b, correct_b),
        "response_length_wrong": masked_mean(lengths_b, 1.0 - correct_b),
        "think_length": jnp.mean(batch["think_length_b"]),
        "truncated_fraction": 1.0 - jnp.mean(batch["ended_b"]),
    }
    for name in batch:
        if name.startswith("reward_") and name != "reward_b":
            metrics[name[:-2]] = jnp.mean(batch[name])
    return jax.lax.stop_gradient(rows), metrics


def grpo_loss(model, params, rows, *, s: Settings):
    """(aggregated loss sum, LossAux) of one minibatch: clipped surrogate with the
    advantages (+ beta * the `g.kl_estimator` KL to the reference), aggregated by
    `g.loss_aggregation`."""
    g = s.grpo
    out = completion_outputs(
        model, params, rows, g.temperature, s.vocab_size, True, pack_rows=s.pack_rows
    )
    mask_bn = rows["mask_bn"]
    gap = {}
    if s.on_policy:  # one optimizer step on the batch: the old policy is this one (with
        # adapter dropout, the pass with its dropout, as TRL's)
        old_bn = jax.lax.stop_gradient(out.logprobs_bn)
        written_bn = rows["written_bn"]
        gap_bn = jnp.abs(old_bn - rows["sampler_logprobs_bn"]) * written_bn
        gap["logprob_gap"] = (jnp.sum(gap_bn), jnp.sum(written_bn))
    else:
        old_bn = rows["old_logprobs_bn"]
    new_bn, reference_bn = out.logprobs_bn, old_bn  # token level: each token's own ratio
    if g.importance_sampling_level == "sequence":  # GSPO: one ratio per reply
        new_bn = sequence_log_ratios(out.logprobs_bn, old_bn, mask_bn)
        reference_bn = jnp.zeros_like(old_bn)
    policy = clipped_policy_loss(
        new_bn,
        reference_bn,
        rows["advantages_bn"],
        eps_low=g.eps_low,
        eps_high=g.eps_high,
        dual_clip=g.dual_clip,
    )
    loss_bn = policy.loss_bt
    means = {}
    if g.beta > 0:
        ref_logprobs_bn = rows["ref_logprobs_bn"]
        loss_bn = loss_bn + g.beta * kl_penalty(out.logprobs_bn, ref_logprobs_bn, g.kl_estimator)
        # logged: k3's value (unbiased, >= 0), whichever estimator is in the loss
        means["kl"] = kl_k3(out.logprobs_bn, ref_logprobs_bn)
    loss_sum, denominator = aggregate(loss_bn, mask_bn, g.loss_aggregation, g.max_new_tokens)
    tokens = jnp.sum(mask_bn)

    def token_mean(x_bn):
        return jnp.sum(jnp.where(mask_bn > 0, x_bn, 0.0)), tokens

    means.update(
        clip_fraction=policy.clipped_bt,
        approx_kl=kl_k3(old_bn, out.logprobs_bn),  # per token at either level
        entropy=out.entropies_bn,
        ratio=jnp.exp(new_bn - reference_bn),  # the ratio the clip sees
    )
    if g.dual_clip is not None:
        means["dual_clip_fraction"] = policy.dual_clipped_bt
    means = {k: token_mean(v) for k, v in means.items()}
    return loss_sum, LossAux(denominator, means={**means, **gap})


def grpo_update(context: UpdateContext, *, s: Settings, iterations: int, minibatches: int):
    """`prepare`, then iterations x minibatches optimizer steps, in one compiled call."""
    train = minibatch_update(
        context, epochs=iterations, minibatches=minibatches, rows_together=s.pack_rows
    )

    def update(state: TrainState, batch):
        rows, metrics = prepare(context.model, s, state, batch)
        state, train_metrics = train(state, rows)
        return state, {**train_metrics, **metrics}

    return update


def config_problems(cfg: Config) -> list[str]:
    """GRPO's rules between its section and the rest: a reply's room in the context, the
    iteration's replies split into minibatches x micro-batches, a reward run read."""
    g, train = cfg.grpo, cfg.train
    problems = room_problems(cfg, "grpo")
    estimators = [n for n in ADVANTAGE_ESTIMATORS.names() if n not in CRITIC_ESTIMATORS]
    if g.advantage_estimator in CRITIC_ESTIMATORS:
        problems.append(
            f"grpo.advantage_estimator='{g.advantage_estimator}' needs a value model, which "
            f"GRPO has not; use one of {', '.join(estimators)} (or the ppo stage)"
        )
    elif g.advantage_estimator not in ADVANTAGE_ESTIMATORS:
        problems.append(
            f"grpo.advantage_estimator='{g.advantage_estimator}' is unknown; use one of "
            f"{', '.join(estimators)}, or register_advantage_estimator(name, fn) in your script"
        )
    if g.kl_estimator not in KL_ESTIMATORS:
        kl_names = list(KL_ESTIMATORS.names())
        problems.append(
            f"grpo.kl_estimator='{g.kl_estimator}' is unknown; use "
            f"{', '.join(kl_names[:-1])} or {kl_names[-1]}"
        )
    if g.reward_from is not None and "reward_model" not in g.rewards:
        problems.append(
            f"grpo.reward_from={g.reward_from} is read only by the reward_model reward, which "
            f"grpo.rewards={g.rewards} leaves out; add reward_model to grpo.rewards or unset "
            "grpo.reward_from"
        )
    rows = train.batch_size * g.group_size
    if g.minibatches >= 1 and rows % (g.minibatches * max(train.grad_accum, 1)):
        problems.append(
            f"{rows} replies per iteration (train.batch_size x grpo.group_size) do not split "
            f"into grpo.minibatches={g.minibatches} x train.grad_accum={train.grad_accum}"
        )
    return problems


def grpo(cfg: Config) -> RunResult:
    """Train a policy with GRPO in `cfg.out_dir` (resuming if it holds a run)."""
    g = cfg.grpo
    group, prompts_per_step = g.group_size, cfg.train.batch_size
    run = on_policy(
        cfg,
        "grpo",
        prompts_per_step * group,
        "train.batch_size x grpo.group_size replies",
    )
    if g.shuffled_answers:
        run.train_prompts = shuffled_answers(run.train_prompts, cfg.train.seed)
    cfg, tokenizer, n = run.cfg, run.tokenizer, run.new_tokens
    weights = dict(g.rewards)
    rewards = make_rewards(weights, tokenizer, n, g.length_cache, g.answer_format)
    for name, prompts in (("training", run.train_prompts), ("held-out", run.eval_prompts)):
        missing = [q for q in prompts if q.fields.get("answer") is None]
        if missing and "correct" in weights:
            raise DataError(
                f"{len(missing)} {name} prompts have no 'answer' (the first: "
                f"{missing[0].text[:60]!r}) but grpo.rewards uses 'correct'; add answers or "
                "drop the 'correct' reward"
            )
    uses_reward_model = "reward_model" in weights
    statistics = None
    if uses_reward_model:
        runs = reward_run_dirs(g.reward_from, "grpo.reward_from")
        if len(runs) > 1:
            raise ConfigError(
                f"grpo.reward_from names {len(runs)} runs; the reward_model reward reads one"
            )
        (statistics,) = reward_ensemble_statistics(cfg, runs, "grpo.reward_from", True)
    micro_prompts, split = divmod(prompts_per_step, g.minibatches * max(cfg.train.grad_accum, 1))
    if g.share_prompt and not split:
        groups = groups_per_pack(micro_prompts, g.pack_groups, data_parallel_size(run.mesh))
        run.pack_rows, run.group_size = groups * group, group
    s = Settings(g, tokenizer.vocab_size, run.pack_rows)
    warned = []
    # Accuracy is logged whenever the prompts have answers, rewarded or not.
    has_answers = all(
        q.fields.get("answer") is not None for q in (*run.train_prompts, *run.eval_prompts)
    )
    check_correct = make_rewards({"correct": 1.0}, tokenizer, n, 1, g.answer_format)["correct"]

    @jax.jit
    def normalised_scores(reward_params, rows):
        raw_b = reward_model_scores(run.reward_model, reward_params, rows)
        return (raw_b - statistics["score_mean"]) / statistics["score_std"]

    def scored(
        state: TrainState, prompt_ids, prompts: list[Prompt], rollout: Rollout
    ) -> tuple[dict[str, np.ndarray], list[str]]:
        """Host rewards and per-row figures of one rollout."""
        replies = rollout.replies()
        texts = run.texts(rollout)
        examples = [
            {**episode, **q.fields, "completion_ids": ids}
            for q, ids, episode in zip(prompts, replies, run.episode_lines(rollout), strict=True)
        ]
        if uses_reward_model:
            with jax.set_mesh(run.mesh):
                rows = put_rows_padded(run.rows(prompt_ids, rollout), run.mesh)
                model_scores = jax.device_get(
                    normalised_scores(state.extras["reward_params"][0], rows)
                )
            model_scores = model_scores[: len(examples)]
            for example, score in zip(examples, model_scores, strict=True):
                example["reward_model_score"] = float(score)
        total, named = score_replies(rewards, weights, [q.text for q in prompts], texts, examples)
        correct = named.get("correct")
        if correct is None and has_answers:
            correct = np.array(
                [
                    check_correct(q.text, t, e)
                    for q, t, e in zip(prompts, texts, examples, strict=True)
                ],
                np.float32,
            )
        return {
            "reward_b": total,
            **{f"reward_{name}_b": values for name, values in named.items()},
            "correct_b": np.zeros(len(texts), np.float32) if correct is None else correct,
            "format_b": np.array([format_ok(tokenizer, ids) for ids in replies], np.float32),
            "think_length_b": think_lengths(tokenizer, replies),
        }, texts

    def batch(state, step):
        chosen = run.step_prompts(step, prompts_per_step)
        prompt_ids = [run.train_ids[c] for c in chosen for _ in range(group)]
        prompts = [run.train_prompts[c] for c in chosen for _ in range(group)]
        keys = group_keys(step_key(state, step), prompts_per_step, group)
        rollout = run.roll_out(state.params, prompts, prompt_ids, keys, temperature=g.temperature)
        host = run.rows(prompt_ids, rollout)
        host.update(group_rows(run.model, host, s.pack_rows, run.group_size))
        figures, _ = scored(state, prompt_ids, prompts, rollout)
        if not warned and not host["ended_b"].any() and jax.process_index() == 0:
            warned.append(True)
            print(
                f"warning: none of the {len(prompt_ids)} replies of step {step} ends with "
                f"<|im_end|>: is grpo.policy_from={g.policy_from} a chat (SFT) model?",
                file=sys.stderr,
            )
        run.record(host, rollout)
        watch_rollout(step + 1, host, figures)
        return put_batch({**host, **figures}, run.mesh)

    families = [str(q.fields.get("family", "all")) for q in run.eval_prompts]
    collapse = CollapseWatch(g.collapse_window)
    first_eval = FirstEval(cfg.out_dir, [q.text for q in run.eval_prompts])

    def warn(said: str | None) -> None:
        if said and jax.process_index() == 0:
            print(said, file=sys.stderr, flush=True)

    def watch_rollout(step: int, host: dict, figures: dict) -> None:
        """The collapse watch's view of one rollout: mean reward, the sampled tokens' mean
        negative log-prob (an entropy estimate), and the correct and format rewards."""
        written = host["mask_bn"]
        entropy = -float((host["sampler_logprobs_bn"] * written).sum()) / max(written.sum(), 1)
        nan = np.array([np.nan])
        means = [figures.get(f"reward_{n}_b", nan).mean() for n in ("correct", "format")]
        warn(collapse.add_rollout(step, float(figures["reward_b"].mean()), entropy, *means))

    # The eval's G samples per prompt are drawn in calls of a training rollout's rows (at
    # least 128), so they run the sampler's compiled steps for those shapes too.
    rollout_rows = max(prompts_per_step * group, 128)  # (fewer rows cost about as much)

    def evaluate(state, key) -> dict[str, float]:
        eval_ids, eval_prompts = run.eval_ids, run.eval_prompts
        greedy = run.roll_out(state.params, eval_prompts, eval_ids, key, temperature=0.0)
        figures, texts = scored(state, eval_ids, eval_prompts, greedy)
        repeated = [q for q in eval_prompts for _ in range(group)]
        repeated_ids = [ids for ids in eval_ids for _ in range(group)]
        if greedy.episodes is None:
            sampled = Rollout(
                sample_groups(
                    run.generator,
                    state.params,
                    eval_ids,
                    group,
                    key,
                    max_rows=rollout_rows,
                    temperature=g.temperature,
                    stop_ids=run.stop_ids,
                ),
                None,
                0.0,
            )
        else:
            keys = group_keys(key, len(eval_ids), group)
            sampled = run.roll_out(
                state.params,
                repeated,
                repeated_ids,
                keys,
                max_rows=rollout_rows,
                temperature=g.temperature,
            )
        sampled_correct = scored(state, repeated_ids, repeated, sampled)[0]["correct_b"]
        sampled_correct = sampled_correct.reshape(-1, group)
        values = answer_figures(figures["correct_b"], sampled_correct, families, [g.pass_k])
        values.update(
            {
                "format_rate": float(figures["format_b"].mean()),
                "reward": float(figures["reward_b"].mean()),
                "response_length": float(greedy.completion.mask.sum(1).mean()),
                "think_length": float(figures["think_length_b"].mean()),
                "eval_prompts": len(eval_prompts),
            }
        )
        values.update(run.episode_means(greedy))
        step = int(jax.device_get(state.step))
        if has_answers:
            values.update(first_eval.change_errors(step, {"accuracy": figures["correct_b"]}))
            if step > 0:
                warn(collapse.add_eval(step, values["accuracy"], len(eval_prompts)))
        episodes = run.episode_lines(greedy)
        run.write_samples(
            [
                {
                    "step": step,
                    "prompt": eval_prompts[i].text,
                    "completion": texts[i],
                    "reward": float(figures["reward_b"][i]),
                    "correct": bool(figures["correct_b"][i]),
                    **episodes[i],
                }
                for i in range(len(texts))
            ]
        )
        return values

    def extend(state: TrainState) -> TrainState:
        if g.beta > 0:
            state = with_reference(run.model, state)
        if uses_reward_model:  # replaced by the reward run's params in initial_state
            state = state.with_extras(reward_params=[run.reward_model.init(jax.random.key(0))])
        return state

    stage = run.stage(
        batch=batch,
        tokens_per_step=prompts_per_step * group * cfg.train.seq_len * g.iterations,
        loss_fn=functools.partial(grpo_loss, s=s),
        update=functools.partial(
            grpo_update, s=s, iterations=g.iterations, minibatches=g.minibatches
        ),
        updates_per_step=g.iterations * g.minibatches,
        extend_state=extend if g.beta > 0 or uses_reward_model else None,
        extra_eval=evaluate,
        initial_state=reward_params_loader(cfg, run.reward_model, "grpo.reward_from", [statistics])
        if uses_reward_model
        else None,
    )
    return run.run(
        stage,
        f"{prompts_per_step} prompts x {group} replies of up to {n} tokens per iteration; "
        f"{g.advantage_estimator} advantages; rewards {weights}",
    )
