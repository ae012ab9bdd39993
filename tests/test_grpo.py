"""GRPO: advantage estimators by name, the three aggregations, the KL by name, rule rewards
on token ids, and `jaxllm grpo` end to end (each estimator, kill -9 and resume, bad input)."""

import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import (
    cpu_environment,
    finished_checkpoints,
    kill_9_after_first_checkpoint,
    outputs_of_success,
    tiny_sft_run,
    two_processes,
)

from jaxllm.cli import main as cli_main
from jaxllm.config import GRPOConfig, load_config
from jaxllm.errors import ConfigError
from jaxllm.metrics import read_metrics
from jaxllm.model import LanguageModel
from jaxllm.rl import rewards as rewards_module
from jaxllm.rl.advantages import (
    AdvantageInputs,
    Advantages,
    dr_grpo_advantages,
    register_advantage_estimator,
)
from jaxllm.rl.rewards import format_ok, make_rewards, register_reward, score_replies
from jaxllm.rl.rollouts import completion_outputs
from jaxllm.stages.grpo import Settings, grpo_loss, prepare
from jaxllm.state import TrainState, with_reference
from jaxllm.steps import loss_and_gradients
from jaxllm.tokenizer import load_tokenizer

P, N, G = 6, 5, 4


def settings(**changes) -> Settings:
    """Two iterations on each batch: `prepare` computes the old policy's log-probs, which
    the tests shift to make ratios other than 1."""
    values = dict(
        iterations=2,
        max_new_tokens=N,
        temperature=1.0,
        group_size=G,
        advantage_estimator="grpo",
        std_eps=1e-4,
        loss_aggregation="sequence_mean",
        eps_low=0.2,
        eps_high=0.28,
        importance_sampling_level="token",
        beta=0.0,
        kl_estimator="k2",
        dynamic_sampling=False,
        mask_truncated=False,
    )
    return Settings(GRPOConfig(**{**values, **changes}), vocab_size=300)


@pytest.fixture(scope="module")
def tiny():
    """A tiny policy and 8 rollouts (2 groups of 4) of 1-5 completion tokens."""
    model = LanguageModel(load_config(None, ["preset=tiny"]).model)
    params = model.init(jax.random.key(0))
    rng = np.random.default_rng(0)
    lengths = np.array([5, 3, 1, 4, 2, 5, 5, 1])
    mask = (np.arange(N)[None] < lengths[:, None]).astype(np.float32)
    segments = np.ones((8, P + N), np.int32)
    segments[:, P:] = mask
    batch = {
        "tokens_bt": jnp.asarray(rng.integers(3, 250, (8, P + N)), jnp.int32),
        "positions_bt": jnp.asarray(np.maximum(np.cumsum(segments, 1) - 1, 0), jnp.int32),
        "segment_ids_bt": jnp.asarray(segments),
        "mask_bn": jnp.asarray(mask),
        "sampler_logprobs_bn": jnp.zeros((8, N)),
        "ended_b": jnp.ones(8),
        "reward_b": jnp.asarray([1.0, 0.0, 0.37, 1.0, 0.5, 0.5, 0.5, 0.5]),
        "correct_b": jnp.zeros(8),
        "format_b": jnp.zeros(8),
        "think_length_b": jnp.zeros(8),
    }
    state = TrainState(jnp.int32(0), params, None, jax.random.key_data(jax.random.key(0)))
    return model, state, batch, lengths


def test_group_advantages_sum_to_zero_and_a_flat_group_gives_no_gradient(tiny):
    model, state, batch, _ = tiny
    s = settings()
    rows, metrics = prepare(model, s, state, batch)
    advantages = np.asarray(rows["advantages_bn"][:, 0]).reshape(2, G)
    np.testing.assert_allclose(advantages.sum(1), 0.0, atol=1e-6)
    np.testing.assert_array_equal(advantages[1], 0.0)  # the group of equal rewards: exactly 0
    assert float(metrics["frac_zero_std_groups"]) == 0.5
    assert float(metrics["reward"]) == pytest.approx(np.mean([1, 0, 0.37, 1, 0.5, 0.5, 0.5, 0.5]))

    flat = dict(batch, reward_b=jnp.full(8, 0.5))
    flat_rows, _ = prepare(model, s, state, flat)
    grads = jax.grad(lambda p: grpo_loss(model, p, flat_rows, s=s)[0])(state.params)
    assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree.leaves(grads))


def test_one_step_per_batch_takes_the_old_log_probs_from_the_loss_s_own_pass(tiny):
    """On-policy (`iterations` = `minibatches` = 1) `prepare` spends no forward pass on the
    old log-probs: the loss holds its own fixed. Loss, gradients and logged figures equal
    those with the old log-probs from a pass of their own; with beta > 0 as well."""
    model, state, batch, _ = tiny
    batch = dict(batch, sampler_logprobs_bn=jnp.full((8, N), -5.0) * batch["mask_bn"])
    for changes in ({}, {"beta": 0.1, "kl_estimator": "k3"}):
        if changes:
            state = with_reference(model, state)
        once, separate = settings(iterations=1, **changes), settings(iterations=2, **changes)
        assert once.on_policy and not separate.on_policy
        rows, metrics = prepare(model, once, state, batch)
        assert "old_logprobs_bn" not in rows and "logprob_gap" not in metrics
        old_rows, old_metrics = prepare(model, separate, state, batch)
        loss, grads, aux = loss_and_grads(model, state, rows, once)
        old_loss, old_grads, old_aux = loss_and_grads(model, state, old_rows, separate)
        assert loss == pytest.approx(old_loss, abs=1e-7)
        assert_grads_close(grads, old_grads)
        figures = {k: float(total / count) for k, (total, count) in aux.means.items()}
        assert figures.pop("logprob_gap") == pytest.approx(float(old_metrics["logprob_gap"]))
        assert figures["ratio"] == 1.0 and figures["clip_fraction"] == 0.0
        old_figures = {k: float(total / count) for k, (total, count) in old_aux.means.items()}
        assert figures == pytest.approx(old_figures, rel=1e-5, abs=1e-6)


ESTIMATORS = ["grpo", "dr_grpo", "rloo", "reinforce_pp"]


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_dynamic_sampling_leaves_equal_reward_groups_out_with_every_estimator(tiny, estimator):
    """grpo, dr_grpo, rloo: the group of equal rewards has advantage exactly 0 anyway and the
    other group's advantages do not change; reinforce_pp: without dynamic sampling that
    group's tokens count in the whitening and get -mu / sigma, not 0; with it they count
    nowhere and the kept tokens are whitened among themselves."""
    model, state, batch, _ = tiny
    every_rows, _ = prepare(model, settings(advantage_estimator=estimator), state, batch)
    s = settings(advantage_estimator=estimator, dynamic_sampling=True)
    rows, _ = prepare(model, s, state, batch)
    mask, advantages = np.asarray(rows["mask_bn"]), np.asarray(rows["advantages_bn"])
    every_advantages = np.asarray(every_rows["advantages_bn"])
    assert mask[4:].sum() == 0 and np.all(advantages[4:] == 0)
    flat_tokens = every_advantages[4:][np.asarray(batch["mask_bn"])[4:] > 0]
    if estimator == "reinforce_pp":
        assert np.all(flat_tokens != 0) and len(set(flat_tokens.tolist())) == 1
        kept = advantages[mask > 0].astype(np.float64)
        assert kept.mean() == pytest.approx(0.0, abs=1e-6)
        assert kept.var() == pytest.approx(1.0, rel=1e-5)
    else:
        assert np.all(flat_tokens == 0)
        np.testing.assert_array_equal(advantages[:4], every_advantages[:4])
    grads = jax.grad(lambda p: grpo_loss(model, p, rows, s=s)[0])(state.params)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))


def halved_dr_grpo(inputs: AdvantageInputs) -> Advantages:
    """A script's own estimator: Dr. GRPO's advantages, halved."""
    return Advantages(0.5 * dr_grpo_advantages(inputs).advantages_bn)


def test_an_estimator_a_script_registers_is_chosen_by_the_config(tiny):
    model, state, batch, _ = tiny
    register_advantage_estimator("halved_dr_grpo", halved_dr_grpo)
    cfg = load_config(None, ["grpo.advantage_estimator=halved_dr_grpo"])
    s = settings(advantage_estimator=cfg.grpo.advantage_estimator)
    rows, _ = prepare(model, s, state, batch)
    # Rewards 1, 0, 0.37, 1 (mean 0.5925), then four 0.5; halved.
    expected_b = 0.5 * np.array([0.4075, -0.5925, -0.2225, 0.4075, 0, 0, 0, 0])
    expected = np.where(np.asarray(batch["mask_bn"]) > 0, expected_b[:, None], 0.0)
    np.testing.assert_allclose(rows["advantages_bn"], expected, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("kl_estimator, kl_value", [("k1", 0.5), ("k2", 0.125), ("k3", 0.1065307)])
def test_the_loss_adds_beta_times_the_named_kl_estimate(tiny, kl_estimator, kl_value):
    """With log pi_ref = log pi - 0.5 at every token (log r = -0.5): k1 = -log r = 0.5,
    k2 = (log r)^2 / 2 = 0.125, k3 = (r - 1) - log r = e^-0.5 - 0.5 = 0.1065307."""
    model, state, batch, lengths = tiny
    rows, _ = prepare(model, settings(), state, batch)
    rows = dict(rows, ref_logprobs_bn=rows["old_logprobs_bn"] - 0.5)
    s = settings(beta=0.25, kl_estimator=kl_estimator, loss_aggregation="token_mean")
    loss_sum, aux = grpo_loss(model, state.params, rows, s=s)
    policy_loss = np.sum(-np.asarray(rows["advantages_bn"][:, 0]) * lengths) / lengths.sum()
    expected = policy_loss + 0.25 * kl_value
    assert float(loss_sum / aux.denominator) == pytest.approx(expected, abs=1e-6)
    kl_sum, tokens = aux.means["kl"]  # logged as k3's value whatever the loss uses
    assert float(kl_sum / tokens) == pytest.approx(0.1065307, rel=1e-5)


def test_a_replaced_key_says_what_replaced_it(tmp_path):
    line = (
        "grpo.scale_rewards was replaced by grpo.advantage_estimator (group -> grpo, "
        "none -> dr_grpo)"
    )
    path = tmp_path / "grpo.yaml"
    path.write_text("grpo:\n  scale_rewards: none\n")
    for file, overrides in ((None, ["grpo.scale_rewards=group"]), (path, [])):
        with pytest.raises(ConfigError) as error:
            load_config(file, overrides)
        assert str(error.value) == line


@pytest.mark.parametrize("mode", ["sequence_mean", "token_mean", "constant_length"])
def test_aggregations_weigh_tokens_as_stated_and_do_not_depend_on_grad_accum(tiny, mode):
    model, state, batch, lengths = tiny
    s = settings(loss_aggregation=mode)
    rows, _ = prepare(model, s, state, batch)
    loss_sum, aux = grpo_loss(model, state.params, rows, s=s)
    advantages = np.asarray(rows["advantages_bn"][:, 0])
    # On-policy, ratio 1: the per-token loss of row i is -A_i on each of its n_i tokens.
    b = len(lengths)
    weight = {
        "sequence_mean": 1 / (lengths * b),
        "token_mean": np.full(b, 1 / lengths.sum()),
        "constant_length": np.full(b, 1 / (b * N)),
    }[mode]
    expected = np.sum(weight * lengths * -advantages)
    assert float(loss_sum / aux.denominator) == pytest.approx(expected, abs=1e-6)

    loss_fn = lambda m, p, r: grpo_loss(m, p, r, s=s)  # noqa: E731
    whole = loss_and_gradients(loss_fn, model, state.params, rows, 1)
    split = loss_and_gradients(loss_fn, model, state.params, rows, 4)
    assert float(whole[0] / whole[1].denominator) == pytest.approx(
        float(split[0] / split[1].denominator), abs=1e-6
    )
    for a, b_ in zip(jax.tree.leaves(whole[2]), jax.tree.leaves(split[2]), strict=True):
        np.testing.assert_allclose(a / whole[1].denominator, b_ / split[1].denominator, atol=1e-7)


MEAN_LOG_RATIOS = np.array([0.02, -0.5, 0.5, -0.02, 0.5, -0.5, 0.02, -0.02])


def off_policy(rows, lengths):
    """`rows` with old log-probs such that reply b's mean log-ratio log(pi / pi_old) is
    MEAN_LOG_RATIOS[b] (inside and outside the clip band [0.8, 1.28]), its tokens' ratios
    spread +-0.3 around it, and padding's log-ratio 3 (counted nowhere)."""
    full = np.asarray(rows["mask_bn"])
    spread = np.where(np.arange(N) % 2 == 0, 0.3, -0.3) * full
    spread -= (spread.sum(1) / lengths)[:, None] * full  # zero mean over each reply
    log_ratio = (MEAN_LOG_RATIOS[:, None] + spread) * full + 3.0 * (1 - full)
    return dict(rows, old_logprobs_bn=rows["old_logprobs_bn"] - jnp.asarray(log_ratio))


def test_dual_clip_caps_the_loss_of_negative_advantage_tokens_far_above_their_old_ratio(tiny):
    """grpo.dual_clip c: per token max(-A r, -A clip(r)), then for A < 0 at most -A c
    (Ye 2020), sequence-mean aggregated; dual_clip_fraction counts the capped tokens."""
    model, state, batch, lengths = tiny
    s = settings(dual_clip=1.5)
    rows, _ = prepare(model, s, state, batch)
    rows = off_policy(rows, lengths)  # log-ratios up to 0.8: ratios above 1.5 exist
    loss_sum, aux = grpo_loss(model, state.params, rows, s=s)
    logp = np.asarray(completion_outputs(model, state.params, rows, 1.0, 300, False).logprobs_bn)
    ratio = np.exp(logp - np.asarray(rows["old_logprobs_bn"]))
    a, mask = np.asarray(rows["advantages_bn"]), np.asarray(rows["mask_bn"])
    token = np.maximum(-a * ratio, -a * np.clip(ratio, 0.8, 1.28))
    capped = (a < 0) & (token > -a * 1.5) & (mask > 0)
    assert capped.any()
    token = np.where(capped, -a * 1.5, token)
    expected = np.sum(token * mask / lengths[:, None]) / len(lengths)
    assert float(loss_sum / aux.denominator) == pytest.approx(expected, rel=1e-5)
    dual_sum, count = aux.means["dual_clip_fraction"]
    assert float(dual_sum / count) == pytest.approx(capped.sum() / mask.sum())
    _, plain_aux = grpo_loss(model, state.params, rows, s=settings())
    assert "dual_clip_fraction" not in plain_aux.means


def gspo_objective(model, rows, lengths, s, replies):
    """GSPO's sequence objective over `replies`, written from the paper:
    -mean_i min(s_i A_i, clip(s_i) A_i), s_i = exp(mean_t log(pi / pi_old))."""
    mask, old = rows["mask_bn"][replies], rows["old_logprobs_bn"][replies]

    def objective(params):
        logp_bn = completion_outputs(model, params, rows, 1.0, 300, False).logprobs_bn
        ratio_b = jnp.exp(jnp.sum((logp_bn[replies] - old) * mask, axis=1) / lengths[replies])
        advantages_b = rows["advantages_bn"][replies, 0]
        clipped_b = jnp.clip(ratio_b, 1 - s.grpo.eps_low, 1 + s.grpo.eps_high)
        return -jnp.mean(jnp.minimum(ratio_b * advantages_b, clipped_b * advantages_b))

    return objective


def loss_and_grads(model, state, rows, s):
    (loss_sum, aux), grads = jax.value_and_grad(
        lambda p: grpo_loss(model, p, rows, s=s), has_aux=True
    )(state.params)
    grads = jax.tree.map(lambda g: g / aux.denominator, grads)
    return float(loss_sum / aux.denominator), grads, aux


def assert_grads_close(actual, expected):
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(a, e, rtol=1e-4, atol=1e-7)


def test_sequence_level_ratios_clip_whole_replies_as_gspo_states(tiny):
    """GSPO (importance_sampling_level=sequence): loss and gradient equal the sequence
    objective written directly; on-policy it is token-level GRPO."""
    model, state, batch, lengths = tiny
    token, sequence = settings(), settings(importance_sampling_level="sequence")
    rows, _ = prepare(model, token, state, batch)
    on_policy = [loss_and_grads(model, state, rows, s) for s in (token, sequence)]
    assert on_policy[1][0] == pytest.approx(on_policy[0][0], abs=1e-7)
    assert_grads_close(on_policy[1][1], on_policy[0][1])

    shifted = off_policy(rows, lengths)
    loss, grads, aux = loss_and_grads(model, state, shifted, sequence)
    objective = gspo_objective(model, shifted, lengths, sequence, np.arange(8))
    assert loss == pytest.approx(float(objective(state.params)), abs=1e-6)
    assert_grads_close(grads, jax.grad(objective)(state.params))
    ratio_sum, _ = aux.means["ratio"]  # every token carries its reply's ratio
    assert float(ratio_sum) == pytest.approx(np.sum(np.exp(MEAN_LOG_RATIOS) * lengths), rel=1e-5)
    token_loss, _, _ = loss_and_grads(model, state, shifted, token)
    assert abs(token_loss - loss) > 1e-3  # the token level clips other tokens


def test_gspo_skips_replies_left_out_and_logs_token_figures(tiny):
    """Replies dynamic sampling leaves out (no token) give finite gradients and count
    nowhere; clip_fraction is the share of tokens in clipped replies; approx_kl stays the
    per-token k3 of KL(old || new)."""
    model, state, batch, lengths = tiny
    s = settings(importance_sampling_level="sequence", dynamic_sampling=True)
    rows, _ = prepare(model, s, state, batch)
    assert float(rows["mask_bn"][4:].sum()) == 0  # the group of equal rewards is left out
    shifted = off_policy(dict(rows, mask_bn=batch["mask_bn"]), lengths)
    shifted["mask_bn"] = rows["mask_bn"]
    loss, grads, aux = loss_and_grads(model, state, shifted, s)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))
    objective = gspo_objective(model, shifted, lengths, s, np.arange(4))
    assert loss == pytest.approx(float(objective(state.params)), abs=1e-6)
    assert_grads_close(grads, jax.grad(objective)(state.params))
    clipped, tokens = aux.means["clip_fraction"]
    # Of replies 0-3 only reply 1 is clipped (A < 0 and s = exp(-0.5) < 0.8).
    assert float(clipped / tokens) == pytest.approx(lengths[1] / lengths[:4].sum())
    shift = rows["old_logprobs_bn"] - shifted["old_logprobs_bn"]  # = log pi - log pi_old
    log_ratio = np.asarray(batch["mask_bn"] * shift)
    k3 = (np.expm1(log_ratio) - log_ratio)[:4]
    assert float(aux.means["approx_kl"][0]) == pytest.approx(float(k3.sum()), rel=1e-4)


def test_an_unknown_importance_sampling_level_is_a_config_error():
    with pytest.raises(ValueError, match="use token \\(GRPO\\) or sequence \\(GSPO\\)"):
        load_config(None, ["grpo.importance_sampling_level=tokens"])


def test_the_format_reward_reads_token_ids():
    tokenizer = load_tokenizer("bytes")
    think, end_think = tokenizer.special_id("<think>"), tokenizer.special_id("</think>")
    end = tokenizer.special_id("<|im_end|>")

    def ids(*parts):
        out = []
        for part in parts:
            out += [part] if isinstance(part, int) else tokenizer.encode(part)
        return out

    assert format_ok(tokenizer, ids(think, "3+4=7", end_think, "7", end))
    assert not format_ok(tokenizer, ids(think, "a", end_think, "b", end_think, "7", end))
    assert not format_ok(tokenizer, ids(think, "a", end_think, " ", end))  # empty answer
    assert not format_ok(tokenizer, ids(think, "a", end_think, "7"))  # no <|im_end|>
    assert not format_ok(tokenizer, ids("<think>a</think>7", end))  # typed text, not tokens
    assert not format_ok(tokenizer, ids("7", think, "a", end_think, "7", end))  # not first


def test_fractional_rewards_and_numeric_answers_survive(monkeypatch):
    monkeypatch.setattr(rewards_module, "_USER_REWARDS", {})
    register_reward("third", lambda prompt, completion, example: 1 / 3)
    tokenizer = load_tokenizer("bytes")
    weights = {"correct": 0.5, "third": 0.3}
    rewards = make_rewards(weights, tokenizer, 16, 4)
    end = tokenizer.special_id("<|im_end|>")
    examples = [
        {"answer": "12", "completion_ids": [*tokenizer.encode("12.0"), end]},
        {"answer": "12", "completion_ids": [*tokenizer.encode("13"), end]},
    ]
    total, named = score_replies(rewards, weights, ["q", "q"], ["12.0", "13"], examples)
    assert total.dtype == np.float32
    np.testing.assert_array_equal(named["correct"], [1.0, 0.0])
    np.testing.assert_allclose(total, [0.5 + 0.3 / 3, 0.3 / 3], rtol=1e-7)


def test_a_group_of_one_is_a_config_error():
    with pytest.raises(ValueError, match="grpo.group_size=1: a group needs at least 2"):
        load_config(None, ["grpo.group_size=1"])


# --- end to end --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory):
    """A tiny SFT run trained enough that some replies end early (lengths differ)."""
    root = tmp_path_factory.mktemp("grpo")
    steps = ["train.steps=40", "checkpoint.every=40", "optimizer.lr=3e-3"]
    tiny_sft_run(root / "sft", *steps, "optimizer.warmup_steps=5")
    return root


def grpo_argv(root, out_dir, *overrides) -> list[str]:
    return [
        "grpo",
        f"grpo.policy_from={root / 'sft'}",
        "data.path=builtin",
        f"out_dir={out_dir}",
        "train.steps=4",
        "train.batch_size=2",
        "train.eval_every=4",
        "train.samples=2",
        "checkpoint.every=2",
        "optimizer.lr=3e-3",
        "optimizer.warmup_steps=0",
        "grpo.group_size=4",
        "grpo.max_prompt_tokens=64",
        "grpo.max_new_tokens=8",
        "grpo.builtin_prompts=40",
        "grpo.eval_prompts=7",
        "grpo.pass_k=2",
        "grpo.iterations=2",
        "grpo.rewards.length=0.5",
        *overrides,
    ]


COMPARED = ("loss", "reward", "accuracy", "clip_fraction", "entropy", "grad_norm", "ratio")


def train_lines(out_dir) -> dict[int, dict]:
    return {r["step"]: r for r in read_metrics(out_dir / "metrics.jsonl") if r["split"] == "train"}


COMMAND = [sys.executable, "-m", "jaxllm.cli"]


@pytest.fixture(scope="module")
def one_device_run(sft_run):
    out_dir = sft_run / "grpo_1"
    subprocess.run(
        [*COMMAND, *grpo_argv(sft_run, out_dir, "train.eval_at_start=true")],
        env=cpu_environment(1),
        check=True,
        capture_output=True,
    )
    return out_dir


def test_grpo_runs_and_resumes_after_kill_9_with_the_same_metrics(
    sft_run, one_device_run, tmp_path
):
    expected = train_lines(one_device_run)
    assert sorted(expected) == [1, 2, 3, 4]
    for key in ("reward_correct", "reward_format", "reward_length", "format_rate"):
        assert key in expected[1], key
    assert all(line["completion_width"] == 8 for line in expected.values())  # the budget
    assert expected[1]["logprob_gap"] < 1e-4
    evals = [r for r in read_metrics(one_device_run / "metrics.jsonl") if r["split"] == "eval"]
    assert {"accuracy", "pass_at_2", "accuracy_add", "pass_at_2_add", "format_rate"} <= set(
        evals[-1]
    )
    samples = [json.loads(line) for line in (one_device_run / "samples.jsonl").open()]
    assert len(samples) == 4 and {"prompt", "completion", "reward"} <= set(samples[0])
    # The eval at step 4 judges its change against step 0's on the same prompts.
    assert "accuracy_change_se" not in evals[0] and evals[-1]["accuracy_change_se"] >= 0

    out_dir = tmp_path / "killed"
    argv = [*COMMAND, *grpo_argv(sft_run, out_dir, "train.eval_at_start=true")]
    kill_9_after_first_checkpoint(argv, out_dir)
    assert finished_checkpoints(out_dir) == [2]
    subprocess.run(
        argv,
        env=cpu_environment(1),
        check=True,
        capture_output=True,
    )
    resumed = train_lines(out_dir)
    for step in (1, 2, 3, 4):
        assert {k: resumed[step][k] for k in COMPARED} == {k: expected[step][k] for k in COMPARED}
    # The resumed run read step 0's eval back from eval_first.json.
    resumed_evals = [r for r in read_metrics(out_dir / "metrics.jsonl") if r["split"] == "eval"]
    judged = ("accuracy", "accuracy_change_se")
    assert {k: resumed_evals[-1][k] for k in judged} == {k: evals[-1][k] for k in judged}


@pytest.mark.parametrize("aggregation", ["token_mean"])
def test_an_8_device_mesh_and_two_processes_give_the_metrics_of_one_device(
    sft_run, one_device_run, tmp_path, aggregation
):
    """Replies of different lengths: the same losses and gradients. token_mean, whose
    denominator is the whole batch's token count, is the aggregation sharding could get
    wrong; the others' sums are checked against micro-batching in
    test_aggregations_weigh_tokens_as_stated_and_do_not_depend_on_grad_accum."""
    overrides = [f"grpo.loss_aggregation={aggregation}", "train.steps=2"]
    runs = {}
    for devices, mesh in ((1, []), (8, ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"])):
        out_dir = tmp_path / f"{aggregation}_{devices}"
        subprocess.run(
            [*COMMAND, *grpo_argv(sft_run, out_dir, *overrides, *mesh)],
            env=cpu_environment(devices),
            check=True,
            capture_output=True,
        )
        runs[devices] = train_lines(out_dir)
    # Real multi-process: 2 processes x 2 CPU devices (data x fsdp) sample, score and
    # update as one job.
    out_dir = tmp_path / f"{aggregation}_2_processes"
    argv = [*COMMAND, *grpo_argv(sft_run, out_dir, *overrides, "mesh.data=2", "mesh.fsdp=2")]
    outputs_of_success(two_processes(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    runs["2 processes"] = train_lines(out_dir)
    for step in (1, 2):
        assert runs[1][step]["response_length"] != 8.0  # lengths differ (some stop early)
        for run in (8, "2 processes"):
            for key in COMPARED:
                assert runs[run][step][key] == pytest.approx(
                    runs[1][step][key], rel=1e-4, abs=1e-6
                ), (run, step, key)


# grpo (the default) runs end to end in the tests above, dr_grpo as the registered
# halved_dr_grpo does; the estimators' values are checked one by one in test_rl_math.py.
@pytest.mark.parametrize("estimator", ["rloo", "reinforce_pp", "halved_dr_grpo"])
def test_grpo_runs_with_each_advantage_estimator(sft_run, tmp_path, estimator):
    """Two on-policy steps. With sequence_mean each reply's tokens weigh 1 / (n_i B), so
    the first update's loss is -mean_i A_i: 0 for estimators whose advantages sum to 0 in
    each group (not reinforce_pp's, whose token-weighted mean is 0)."""
    register_advantage_estimator("halved_dr_grpo", halved_dr_grpo)  # a script's, as above
    out_dir = tmp_path / estimator
    overrides = ["train.steps=2", "grpo.iterations=1", f"grpo.advantage_estimator={estimator}"]
    assert cli_main(grpo_argv(sft_run, out_dir, *overrides)) == 0
    lines = train_lines(out_dir)
    assert sorted(lines) == [1, 2] and all(np.isfinite(line["loss"]) for line in lines.values())
    if estimator != "reinforce_pp":
        assert lines[1]["loss"] == pytest.approx(0.0, abs=1e-6)


def test_a_reward_model_reward_comes_from_a_reward_run(sft_run, tmp_path):
    preferences = tmp_path / "preferences.jsonl"
    record = {"prompt": "What is 12 + 30?", "chosen": "42", "rejected": "4"}
    preferences.write_text((json.dumps(record) + "\n") * 12)
    reward_run = [
        "reward",
        f"reward.init_from={sft_run / 'sft'}",
        f"data.path={preferences}",
        "data.val_fraction=0.25",
        "reward.max_replies=2",
        "train.batch_size=8",
        "train.seq_len=64",
        f"out_dir={tmp_path / 'rm'}",
        "train.samples=0",
        "train.eval_every=100",
        "train.steps=2",
    ]
    assert cli_main(reward_run) == 0
    out_dir = tmp_path / "grpo"
    argv = grpo_argv(
        sft_run,
        out_dir,
        "train.steps=2",
        "grpo.rewards.reward_model=0.5",
        f"grpo.reward_from={tmp_path / 'rm'}",
    )
    assert cli_main(argv) == 0
    lines = train_lines(out_dir)
    scores = [lines[step]["reward_reward_model"] for step in (1, 2)]
    assert all(np.isfinite(scores)) and scores[0] != 0.0
    assert (out_dir / "reward_model.json").is_file()  # kept for a resume without the run


def test_bad_input_is_one_clear_line(sft_run, tmp_path, capsys):
    no_answers = tmp_path / "prompts.jsonl"
    no_answers.write_text(json.dumps({"prompt": "What is 2 + 2?"}) + "\n")
    null_answer = tmp_path / "null_answer.jsonl"
    null_answer.write_text(json.dumps({"prompt": "What is 2 + 2?", "answer": None}) + "\n")
    long_prompt = tmp_path / "long.jsonl"
    long_prompt.write_text(
        json.dumps({"prompt": "What is 2 + 2?", "answer": "4"})
        + "\n"
        + json.dumps({"prompt": "x" * 200, "answer": "4"})
        + "\n"
    )
    cases = [
        ([f"data.path={null_answer}", f"data.eval_path={null_answer}"], "have no 'answer'"),
        (
            [f"data.path={long_prompt}", f"data.eval_path={long_prompt}"],
            f"{long_prompt}:2: the prompt ('xxxx",
        ),
        ([f"data.path={no_answers}", f"data.eval_path={no_answers}"], "have no 'answer'"),
        (["grpo.rewards.kindness=1.0"], "unknown reward(s) kindness"),
        (["grpo.rewards.format=much"], "'grpo.rewards.format' has the wrong type"),
        (["grpo.group_size=1"], "a group needs at least 2 replies"),
        (
            ["grpo.scale_rewards=none"],
            "error: grpo.scale_rewards was replaced by grpo.advantage_estimator (group -> "
            "grpo, none -> dr_grpo)",
        ),
        (
            ["grpo.advantage_estimator=gae"],
            "'gae' needs a value model, which GRPO has not; use one of grpo, dr_grpo, rloo, "
            "reinforce_pp",
        ),
        (
            ["grpo.advantage_estimator=ppo"],
            "grpo.advantage_estimator='ppo' is unknown; use one of grpo, dr_grpo, rloo, "
            "reinforce_pp",
        ),
        # (then the names other tests registered in this process)
        (["grpo.kl_estimator=k4"], "grpo.kl_estimator='k4' is unknown; use k1, k2"),
        (["grpo.std_eps=-0.1"], "grpo.std_eps=-0.1 must be >= 0"),
        ([f"grpo.policy_from={tmp_path / 'nowhere'}"], "has no config.yaml"),
        (["grpo.rewards.reward_model=1.0"], "grpo.reward_from is not set"),
        ([f"grpo.reward_from={sft_run}"], "is read only by the reward_model reward"),
    ]
    for overrides, expected in cases:
        out_dir = tmp_path / "out"
        assert cli_main(grpo_argv(sft_run, out_dir, *overrides)) == 2, overrides
        errors = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert len(errors) == 1 and errors[0].startswith("error:"), errors
        assert expected in errors[0], errors
        assert not (out_dir / "checkpoints").exists()


def test_the_collapse_watch_names_the_cause_once_and_stays_quiet_on_noise():
    from jaxllm.rl.watch import CollapseWatch

    rng = np.random.default_rng(0)
    nan = float("nan")

    def run(rollouts, evals=()) -> list[str]:
        watch, said = CollapseWatch(window=5), []
        for step, values in enumerate(rollouts, 1):
            said.append(watch.add_rollout(step, *values))
        for step, accuracy in evals:
            said.append(watch.add_eval(step, accuracy, 100))
        return [s for s in said if s]

    noise = [(0.3 + 0.05 * rng.normal(), 2.0 + 0.1 * rng.normal(), nan, nan) for _ in range(40)]
    assert run(noise, [(10, 0.4), (20, 0.38), (30, 0.41), (40, 0.39)]) == []
    breaking = [(0.4 - 0.02 * i, 2.0 + 0.05 * i, nan, nan) for i in range(20)]
    (said,) = run(breaking)
    assert said.startswith("warning: the policy is breaking apart at step 10:")
    assert "lower optimizer.lr" in said
    shortcut = [(0.1 * (0.5 - 0.02 * i) + 0.1, 2.0, 0.5 - 0.02 * i, 1.0) for i in range(20)]
    (said,) = run(shortcut)
    assert said.startswith("warning: a shortcut at step 10: the correct reward fell")
    collapsed = [(0.3 - 0.005 * i + 0.02 * rng.normal(), 2.0 * 0.8**i, nan, nan) for i in range(20)]
    (said,) = run(collapsed)
    assert said.startswith("warning: entropy collapse at step") and "grpo.temperature" in said
    from jaxllm.stages.ppo import COLLAPSE_ADVICE

    watch = CollapseWatch(window=5, **COLLAPSE_ADVICE)  # PPO's advice names its own options
    (said,) = [s for s in (watch.add_rollout(i, *v) for i, v in enumerate(collapsed, 1)) if s]
    assert "ppo.temperature or ppo.entropy_coef" in said
    assert run([(1.0, 2.0 * 0.8**i, nan, nan) for i in range(20)]) == []  # solved: sure
    (said,) = run(noise[:6], [(10, 0.40), (20, 0.45), (30, 0.30), (40, 0.28), (50, 0.1)])
    assert said.startswith("warning: held-out accuracy fell from 0.450 (step 20) to 0.280")


def test_a_micro_batch_packs_the_most_groups_that_leave_each_device_as_many_packs():
    from jaxllm.rl.rollouts import groups_per_pack

    assert groups_per_pack(16, 4, 1) == 4  # the benchmark's 16 prompts on one device
    assert groups_per_pack(16, 4, 8) == 2  # 8 packs, one per data-parallel device
    assert groups_per_pack(12, 4, 4) == 3
    assert groups_per_pack(6, 4, 1) == 3 and groups_per_pack(7, 4, 1) == 1
    assert groups_per_pack(2, 4, 4) == 1  # too few groups for a pack per device
    assert groups_per_pack(16, 1, 1) == 1  # grpo.pack_groups=1: a group per row


@pytest.mark.parametrize(
    ("sliding", "g", "groups"),
    [(False, 3, 1), (True, 3, 1), (False, 6, 1), (True, 6, 1), (False, 3, 2), (True, 6, 2)],
)
def test_a_group_computed_with_its_prompt_once_gives_each_replys_outputs_and_gradient(
    sliding, g, groups
):
    """Rows carrying group_rows (each group's prompt held once, then its replies each at its
    own length, in one packed row, alone or `groups` groups end to end) give the log-probs,
    entropies, hidden states and the
    gradient of a loss on them that one row per reply gives: ragged left-padded prompts,
    ragged replies, a tool result inside a reply (real, not trained), and sliding-window
    layers, whose window a reply held after the others must measure in positions. Groups
    of 6 make rows wide enough for the attention to read them block by block (`KeyBounds`
    of the prompt's and a reply's columns), as do two groups in one row, the second's block
    reading its own prompt. The padding fraction is the packed rows'."""
    import dataclasses

    from helpers import assert_params_close, tiny_config

    from jaxllm.attention import KeyBounds
    from jaxllm.rl.rollouts import group_rows, rollout_figures

    window = {"sliding_window": 5, "layer_types": ["sliding_attention"] * 2} if sliding else {}
    model = LanguageModel(dataclasses.replace(tiny_config().model, **window))
    params = model.init(jax.random.key(1))
    params = jax.tree.map(lambda x: x + 0.05 * jnp.cos(jnp.arange(x.size).reshape(x.shape)), params)
    rng = np.random.default_rng(1)
    p, n = 8, 6
    prompt_lengths, reply_lengths = [3, 8], [6, 1, 4, 2, 6, 5, 3, 6, 2, 6, 1, 4][: 2 * g]
    tokens = rng.integers(3, 250, (2 * g, p + n)).astype(np.int32)
    segments = np.zeros((2 * g, p + n), np.int32)
    for row in range(2 * g):
        tokens[row, :p] = tokens[row // g * g, :p]  # a group's rows share their prompt
        segments[row, p - prompt_lengths[row // g] : p] = 1
        segments[row, p : p + reply_lengths[row]] = 1
    mask = segments[:, p:].astype(np.float32)
    mask[4, 1:3] = 0.0  # a tool result inside reply 4: real tokens, not the model's
    host = {
        "tokens_bt": tokens,
        "positions_bt": np.maximum(np.cumsum(segments, 1) - 1, 0).astype(np.int32),
        "segment_ids_bt": segments,
        "mask_bn": mask,
    }
    assert group_rows(model, host, 1, g) == {}
    grouped = {**host, **group_rows(model, host, g * groups, g)}
    width = g * groups * grouped["group_tokens_bw"].shape[1]
    # the widest pack in four widths per octave, a multiple of its rows: 8 + 13 tokens in
    # 24 columns (whole), 8 + 22 in 36 (block by block); two groups, 3 + 11 + 8 + 13 in
    # 40 -> 42, 3 + 24 + 8 + 22 in 64 -> 72
    assert width == {(3, 1): 24, (6, 1): 36, (3, 2): 42, (6, 2): 72}[g, groups]
    assert KeyBounds(p, n).pays(width) == (g * groups > 3)

    def outputs(params, rows):
        return completion_outputs(model, params, rows, 0.9, 300, True, g * groups)

    def loss(params, rows):
        out = outputs(params, rows)
        return jnp.sum((out.logprobs_bn * 1.3 + out.entropies_bn) * rows["mask_bn"])

    alone, shared = outputs(params, host), outputs(params, grouped)
    real = segments[:, p:, None] > 0  # a padding column's hidden state is never read
    np.testing.assert_allclose(shared.logprobs_bn * mask, alone.logprobs_bn * mask, rtol=1e-5)
    np.testing.assert_allclose(shared.entropies_bn * mask, alone.entropies_bn * mask, rtol=1e-5)
    np.testing.assert_allclose(
        np.where(real, shared.hidden_bnd, 0), np.where(real, alone.hidden_bnd, 0), atol=1e-5
    )
    assert_params_close(jax.grad(loss)(params, grouped), jax.grad(loss)(params, host), rtol=1e-4)
    real_tokens = sum(prompt_lengths) + sum(reply_lengths)
    assert rollout_figures(grouped, 1.0)["padding_fraction"] == pytest.approx(
        1 - real_tokens / (2 // groups * width)
    )
    assert rollout_figures(host, 1.0)["padding_fraction"] == pytest.approx(
        1 - (g * sum(prompt_lengths) + sum(reply_lengths)) / (2 * g * (p + n))
    )
