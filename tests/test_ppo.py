"""PPO: the pure pieces against their formulas, then `jaxllm ppo` end to end on a tiny SFT
run and reward run (1 device and an 8-device mesh, kill -9 and resume without the runs it
started from, a separate critic, bad input)."""

import dataclasses
import json
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import (
    TWO_STEPS,
    assert_params_close,
    cpu_environment,
    finished_checkpoints,
    kill_9_after_first_checkpoint,
    outputs_of_success,
    tiny_config,
    tiny_sft_run,
    two_processes,
)

from jaxllm.checkpoint import Checkpointer
from jaxllm.cli import main as cli_main
from jaxllm.config import PPOConfig, load_config
from jaxllm.errors import ConfigError
from jaxllm.generate import Completion
from jaxllm.metrics import read_metrics
from jaxllm.model import LanguageModel
from jaxllm.rl.rollouts import (
    completion_width,
    group_rows,
    prompt_width,
    rollout_figures,
    rollout_rows,
    row_columns,
    widest_rows,
)
from jaxllm.rl.watch import CollapseWatch
from jaxllm.stages.common import load_run
from jaxllm.stages.ppo import (
    COLLAPSE_ADVICE,
    Settings,
    adapted_kl_coef,
    critic_from_reward_model,
    critic_values,
    ensemble_score,
    normalised_scores,
    policy_outputs,
    ppo_loss,
    prepare,
    shaped_scores,
    token_rewards,
)
from jaxllm.state import TrainState

P, N = 6, 5


def settings(score_means=(0.0,), score_stds=(1.0,), **changes) -> Settings:
    values = dict(
        temperature=1.0,
        clip_eps=0.2,
        value_clip_eps=0.2,
        vf_coef=0.0,
        entropy_coef=0.0,
        value_stop_gradient=False,
        critic="shared",
        gamma=1.0,
        lam=0.95,
        kl_target=0.1,
        kl_horizon=100,
        kl_coef_min=None,
        reward_aggregation="mean",
        reward_clip=None,
        missing_eos_penalty=None,
        whiten_advantages=True,
        gold_rule=None,
    )
    ppo = PPOConfig(**{**values, **changes})
    return Settings(ppo, vocab_size=300, score_means=score_means, score_stds=score_stds)


@pytest.fixture(scope="module")
def tiny():
    """A tiny policy with a value head, a reward model, and a batch of 4 rollouts whose
    completions have 5, 3, 1 and 4 tokens."""
    cfg = load_config(None, ["preset=tiny"]).model
    model = LanguageModel(dataclasses.replace(cfg, scalar_heads=["value"]))
    reward_model = model.with_heads(["reward"])
    params = model.init(jax.random.key(0))
    params["heads"]["value"]["w_d"] = 0.1 * jax.random.normal(jax.random.key(1), (cfg.embed_dim,))
    reward_params = reward_model.init(jax.random.key(2))  # its head starts at 0: turn it
    reward_params["heads"]["reward"]["w_d"] = params["heads"]["value"]["w_d"][::-1]
    rng = np.random.default_rng(0)
    tokens = rng.integers(3, 250, (4, P + N)).astype(np.int32)
    segments = np.ones((4, P + N), np.int32)
    segments[1, :2] = 0  # a shorter, left-padded prompt
    lengths = np.array([5, 3, 1, 4])
    mask = (np.arange(N)[None] < lengths[:, None]).astype(np.float32)
    segments[:, P:] = mask
    batch = {
        "tokens_bt": jnp.asarray(tokens),
        "positions_bt": jnp.asarray(np.maximum(np.cumsum(segments, 1) - 1, 0), jnp.int32),
        "segment_ids_bt": jnp.asarray(segments),
        "mask_bn": jnp.asarray(mask),
        "sampler_logprobs_bn": jnp.zeros((4, N)),
        "ended_b": jnp.asarray([1.0, 1.0, 0.0, 1.0]),
        "gold_reward_b": jnp.zeros(4),
    }
    state = TrainState(
        step=jnp.int32(0),
        params=params,
        opt_state=None,
        rng=jax.random.key_data(jax.random.key(0)),
        extras={
            "ref_params": jax.tree.map(lambda x: x + 0.01, params),
            "kl_coef": jnp.float32(0.2),
            "reward_params": [reward_params],
        },
    )
    return model, reward_model, state, batch


def test_the_score_lands_on_the_last_completion_token_and_rewards_sum_to_score_minus_kl():
    mask = jnp.asarray([[1.0, 1, 1, 0, 0], [1.0, 0, 0, 0, 0]])
    k1 = jnp.asarray([[0.1, -0.2, 0.3, 9.0, 9.0], [0.5, 9.0, 9.0, 9.0, 9.0]])
    score = jnp.asarray([2.0, -1.0])
    rewards = token_rewards(score, k1, mask, 0.5)
    np.testing.assert_allclose(rewards[0], [-0.05, 0.1, 2.0 - 0.15, 0, 0], rtol=1e-6)
    np.testing.assert_allclose(rewards[1], [-1.0 - 0.25, 0, 0, 0, 0], rtol=1e-6)
    np.testing.assert_allclose(rewards.sum(1), score - 0.5 * jnp.sum(k1 * mask, 1), rtol=1e-6)


def test_an_ensemble_scores_each_model_normalised_then_takes_mean_min_or_mean_minus_std():
    raw_mb = jnp.array([[1.0, 2.0, 3.0], [3.0, 2.0, -1.0], [0.0, 0.0, 0.0]])
    s = settings(score_means=(1.0, -1.0, 0.0), score_stds=(2.0, 1.0, 1.0))
    normalised_mb = normalised_scores(raw_mb, s)
    np.testing.assert_allclose(normalised_mb, [[0, 0.5, 1], [4, 3, 0], [0, 0, 0]])
    want = {
        "mean": normalised_mb.mean(0),
        "min": normalised_mb.min(0),
        "mean_minus_std": normalised_mb.mean(0) - np.std(np.asarray(normalised_mb), axis=0),
    }
    for aggregation, expected in want.items():
        np.testing.assert_allclose(ensemble_score(normalised_mb, aggregation), expected, rtol=1e-6)
    one = shaped_scores(raw_mb[:1], jnp.ones(3), settings(score_means=(1.0,), score_stds=(2.0,)))
    for aggregation in want:  # one model: every aggregation is its normalised score
        np.testing.assert_array_equal(ensemble_score(normalised_mb[:1], aggregation), one)


def test_a_cut_off_reply_loses_the_missing_eos_penalty_after_the_clip():
    raw_mb = jnp.array([[3.0, 2.0, 9.0, 2.0]])
    ended_b = jnp.array([1.0, 0.0, 0.0, 1.0])
    s = settings(score_means=(1.0,), score_stds=(2.0,), reward_clip=1.5, missing_eos_penalty=0.5)
    # Normalised 1, 0.5, 4 (clipped to 1.5), 0.5; the two cut-off replies lose 0.5 (TRL's sign).
    np.testing.assert_array_equal(shaped_scores(raw_mb, ended_b, s), [1.0, 0.0, 1.0, 0.5])
    unpenalised = settings(score_means=(1.0,), score_stds=(2.0,), reward_clip=1.5)
    np.testing.assert_array_equal(shaped_scores(raw_mb, ended_b, unpenalised), [1, 0.5, 1.5, 0.5])
    assert load_config(None, ["ppo.missing_eos_penalty=1.0"]).ppo.missing_eos_penalty == 1.0
    with pytest.raises(ConfigError, match=r"ppo.missing_eos_penalty=-1.0 must be >= 0"):
        load_config(None, ["ppo.missing_eos_penalty=-1.0"])


def test_the_kl_controller_holds_at_the_target_and_moves_by_at_most_a_fifth():
    s = settings(kl_target=0.1, kl_horizon=100)
    assert adapted_kl_coef(jnp.float32(0.3), 0.1, 16, s) == pytest.approx(0.3)
    assert adapted_kl_coef(jnp.float32(0.3), 0.15, 16, s) == pytest.approx(0.3 * (1 + 0.2 * 0.16))
    assert adapted_kl_coef(jnp.float32(0.3), 10.0, 16, s) == pytest.approx(0.3 * (1 + 0.2 * 0.16))
    assert adapted_kl_coef(jnp.float32(0.3), 0.0, 16, s) == pytest.approx(0.3 * (1 - 0.2 * 0.16))
    assert adapted_kl_coef(jnp.float32(0.3), 5.0, 16, settings(kl_target=None)) == 0.3
    floored = settings(kl_coef_min=0.299)  # anti-windup: never under the floor
    assert adapted_kl_coef(jnp.float32(0.3), 0.0, 16, floored) == pytest.approx(0.299)
    assert adapted_kl_coef(jnp.float32(0.3), 10.0, 16, floored) == pytest.approx(0.3 * 1.032)


def test_editing_token_t_does_not_change_the_value_before_it(tiny):
    model, _, state, batch = tiny
    _, values, _ = policy_outputs(model, state.params, batch, settings())
    edited = dict(batch, tokens_bt=batch["tokens_bt"].at[:, P + 2].set(7))
    _, edited_values, _ = policy_outputs(model, state.params, edited, settings())
    np.testing.assert_array_equal(values[:, :3], edited_values[:, :3])  # V_0..V_2: before y_2
    assert not np.allclose(values[0, 3], edited_values[0, 3])  # V_3 has seen y_2


def test_a_separate_critic_starts_as_the_reward_models_normalised_score(tiny):
    """V before token t = (reward head at that column - mean) / std; the critic's params are
    copies (the frozen reward model is not aliased), and editing y_t leaves V_t alone."""
    _, reward_model, state, batch = tiny
    reward_params = state.extras["reward_params"][0]
    reward_params["heads"]["reward"]["bias"] = jnp.float32(0.4)
    critic = critic_from_reward_model(reward_params, score_mean=0.3, score_std=2.0)
    critic_model = reward_model.with_heads(["value"])
    values_bn = critic_values(critic_model, critic, batch)
    hidden_btd = reward_model.hidden(
        reward_params, batch["tokens_bt"], batch["positions_bt"], batch["segment_ids_bt"]
    )
    scores_bt = reward_model.scalar_head(reward_params, "reward", hidden_btd)
    np.testing.assert_allclose(values_bn, (scores_bt[:, P - 1 : P + N - 1] - 0.3) / 2.0, atol=1e-5)
    assert critic["token_embedding_vd"] is not reward_params["token_embedding_vd"]
    edited = dict(batch, tokens_bt=batch["tokens_bt"].at[:, P + 2].set(7))
    np.testing.assert_array_equal(
        critic_values(critic_model, critic, edited)[:, :3], values_bn[:, :3]
    )


def test_first_minibatch_is_on_policy_and_its_gradient_is_the_plain_policy_gradient(tiny):
    model, reward_model, state, batch = tiny
    s = settings()
    rows, metrics, kl_coef = prepare(model, reward_model, s, state, batch)
    loss_sum, aux = ppo_loss(model, state.params, rows, s=s)
    ratio_sum, tokens = aux.means["ratio"]
    assert float(ratio_sum / tokens) == pytest.approx(1.0, abs=1e-6)
    assert float(aux.means["clip_fraction"][0]) == 0.0
    assert float(aux.means["approx_kl"][0]) == pytest.approx(0.0, abs=1e-7)

    def plain(params):
        logprobs, _, _ = policy_outputs(model, params, rows, s)
        return -jnp.sum(rows["mask_bn"] * rows["advantages_bn"] * logprobs)

    ppo_grads = jax.grad(lambda p: ppo_loss(model, p, rows, s=s)[0])(state.params)
    plain_grads = jax.grad(plain)(state.params)
    for ppo_leaf, plain_leaf in zip(
        jax.tree.leaves(ppo_grads), jax.tree.leaves(plain_grads), strict=True
    ):
        np.testing.assert_allclose(ppo_leaf, plain_leaf, rtol=1e-5, atol=1e-8)
    # The controller moved toward the target from this batch's KL.
    assert float(kl_coef) != pytest.approx(0.2) and float(metrics["kl_coef"]) == pytest.approx(0.2)


def with_value_loss(state, reward_model, separate_critic: bool):
    """(settings with value and entropy terms, the state, the critic's model or None): the
    shared value head, or a separate critic started from the reward model."""
    s = settings(vf_coef=0.5, entropy_coef=0.01, critic="separate" if separate_critic else "shared")
    if not separate_critic:
        return s, state, None
    critic = critic_from_reward_model(state.extras["reward_params"][0], 0, 1)
    return s, state.with_extras(critic_params=critic), reward_model.with_heads(["value"])


@pytest.mark.parametrize(
    ("separate_critic", "side"), [(False, "completion"), (True, "completion"), (False, "prompt")]
)
def test_empty_columns_change_no_score_metric_or_gradient(tiny, separate_critic, side):
    """Rollout rows keep only the prompt columns their longest prompt needs (`prompt_width`)
    and the completion columns their longest reply needs (`completion_width`): the dropped
    columns hold no token, so scoring, metrics, advantages and the gradient are those of
    the full width."""
    model, reward_model, state, batch = tiny
    if side == "completion":
        extra = ((0, 0), (0, 3))
        wide = {
            **batch,
            "tokens_bt": jnp.pad(batch["tokens_bt"], extra),
            "positions_bt": jnp.pad(batch["positions_bt"], extra, mode="edge"),
            "segment_ids_bt": jnp.pad(batch["segment_ids_bt"], extra),
            "mask_bn": jnp.pad(batch["mask_bn"], extra),
            "sampler_logprobs_bn": jnp.pad(batch["sampler_logprobs_bn"], extra),
        }
    else:  # more left padding before every prompt
        extra = ((0, 0), (5, 0))
        wide = {**batch, **{k: jnp.pad(batch[k], extra) for k in batch if k.endswith("_bt")}}
    s, state, critic_model = with_value_loss(state, reward_model, separate_critic)
    rows, metrics, kl_coef = prepare(model, reward_model, s, state, batch, critic_model)
    wide_rows, wide_metrics, wide_kl_coef = prepare(
        model, reward_model, s, state, wide, critic_model
    )
    for name, value in metrics.items():
        np.testing.assert_allclose(wide_metrics[name], value, rtol=1e-5, atol=1e-6, err_msg=name)
    assert float(wide_kl_coef) == pytest.approx(float(kl_coef), rel=1e-6)
    written = np.asarray(batch["mask_bn"]) > 0  # (a padding token's log-prob is never read)
    for name in ("old_logprobs_bn", "advantages_bn", "returns_bn"):
        wide_values = np.asarray(wide_rows[name][:, :N])
        np.testing.assert_allclose(wide_values[written], rows[name][written], rtol=1e-5, atol=1e-6)
    for name in ("advantages_bn", "returns_bn"):  # masked out: 0
        assert not np.any(np.asarray(wide_rows[name][:, N:]))

    def loss(params, rows):
        return ppo_loss(model, params, rows, s=s)[0]

    grads = jax.grad(loss)(state.params, rows)
    wide_grads = jax.grad(loss)(state.params, wide_rows)
    for leaf, wide_leaf in zip(jax.tree.leaves(grads), jax.tree.leaves(wide_grads), strict=True):
        # float32 sums over another number of columns (unvectorised at the suite's
        # optimisation level 0, conftest.xla_flags): equal to a few 1e-6, where a padding
        # column that leaked in would move them by about their size (1e-2)
        np.testing.assert_allclose(wide_leaf, leaf, rtol=1e-4, atol=5e-6)


@pytest.mark.parametrize(("separate_critic", "pack"), [(False, 2), (True, 2), (False, 4)])
def test_rollouts_packed_end_to_end_give_each_rows_scores_metrics_and_gradient(
    tiny, separate_critic, pack
):
    """`ppo.pack_rollouts`: the update computes consecutive rollouts as one packed row,
    each prompt and reply its own segment, end to end, with their own positions
    (`group_rows` in groups of 1), and gets what a row each gets: log-probs,
    values, advantages, every metric and the gradient. The packed rows' padding is what
    `padding_fraction` counts."""
    model, reward_model, state, batch = tiny
    host = {name: np.asarray(x) for name, x in batch.items()}
    assert group_rows(model, host, 1) == {}
    packed = {**host, **group_rows(model, host, pack)}
    # rows of 6 + 5, 4 + 3, 6 + 1 and 6 + 4 tokens: pairs of 18 and 17 in 20 columns, or
    # all four, 35, in 40
    assert packed["group_tokens_bw"].shape == (4, 10)
    assert rollout_figures(packed, 1.0)["padding_fraction"] == pytest.approx(1 - 35 / 40)
    packed = {name: jnp.asarray(x) for name, x in packed.items()}
    s, state, critic_model = with_value_loss(state, reward_model, separate_critic)
    rows, metrics, kl_coef = prepare(model, reward_model, s, state, batch, critic_model)
    s_packed = dataclasses.replace(s, pack=pack)
    packed_rows, packed_metrics, packed_kl_coef = prepare(
        model, reward_model, s_packed, state, packed, critic_model
    )
    for name, value in metrics.items():
        np.testing.assert_allclose(packed_metrics[name], value, rtol=1e-5, atol=1e-6, err_msg=name)
    assert float(packed_kl_coef) == pytest.approx(float(kl_coef), rel=1e-6)
    written = np.asarray(batch["mask_bn"]) > 0
    for name in ("old_logprobs_bn", "old_values_bn", "advantages_bn", "returns_bn"):
        np.testing.assert_allclose(
            np.asarray(packed_rows[name])[written], rows[name][written], rtol=1e-5, atol=1e-6
        )
    grads = jax.grad(lambda p: ppo_loss(model, p, rows, s=s)[0])(state.params)
    packed_grads = jax.grad(lambda p: ppo_loss(model, p, packed_rows, s=s_packed)[0])(state.params)
    assert_params_close(packed_grads, grads, rtol=1e-4)


def test_a_pack_pays_by_the_keys_the_backend_scores():
    """64 rollouts of 4 + 10 tokens in rows of 16 + 16 columns, packed into one row of 896:
    the XLA attention scores each query against a block's 16 + 2 x 16 keys, so the pack
    costs fewer FLOPs than the padded rows; cuDNN's takes the whole row's mask (all 896
    keys), so it does not, and the rows stay as they are."""
    cfg = tiny_config().model
    p, n = 16, 16
    segments = np.zeros((64, p + n), np.int32)
    segments[:, p - 4 : p + 10] = 1
    host = {
        "tokens_bt": np.where(segments > 0, 5, 0).astype(np.int32),
        "positions_bt": np.maximum(np.cumsum(segments, 1) - 1, 0).astype(np.int32),
        "segment_ids_bt": segments,
        "mask_bn": segments[:, p:].astype(np.float32),
    }
    packed = group_rows(LanguageModel(cfg), host, 64)
    assert packed["group_tokens_bw"].shape == (64, 14)  # 896 columns, no padding
    cudnn = LanguageModel(dataclasses.replace(cfg, attention="cudnn"))
    assert group_rows(cudnn, host, 64) == {}


def test_rollout_rows_keep_the_columns_of_the_longest_reply():
    assert [completion_width(steps, 48) for steps in (1, 7, 8, 9, 16, 17, 33, 48)] == [
        8,
        8,
        8,
        16,
        16,
        32,
        48,
        48,
    ]
    assert completion_width(3, 5) == 5  # never past the budget
    tokens = np.full((2, 20), 9, np.int32)
    tokens[0, :3], tokens[1, :2] = [4, 5, 1], [6, 1]
    mask = tokens != 9
    completion = Completion(tokens, np.where(mask, -0.5, 0.0), mask, num_steps=3)
    widths = [prompt_width(longest, 64) for longest in (1, 8, 9, 25, 33, 64)]
    assert widths == [8, 8, 16, 32, 64, 64]
    wide = rollout_rows([[7, 7], [8]], completion, 64, pad_id=9, stop_ids=[1])
    assert wide["tokens_bt"].shape == (2, 8 + 8)  # 8 prompt columns of the 64 allowed
    assert wide["segment_ids_bt"][0, :6].sum() == 0 and wide["tokens_bt"][0, 6:8].tolist() == [7, 7]
    rows = rollout_rows([[7, 7], [8]], completion, 4, pad_id=9, stop_ids=[1])
    assert rows["tokens_bt"].shape == (2, 4 + 8) and rows["mask_bn"].shape == (2, 8)
    assert rows["tokens_bt"][0].tolist() == [9, 9, 7, 7, 4, 5, 1, 9, 9, 9, 9, 9]
    assert rows["mask_bn"].sum(1).tolist() == [3, 2] and rows["ended_b"].tolist() == [1, 1]
    assert row_columns(rows) == (4, 8)
    assert rollout_figures(rows, elapsed_s=0.5) == {
        "rollout_tokens_per_sec": 10.0,  # 5 completion tokens in half a second
        "prompt_width": 4,
        "completion_width": 8,
        "padding_fraction": pytest.approx(16 / 24),  # 8 tokens in 2 rows of 12
    }
    # The widest batch the stage can give (compiled first where memory is known): N = 20.
    widest = widest_rows({name: jnp.asarray(x) for name, x in rows.items()}, 4, 20)
    assert {name: x.shape for name, x in widest.items()} == {
        "tokens_bt": (2, 24),
        "positions_bt": (2, 24),
        "segment_ids_bt": (2, 24),
        "mask_bn": (2, 20),
        "sampler_logprobs_bn": (2, 20),
        "ended_b": (2,),
        "gold_reward_b": (2,),
    }
    assert all(widest[name].dtype == rows[name].dtype for name in rows)
    # A stage that packs 2 rows whose first batch was not packed: the widest batch is
    # packed, each pair of rows of 24 columns held as 2 chunks of 24 (`group_rows`).
    packed = widest_rows({name: jnp.asarray(x) for name, x in rows.items()}, 4, 20, 2)
    assert packed["group_tokens_bw"].shape == (2, 24) and packed["group_source_bn"].shape == (2, 20)
    assert packed["group_prefix_ids_bw"].dtype == np.int32


def test_tokens_clipped_in_the_direction_of_their_advantage_carry_no_gradient(tiny):
    model, reward_model, state, batch = tiny
    s = settings()
    rows, _, _ = prepare(model, reward_model, s, state, batch)
    advantages = jnp.asarray(rows["advantages_bn"])
    # Token (0, 1): push its old log-prob so the ratio is far outside the clip range on the
    # side its advantage pulls toward (ratio > 1 + eps when A > 0, < 1 - eps when A < 0).
    shift = jnp.where(advantages[0, 1] > 0, -1.0, 1.0)
    clipped_rows = dict(rows, old_logprobs_bn=rows["old_logprobs_bn"].at[0, 1].add(shift))
    _, aux = ppo_loss(model, state.params, clipped_rows, s=s)
    assert float(aux.means["clip_fraction"][0]) == 1.0

    def without_that_token(params):
        loss_sum, _ = ppo_loss(
            model, params, dict(clipped_rows, mask_bn=rows["mask_bn"].at[0, 1].set(0.0)), s=s
        )
        return loss_sum

    grads = jax.grad(lambda p: ppo_loss(model, p, clipped_rows, s=s)[0])(state.params)
    expected = jax.grad(without_that_token)(state.params)
    for leaf, expected_leaf in zip(jax.tree.leaves(grads), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(leaf, expected_leaf, rtol=1e-5, atol=1e-8)


def test_dual_clip_caps_a_negative_advantage_token_at_c_times_its_advantage(tiny):
    """ppo.dual_clip c: a token with A < 0 whose ratio is far above 1 costs -A c instead of
    -A r, and carries no gradient; dual_clip_fraction counts it."""
    model, reward_model, state, batch = tiny
    s = settings(dual_clip=3.0)
    rows, _, _ = prepare(model, reward_model, s, state, batch)
    assert float(rows["mask_bn"][0, 1]) == 1.0
    rows = dict(
        rows,
        advantages_bn=rows["advantages_bn"].at[0, 1].set(-0.5),
        old_logprobs_bn=rows["old_logprobs_bn"].at[0, 1].add(-2.0),  # ratio e^2 ~ 7.4
    )
    dual_sum, dual_aux = ppo_loss(model, state.params, rows, s=s)
    plain_sum, plain_aux = ppo_loss(model, state.params, rows, s=settings())
    ratio = float(np.exp(2.0))  # on-policy rows: the new log-prob is the old one
    assert float(plain_sum - dual_sum) == pytest.approx(0.5 * ratio - 0.5 * 3.0, rel=1e-4)
    fraction_sum, count = dual_aux.means["dual_clip_fraction"]
    assert float(fraction_sum) == 1.0 and float(count) == float(jnp.sum(rows["mask_bn"]))
    assert "dual_clip_fraction" not in plain_aux.means

    def without_that_token(params):
        masked = dict(rows, mask_bn=rows["mask_bn"].at[0, 1].set(0.0))
        return ppo_loss(model, params, masked, s=s)[0]

    grads = jax.grad(lambda p: ppo_loss(model, p, rows, s=s)[0])(state.params)
    expected = jax.grad(without_that_token)(state.params)
    for leaf, expected_leaf in zip(jax.tree.leaves(grads), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(leaf, expected_leaf, rtol=1e-5, atol=1e-8)


# --- end to end --------------------------------------------------------------------------

PREFERENCES = [
    {"prompt": "What is 12 + 30?", "chosen": "<think>2+0=2, 1+3+0=4</think>42", "rejected": "4"},
    {"prompt": "Say 'bo' back to me.", "chosen": "bo bo bo", "rejected": "b"},
    {"prompt": "Sort ascending: 3, 1", "chosen": "1, 3 and that is it", "rejected": "1"},
    {"prompt": "What is the capital of Peru?", "chosen": "Lima, the capital", "rejected": "L"},
]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A tiny SFT run (2 steps) and a reward run (2 steps) started from it."""
    root = tmp_path_factory.mktemp("ppo")
    tiny_sft_run(root / "sft")
    assert cli_main(reward_argv(root / "sft", root / "rm", *TWO_STEPS)) == 0
    return root


def reward_argv(sft_dir, out_dir, *overrides) -> list[str]:
    """A tiny reward run from `sft_dir` on `PREFERENCES` (written beside `out_dir`)."""
    preferences = out_dir.parent / "preferences.jsonl"
    preferences.write_text("".join(json.dumps(r) + "\n" for r in PREFERENCES * 4))
    return [
        "reward",
        f"reward.init_from={sft_dir}",
        f"data.path={preferences}",
        "data.val_fraction=0.25",
        "reward.max_replies=2",
        "train.batch_size=8",
        "train.seq_len=64",
        f"out_dir={out_dir}",
        *overrides,
    ]


def ppo_argv(root, out_dir, *overrides) -> list[str]:
    return [
        "ppo",
        f"ppo.policy_from={root / 'sft'}",
        f"ppo.reward_from={root / 'rm'}",
        "data.path=builtin",
        f"out_dir={out_dir}",
        "train.steps=5",
        "train.batch_size=8",
        "train.eval_every=5",
        "train.samples=2",
        "checkpoint.every=2",
        "optimizer.lr=3e-3",
        "optimizer.warmup_steps=0",
        "ppo.max_prompt_tokens=64",
        "ppo.max_new_tokens=8",
        "ppo.builtin_prompts=40",
        "ppo.eval_prompts=8",
        "ppo.gold_rule=length",
        *overrides,
    ]


def ppo_command(root, out_dir, *overrides) -> list[str]:
    return [sys.executable, "-m", "jaxllm.cli", *ppo_argv(root, out_dir, *overrides)]


def train_lines(out_dir) -> dict[int, dict]:
    return {r["step"]: r for r in read_metrics(out_dir / "metrics.jsonl") if r["split"] == "train"}


COMPARED = (
    "loss",
    "reward",
    "gold_reward",
    "kl",
    "kl_coef",
    "policy_loss",
    "value_loss",
    "clip_fraction",
    "entropy",
    "response_length",
    "grad_norm",
)


@pytest.fixture(scope="module")
def one_device_run(runs):
    out_dir = runs / "ppo_1"
    command = ppo_command(runs, out_dir, "ppo.collapse_window=1")  # the watch says nothing else
    done = subprocess.run(command, env=cpu_environment(1), check=True, capture_output=True)
    (runs / "ppo_1.stderr").write_text(done.stderr.decode())
    return out_dir


def test_ppo_iterations_log_their_metrics_and_keep_the_reference_frozen(runs, one_device_run):
    lines = train_lines(one_device_run)
    assert sorted(lines) == [1, 2, 3, 4, 5]
    for key in (*COMPARED, "kl_sequence", "approx_kl", "value_explained_variance"):
        assert all(np.isfinite(line[key]) for line in lines.values()), key
    for key in ("truncated_fraction", "logprob_gap", "rollout_tokens_per_sec", "batch_time_s"):
        assert key in lines[1]
    for line in lines.values():  # ppo.max_new_tokens=8: every batch keeps all 8 columns
        assert line["completion_width"] == 8 >= line["response_length"]
    assert lines[1]["logprob_gap"] < 1e-4  # the trainer's log-probs are the sampler's
    assert lines[1]["kl"] == pytest.approx(0.0, abs=1e-6)  # the policy starts as the reference
    assert len({round(line["reward"], 6) for line in lines.values()}) > 1
    # The collapse watch saw each step's reward and entropy: its warning is the replay's.
    watch = CollapseWatch(1, **COLLAPSE_ADVICE)
    said = [
        watch.add_rollout(s, v["reward"], v["entropy"], np.nan, np.nan) for s, v in lines.items()
    ]
    warnings = [
        line
        for line in (runs / "ppo_1.stderr").read_text().splitlines()
        if "collapse" in line or "breaking apart" in line
    ]
    assert warnings == [s for s in said if s]

    # ref_params: bitwise the SFT params; the policy moved; kl_coef is the controller's.
    model = load_run(one_device_run).model
    checkpointer = Checkpointer(one_device_run / "checkpoints", read_only=True)
    restored = checkpointer.manager.restore(5)["state"]
    checkpointer.close()
    sft_params = load_run(runs / "sft").params
    for ref, sft in zip(
        jax.tree.leaves(restored["extras"]["ref_params"]["blocks"]),
        jax.tree.leaves(sft_params["blocks"]),
        strict=True,
    ):
        np.testing.assert_array_equal(ref, sft)
    assert not np.array_equal(
        restored["params"]["token_embedding_vd"], sft_params["token_embedding_vd"]
    )
    assert "value" in model.cfg.scalar_heads
    evals = [r for r in read_metrics(one_device_run / "metrics.jsonl") if r["split"] == "eval"]
    assert {"reward", "gold_reward", "reward_greedy", "gold_reward_greedy", "kl"} <= set(evals[-1])
    samples = [json.loads(line) for line in (one_device_run / "samples.jsonl").open()]
    assert len(samples) == 2 and samples[0]["step"] == 5
    assert cli_main(["watch", str(one_device_run)]) == 0  # proxy vs gold of the evals
    assert {"prompt", "completion", "reward", "gold_reward"} <= set(samples[0])
    # `generate` loads a PPO checkpoint like any other.
    argv = ["generate", "--checkpoint", str(one_device_run), "--prompt", "hi"]
    assert cli_main([*argv, "--max-new-tokens", "4"]) == 0


def test_kill_9_and_resume_without_the_starting_runs_reproduces_the_metrics(
    runs, one_device_run, tmp_path
):
    # Copies of the SFT and reward runs, deleted before the resume: the checkpoint is whole.
    for name in ("sft", "rm"):
        shutil.copytree(runs / name, tmp_path / name)
    out_dir = tmp_path / "ppo"
    kill_9_after_first_checkpoint(ppo_command(tmp_path, out_dir), out_dir)
    assert finished_checkpoints(out_dir) == [2]
    shutil.rmtree(tmp_path / "sft")
    shutil.rmtree(tmp_path / "rm")
    subprocess.run(
        ppo_command(tmp_path, out_dir), env=cpu_environment(1), check=True, capture_output=True
    )
    expected, resumed = train_lines(one_device_run), train_lines(out_dir)
    assert sorted(resumed) == [1, 2, 3, 4, 5]
    for step in range(1, 6):
        assert {k: resumed[step][k] for k in COMPARED} == {
            k: expected[step][k] for k in COMPARED
        }, step


def test_an_8_device_mesh_gives_the_metrics_of_one_device(runs, one_device_run):
    out_dir = runs / "ppo_8"
    mesh = ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"]
    subprocess.run(
        ppo_command(runs, out_dir, *mesh), env=cpu_environment(8), check=True, capture_output=True
    )
    assert_same_train_lines(train_lines(out_dir), train_lines(one_device_run))


def assert_same_train_lines(actual: dict, expected: dict) -> None:
    for step in range(1, 6):
        for key in COMPARED:
            assert actual[step][key] == pytest.approx(expected[step][key], rel=1e-4, abs=1e-6), (
                step,
                key,
            )


def test_two_processes_give_the_metrics_of_one_device(runs, one_device_run):
    """Real multi-process PPO (2 processes x 2 CPU devices, data x fsdp): rollouts sampled
    on the mesh of both processes, their rows built on each host and put on the global
    mesh, the reward model and the update; the train lines of one device."""
    out_dir = runs / "ppo_2_processes"
    argv = ppo_command(runs, out_dir, "mesh.data=2", "mesh.fsdp=2")
    outputs_of_success(two_processes(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    assert_same_train_lines(train_lines(out_dir), train_lines(one_device_run))


def test_an_ensemble_of_one_reward_model_twice_trains_like_that_model(runs, one_device_run):
    """The members are two copies of one reward run (naming one run twice is refused)."""
    out_dir = runs / "ppo_twice"
    if not (runs / "rm_copy").exists():
        shutil.copytree(runs / "rm", runs / "rm_copy")
    twice = f"ppo.reward_from={runs / 'rm'},{runs / 'rm_copy'}"
    argv = ppo_command(runs, out_dir, twice, "ppo.reward_aggregation=mean_minus_std")
    subprocess.run(argv, env=cpu_environment(1), check=True, capture_output=True)
    expected, ensemble = train_lines(one_device_run), train_lines(out_dir)
    for step in range(1, 6):
        assert ensemble[step]["reward_disagreement"] < 1e-6  # the same model, to rounding
        for key in COMPARED:
            assert ensemble[step][key] == pytest.approx(expected[step][key], rel=1e-5, abs=1e-7), (
                step,
                key,
            )
    last_eval = [r for r in read_metrics(out_dir / "metrics.jsonl") if r["split"] == "eval"][-1]
    assert last_eval["reward_disagreement"] < 1e-6 and "score" in last_eval
    kept = json.loads((out_dir / "reward_model.json").read_text())["members"]
    assert [m["reward_from"] for m in kept] == [str(runs / "rm"), str(runs / "rm_copy")]


CRITIC_COMPARED = (*COMPARED, "critic_loss", "value_clip_fraction", "critic_grad_norm", "returns")


@pytest.fixture(scope="module")
def separate_critic_run(runs):
    out_dir = runs / "ppo_critic_1"
    argv = ppo_command(runs, out_dir, "ppo.critic=separate", "ppo.critic_lr=1e-3")
    subprocess.run(argv, env=cpu_environment(1), check=True, capture_output=True)
    return out_dir


def test_a_separate_critic_trains_at_its_own_rate_beside_a_frozen_reward_model(
    runs, separate_critic_run
):
    lines = train_lines(separate_critic_run)
    assert sorted(lines) == [1, 2, 3, 4, 5]
    for key in (*CRITIC_COMPARED, "value_explained_variance", "critic_lr"):
        assert all(np.isfinite(line[key]) for line in lines.values()), key
    assert lines[1]["critic_lr"] == pytest.approx(1e-3) and lines[1]["lr"] == pytest.approx(3e-3)
    checkpointer = Checkpointer(separate_critic_run / "checkpoints", read_only=True)
    restored = checkpointer.manager.restore(5)["state"]
    checkpointer.close()
    reward = load_run(runs / "rm").params
    for frozen, original in zip(
        jax.tree.leaves(restored["extras"]["reward_params"][0]),
        jax.tree.leaves(reward),
        strict=True,
    ):
        np.testing.assert_array_equal(frozen, original)
    critic = restored["extras"]["critic_params"]
    assert set(critic["heads"]) == {"value"} and "heads" not in restored["params"]
    assert not np.array_equal(critic["token_embedding_vd"], reward["token_embedding_vd"])
    assert not np.array_equal(
        critic["token_embedding_vd"], restored["params"]["token_embedding_vd"]
    )
    argv = ["generate", "--checkpoint", str(separate_critic_run), "--prompt", "hi"]
    assert cli_main([*argv, "--max-new-tokens", "4"]) == 0


def test_a_separate_critic_resumes_and_shards_to_the_same_metrics(runs, separate_critic_run):
    """3 iterations then a resume to 5 on a (2, 2, 2) mesh: the critic's params and optimizer state
    come back from the checkpoint and shard like the policy's. The first iteration agrees to
    5e-4, later ones to 1e-2 (2e-4 and up to 6e-3 seen on 2026-12-05 with jax 0.10.2, the
    first also on the code before that day's changes), since the critic's sharded float32 sums
    (values of a few units here: the tiny reward model's scores over their small std) move
    the advantages by ~1e-5, which the policy's small, cancelling loss magnifies (on one
    device the same resume reproduces every metric exactly)."""
    out_dir = runs / "ppo_critic_8"
    critic = ["ppo.critic=separate", "ppo.critic_lr=1e-3", "optimizer.decay_steps=5"]
    mesh = ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"]
    for steps in (3, 5):
        argv = ppo_command(runs, out_dir, *critic, *mesh, f"train.steps={steps}")
        subprocess.run(argv, env=cpu_environment(8), check=True, capture_output=True)
    expected, resumed = train_lines(separate_critic_run), train_lines(out_dir)
    for step in range(1, 6):
        rel = 5e-4 if step == 1 else 1e-2
        for key in CRITIC_COMPARED:
            assert resumed[step][key] == pytest.approx(expected[step][key], rel=rel, abs=1e-5), (
                step,
                key,
            )


def test_bad_input_is_one_clear_line(runs, tmp_path, capsys):
    shaped = tmp_path / "rm_other_shape"
    shutil.copytree(runs / "rm", shaped)
    config = (shaped / "config.yaml").read_text()
    (shaped / "config.yaml").write_text(config.replace("num_layers: 2", "num_layers: 3"))
    cases = [
        ([f"ppo.policy_from={tmp_path / 'nowhere'}"], "has no config.yaml"),
        ([f"ppo.reward_from={tmp_path / 'nowhere'}"], "ppo.reward_from="),
        ([f"ppo.reward_from={runs / 'sft'}"], "is not a reward run"),
        ([f"ppo.policy_from={runs / 'rm'}"], "is a reward run (its model has a reward head)"),
        ([f"ppo.reward_from={shaped}"], "another model shape than the policy"),
        (["ppo.max_prompt_tokens=12"], "more than the 12 that ppo.max_prompt_tokens=12"),
        (["ppo.minibatches=3"], "do not split into ppo.minibatches=3"),
        (["ppo.reward_aggregation=max"], "ppo.reward_aggregation='max' is unknown"),
        ([f"ppo.reward_from={runs / 'rm'},{tmp_path / 'nowhere'}"], "nowhere has no config.yaml"),
        (["ppo.max_new_tokens=90"], "exceed model.max_seq_len"),
        (["ppo.critic=both"], "ppo.critic='both' is unknown"),
    ]
    for overrides, expected in cases:
        out_dir = tmp_path / "out"
        assert cli_main(ppo_argv(runs, out_dir, *overrides)) == 2, overrides
        errors = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert len(errors) == 1 and errors[0].startswith("error:"), errors
        assert expected in errors[0], errors
        assert not (out_dir / "checkpoints").exists()


def test_the_hacking_watch_fires_once_on_a_gold_fall_beyond_noise():
    from jaxllm.rl.watch import HackingWatch

    def said(evals):
        watch = HackingWatch(window=2)
        return [watch.add(step, p, g, 0.01) for step, (p, g) in enumerate(evals)]

    # Noise bar: 2 * sqrt((0.01^2 + 0.01^2) / 2) = 0.02 on the fall of the window means.
    proxy_up = [0.0, 0.1, 0.2, 0.3, 0.4, 0.5]
    within_noise = said(zip(proxy_up[:4], [-0.50, -0.50, -0.51, -0.52], strict=True))  # fell 0.015
    assert within_noise == [None] * 4
    hacked = said(
        zip(proxy_up, [-0.50, -0.50, -0.52, -0.53, -0.60, -0.70], strict=True)
    )  # fell 0.025
    assert hacked[:3] == [None] * 3 and "reward hacking at step 3" in hacked[3]
    assert hacked[4:] == [None, None]  # once
    both_down = said(zip([0.5, 0.4, 0.3, 0.2], [-0.50, -0.50, -0.60, -0.70], strict=True))
    assert both_down == [None] * 4  # the proxy fell too: not hacking, just worse


def test_an_ensemble_naming_one_reward_run_twice_is_refused():
    from jaxllm.stages.common import reward_run_dirs

    assert reward_run_dirs("a, b", "ppo.reward_from") == ["a", "b"]
    with pytest.raises(ConfigError, match=r"ppo.reward_from names \./rm, rm more than once"):
        reward_run_dirs("rm, ./rm", "ppo.reward_from")
