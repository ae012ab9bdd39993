"""DPO: the loss and its gradient at the reference, what the summed log-probs read, the
same loss however a batch is cut, IPO's minimum, and `jaxllm dpo` end to end (learns a
visible preference, not shuffled labels; a frozen reference; resume; bad input)."""

import dataclasses
import functools
import json
import math
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import skip_if_not_enough_devices
from helpers import (
    TWO_STEPS,
    assert_params_close,
    finished_checkpoints,
    tiny_config,
    tiny_sft_run,
)
from test_reward import write_preferences

from jaxllm.checkpoint import Checkpointer
from jaxllm.cli import main as cli_main
from jaxllm.config import MeshConfig
from jaxllm.data.comparison_batches import comparison_arrays
from jaxllm.data.preferences import Comparison, PreferenceReport
from jaxllm.losses import bucket_width
from jaxllm.metrics import read_metrics
from jaxllm.model import LanguageModel
from jaxllm.rl.preference_losses import ORPO_MAX_MEAN_LOGP, dpo_loss, reference_free_scores
from jaxllm.sharding import make_mesh, put_batch
from jaxllm.stages.common import load_run
from jaxllm.stages.dpo import dpo_comparison_loss, dpo_update, reply_logprobs
from jaxllm.state import create_train_state, learning_rate_schedule, make_optimizer
from jaxllm.state import state_shardings as shardings_of
from jaxllm.steps import UpdateContext, jit_update
from jaxllm.tokenizer import load_tokenizer

BYTES = load_tokenizer("bytes")
VOCAB = BYTES.vocab_size


def user(text):
    return [{"role": "user", "content": text}]


def assistant(text):
    return [{"role": "assistant", "content": text}]


def comparisons(count: int, seed: int = 0) -> list[Comparison]:
    """Pairs and rankings of three (ties and a soft label among them) of random replies."""
    rng = np.random.default_rng(seed)

    def text(n):
        return "".join(rng.choice(list("abcdefgh"), n))

    result = []
    for i in range(count):
        prompt = user(text(3 + i % 4))
        if i % 3 == 2:
            replies = tuple(assistant(text(2 + j + i % 3)) for j in range(3))
            result.append(Comparison(prompt, replies, (1, 0, 1)))
        else:
            replies = (assistant(text(4 + i % 5)), assistant(text(2 + i % 2)))
            result.append(Comparison(prompt, replies, (0, 1), 0.8 if i % 4 == 1 else None))
    return result


def arrays_of(items, seq_len: int = 40, max_replies: int = 3):
    return comparison_arrays(
        [(f"line {i}", c) for i, c in enumerate(items)],
        BYTES,
        seq_len,
        max_replies,
        PreferenceReport(),
        "dpo.max_replies",
    )


def host_batch(arrays, rows=None):
    return arrays.take(np.arange(len(arrays.end_nk)) if rows is None else np.asarray(rows))


@pytest.fixture(scope="module")
def tiny():
    model = LanguageModel(tiny_config().model)
    params = model.init(jax.random.key(0))
    ref = jax.tree.map(lambda x: x + 0.02 * jnp.sin(jnp.arange(x.size).reshape(x.shape)), params)
    return model, params, ref


def loss_of(model, params, ref, batch, beta=0.1, loss="sigmoid"):
    return dpo_comparison_loss(
        model, params, batch, ref_params=ref, beta=beta, loss=loss, label_smoothing=0.0,
        vocab_size=VOCAB,
    )  # fmt: skip


# --- the pure parts ----------------------------------------------------------------------


def test_at_the_reference_the_loss_is_ln2_and_the_gradient_is_half_beta_times_the_logp_gap(tiny):
    model, params, _ = tiny
    pair = Comparison(user("hi"), (assistant("yes"), assistant("no")), (0, 1))
    batch = host_batch(arrays_of([pair]))
    beta = 0.3
    loss_sum, aux = loss_of(model, params, params, batch, beta)
    assert float(loss_sum / aux.denominator) == pytest.approx(math.log(2), abs=1e-6)
    for name in ("reward_chosen", "reward_rejected", "margin"):
        assert float(aux.means[name][0]) == 0.0, name

    grads = jax.grad(lambda p: loss_of(model, p, params, batch, beta)[0])(params)

    def logp_gap(p):
        logp_bk = reply_logprobs(model, p, batch, VOCAB)
        return logp_bk[0, 0] - logp_bk[0, 1]

    expected = jax.tree.map(lambda g: -beta / 2 * g, jax.grad(logp_gap)(params))
    assert_params_close(grads, expected, rtol=1e-5)


def test_reply_logprobs_sum_the_reply_tokens_and_end_at_im_end(tiny):
    model, params, _ = tiny
    comparison = Comparison(user("hi"), (assistant("yes"), assistant("no")), (0, 1))
    arrays = arrays_of([comparison])
    tokens = arrays.tokens_nkt[0, 0]
    reply = arrays.reply_mask_nkt[0, 0]
    assert BYTES.decode(tokens[reply]) == "yes<|im_end|>"
    # By hand: log_softmax of the whole row's logits, read at the reply's tokens.
    length = arrays.end_nk[0, 0] + 1
    logits = model.logits(params, jnp.asarray(tokens[None, :length]))[0, :, :VOCAB]
    logp_tv = jax.nn.log_softmax(logits.astype(jnp.float32), -1)
    by_hand = sum(float(logp_tv[t - 1, tokens[t]]) for t in range(1, length) if reply[t])
    got = reply_logprobs(model, params, host_batch(arrays), VOCAB)[0, 0]
    assert float(got) == pytest.approx(by_hand, rel=1e-5)


def unpacked_reply_logprobs(model, params, arrays, rows) -> jax.Array:
    """(B, K) log pi(reply) with every reply alone in its own row of T columns, as the
    unpacked layout computes them: what a packed batch must give."""
    b, k, t = arrays.tokens_nkt[rows].shape
    tokens_mt = jnp.asarray(arrays.tokens_nkt[rows].reshape(b * k, t))
    segments_mt = jnp.asarray(arrays.segment_ids_nkt[rows].reshape(b * k, t))
    logits_mtv = model.logits(
        params, tokens_mt, jnp.broadcast_to(jnp.arange(t), (b * k, t)), segments_mt
    )
    logp_mt = jax.nn.log_softmax(logits_mtv[:, :-1, :VOCAB].astype(jnp.float32), -1)
    logp_mt = jnp.take_along_axis(logp_mt, tokens_mt[:, 1:, None], -1)[..., 0]
    counted_mt = jnp.asarray(arrays.reply_mask_nkt[rows].reshape(b * k, t)[:, 1:])
    return jnp.sum(jnp.where(counted_mt, logp_mt, 0.0), axis=1).reshape(b, k)


@pytest.mark.parametrize("scan_layers", [True, False])
def test_a_packed_batch_gives_each_replys_logprob_and_gradient_as_if_alone(tiny, scan_layers):
    """A batch packs each comparison's replies into one row (segment ids keep them apart,
    positions restart): the log-probs, the loss and its gradient are those of every reply
    in a row of its own, whatever the padding holds and however wide the rows are cut.
    Unrolled layers run the last one at the R reply columns only."""
    model, params, ref = tiny
    model = LanguageModel(dataclasses.replace(model.cfg, scan_layers=scan_layers))
    items = comparisons(6)
    arrays = arrays_of(items, 56)
    rows = np.arange(6)
    packed = host_batch(arrays)
    # The prompt is held once: a row holds it and what each reply adds.
    prompt_n, lengths_nk = arrays.shared_prompt_n, (arrays.segment_ids_nkt > 0).sum(-1)
    row_n = prompt_n + (lengths_nk - prompt_n[:, None] * arrays.valid_nk).sum(1)
    assert ((packed["segment_ids_nt"] > 0).sum(1) == row_n).all()
    width = bucket_width(int(row_n.max()), 3 * 56, per_octave=4)
    assert packed["tokens_nt"].shape == (6, width)
    # The reply columns: each row's after its prompt, R = W - the shortest prompt (to 8).
    reply_columns = -(-(width - prompt_n.min()) // 8) * 8
    assert packed["reply_columns_nr"].shape == (6, reply_columns) and reply_columns < width
    for row in range(6):
        own = row_n[row] - prompt_n[row]
        assert packed["reply_columns_nr"][row].tolist() == list(
            range(prompt_n[row], row_n[row])
        ) + [-1] * (reply_columns - own)
    assert (prompt_n >= 5).all()  # <|start|> user ... <|im_start|>assistant\n at least
    assert arrays_of(items[:2]).tokens_nkt.shape[1] == 2  # pairs stay pairs (max_replies 3)
    want = unpacked_reply_logprobs(model, params, arrays, rows)
    wide = {k: np.pad(v, [(0, 0), (0, 40)]) if k.endswith("_nt") else v for k, v in packed.items()}
    noisy = {k: v.copy() for k, v in wide.items()}
    padding = noisy["segment_ids_nt"] == 0
    noisy["tokens_nt"][padding] = np.random.default_rng(0).integers(0, VOCAB, padding.sum())
    for batch in (packed, wide, noisy):
        np.testing.assert_allclose(reply_logprobs(model, params, batch, VOCAB), want, rtol=1e-5)
    losses = [loss_of(model, params, ref, b)[0] for b in (packed, wide, noisy)]
    np.testing.assert_allclose(losses, losses[0], rtol=1e-5)

    def packed_loss(p):
        logratio = reply_logprobs(model, p, packed, VOCAB) - reply_logprobs(
            model, ref, packed, VOCAB
        )
        return jnp.sum(dpo_loss(logratio, packed["target_nkk"], packed["pair_nkk"], beta=0.1))

    def unpacked_loss(p):
        logratio = unpacked_reply_logprobs(model, p, arrays, rows) - unpacked_reply_logprobs(
            model, ref, arrays, rows
        )
        return jnp.sum(dpo_loss(logratio, packed["target_nkk"], packed["pair_nkk"], beta=0.1))

    packed_value, packed_grads = jax.jit(jax.value_and_grad(packed_loss))(params)
    unpacked_value, unpacked_grads = jax.jit(jax.value_and_grad(unpacked_loss))(params)
    assert float(packed_value) == pytest.approx(float(unpacked_value), rel=1e-5)
    assert_params_close(packed_grads, unpacked_grads, rtol=1e-4)


def test_a_comparisons_loss_is_the_same_alone_and_batched(tiny):
    model, params, ref = tiny
    arrays = arrays_of(comparisons(8))
    batch = host_batch(arrays)

    def per_comparison(b):
        logratio = reply_logprobs(model, params, b, VOCAB) - reply_logprobs(model, ref, b, VOCAB)
        return dpo_loss(logratio, b["target_nkk"], b["pair_nkk"], beta=0.1)

    together = per_comparison(batch)
    alone = [float(per_comparison(host_batch(arrays, [i]))[0]) for i in range(8)]
    np.testing.assert_allclose(together, alone, rtol=1e-5)
    # Padded (-1) comparisons count nothing.
    _, aux = loss_of(model, params, ref, host_batch(arrays, [0, 1, -1, -1]))
    assert float(aux.denominator) == 2


def test_ipo_is_least_at_half_over_beta_and_soft_targets_move_the_minimum():
    beta = 0.25
    ds = jnp.linspace(-6, 6, 2401)
    pair = jnp.array([[[False, True], [False, False]]])

    def loss_at(d, p, kind, smoothing=0.0):
        target = jnp.array([[[0.5, p], [0.5, 0.5]]])
        return dpo_loss(
            jnp.array([[d, 0.0]]), target, pair, beta=beta, loss=kind, label_smoothing=smoothing
        )[0]

    ipo = jax.vmap(lambda d: loss_at(d, 1.0, "ipo"))(ds)
    assert float(ds[jnp.argmin(ipo)]) == pytest.approx(1 / (2 * beta), abs=1e-2)
    assert float(loss_at(1 / (2 * beta), 1.0, "ipo")) == pytest.approx(0.0, abs=1e-6)
    soft = jax.vmap(lambda d: loss_at(d, 0.8, "ipo"))(ds)
    assert float(ds[jnp.argmin(soft)]) == pytest.approx(0.6 / (2 * beta), abs=1e-2)
    # DPO: -log s(beta d) for a hard label; label smoothing e mixes in -log s(-beta d).
    d, e = 1.7, 0.1
    sigmoid = jax.nn.sigmoid
    assert float(loss_at(d, 1.0, "sigmoid")) == pytest.approx(-math.log(sigmoid(beta * d)))
    smoothed = -(1 - e) * math.log(sigmoid(beta * d)) - e * math.log(sigmoid(-beta * d))
    assert float(loss_at(d, 1.0, "sigmoid", e)) == pytest.approx(smoothed, rel=1e-6)
    # A tie (p = 0.5) pulls the log-ratios together: least at d = 0.
    tie = jax.vmap(lambda d: loss_at(d, 0.5, "sigmoid"))(ds)
    assert float(ds[jnp.argmin(tie)]) == pytest.approx(0.0, abs=1e-2)
    # SLiC's hinge: max(0, 1 - beta d), zero once the margin beta d reaches 1; a soft
    # target p weighs both directions.
    for d, expected in ((-2.0, 1.5), (0.0, 1.0), (3.9, 0.025), (4.0, 0.0), (8.0, 0.0)):
        assert float(loss_at(d, 1.0, "hinge")) == pytest.approx(expected, abs=1e-6)
    assert float(loss_at(2.0, 0.8, "hinge")) == pytest.approx(0.8 * 0.5 + 0.2 * 1.5, abs=1e-6)


def test_rpo_adds_the_best_replys_nll_per_token(tiny):
    """dpo.nll_coef: + coef x -log pi(best reply) / its tokens; a ranking's best is rank 0,
    replies tied for best are averaged; the DPO part is unchanged."""
    model, params, ref = tiny
    pair = Comparison(user("hi"), (assistant("yes"), assistant("no")), (0, 1))
    ranking = Comparison(user("go"), (assistant("a"), assistant("bcd"), assistant("ef")), (1, 0, 0))
    batch = host_batch(arrays_of([pair, ranking]))
    coef = 0.7

    def loss(nll_coef):
        return dpo_comparison_loss(
            model, params, batch, ref_params=ref, beta=0.1, loss="sigmoid",
            label_smoothing=0.0, vocab_size=VOCAB, nll_coef=nll_coef,
        )  # fmt: skip

    plain_sum, plain_aux = loss(0.0)
    rpo_sum, rpo_aux = loss(coef)
    logp_bk = np.asarray(reply_logprobs(model, params, batch, VOCAB))
    tokens = {"yes": 4, "bcd": 4, "ef": 3}  # contents and <|im_end|>
    nll_pair = -logp_bk[0, 0] / tokens["yes"]
    nll_ranking = (-logp_bk[1, 1] / tokens["bcd"] - logp_bk[1, 2] / tokens["ef"]) / 2
    assert float(rpo_sum - plain_sum) == pytest.approx(coef * (nll_pair + nll_ranking), rel=1e-5)
    nll_sum, count = rpo_aux.means["nll_best"]
    assert float(nll_sum / count) == pytest.approx((nll_pair + nll_ranking) / 2, rel=1e-5)
    assert float(plain_aux.means["margin"][0]) == float(rpo_aux.means["margin"][0])


def test_simpo_and_orpo_score_replies_without_a_reference(tiny):
    """SimPO: -log s(beta (mean_w - mean_l) - gamma) on the mean log-prob per token; ORPO:
    the best reply's NLL per token - beta log s(log odds_w - log odds_l), odds of the mean
    probability; written out by hand, for a pair and for a ranking (all its pairs, averaged,
    a tie at p = 1/2). Neither reads the reference."""
    model, params, _ = tiny
    pair = Comparison(user("hi"), (assistant("yes"), assistant("no")), (0, 1))
    ranking = Comparison(user("go"), (assistant("a"), assistant("bcd"), assistant("ef")), (1, 0, 1))
    batch = host_batch(arrays_of([pair, ranking]))
    logp = np.asarray(reply_logprobs(model, params, batch, VOCAB), np.float64)
    mean = logp / np.array([[4, 3, 1], [2, 4, 3]])  # tokens: contents and <|im_end|>
    with np.errstate(divide="ignore"):  # the pair's third reply is padding (mean 0)
        odds = mean - np.log(-np.expm1(mean))
    beta, gamma = 2.0, 0.5

    def bt(d, p):  # -[p log s(d) + (1 - p) log s(-d)]
        return -(p * np.log(1 / (1 + np.exp(-d))) + (1 - p) * np.log(1 / (1 + np.exp(d))))

    def simpo(d, p):
        return -(p * np.log(1 / (1 + np.exp(-(beta * d - gamma))))) - (1 - p) * np.log(
            1 / (1 + np.exp(beta * d + gamma))
        )

    # the ranking (1, 0, 1): reply 1 beats 0 and 2; 0 and 2 tie
    expected = {
        "simpo": simpo(mean[0, 0] - mean[0, 1], 1.0)
        + np.mean(
            [
                simpo(mean[1, 0] - mean[1, 1], 0.0),
                simpo(mean[1, 0] - mean[1, 2], 0.5),
                simpo(mean[1, 1] - mean[1, 2], 1.0),
            ]
        ),
        "orpo": -mean[0, 0]
        + beta * bt(odds[0, 0] - odds[0, 1], 1.0)
        - mean[1, 1]
        + beta
        * np.mean(
            [
                bt(odds[1, 0] - odds[1, 1], 0.0),
                bt(odds[1, 0] - odds[1, 2], 0.5),
                bt(odds[1, 1] - odds[1, 2], 1.0),
            ]
        ),
    }
    for kind, want in expected.items():
        loss_sum, aux = dpo_comparison_loss(
            model, params, batch, ref_params=None, beta=beta, loss=kind, label_smoothing=0.0,
            vocab_size=VOCAB, simpo_gamma=gamma,
        )  # fmt: skip
        assert float(loss_sum) == pytest.approx(want, rel=1e-5), kind
        score = mean if kind == "simpo" else odds  # reward = beta x score, chosen first
        chosen = [score[0, 0], score[1, 1], score[1, 1]]
        reward_sum, count = aux.means["reward_chosen"]
        assert float(reward_sum / count) == pytest.approx(beta * np.mean(chosen), rel=1e-5)
    # A reply the policy is sure of (mean log-prob 0) has finite odds under ORPO.
    sure = reference_free_scores(jnp.array([[0.0, -3.0]]), jnp.array([[3.0, 3.0]]), "orpo")
    assert np.isfinite(np.asarray(sure)).all()
    edge = ORPO_MAX_MEAN_LOGP - math.log(-math.expm1(ORPO_MAX_MEAN_LOGP))
    assert float(sure[0, 0]) == pytest.approx(edge, rel=1e-4)


def one_update(mesh_shape, grad_accum, host):
    cfg = tiny_config(f"train.grad_accum={grad_accum}")
    model = LanguageModel(cfg.model)
    mesh = make_mesh(MeshConfig(*mesh_shape), jax.devices()[: int(np.prod(mesh_shape))])
    tx = make_optimizer(cfg.optimizer, model, cfg.train.steps)
    state, _ = create_train_state(model, tx, mesh, seed=0)
    state = state.with_extras(ref_params=jax.tree.map(lambda x: x * 0.9, state.params))
    shardings = shardings_of(model, tx, mesh, jax.eval_shape(lambda: state))
    state = jax.device_put(state, shardings)
    schedule = learning_rate_schedule(cfg.optimizer, cfg.train.steps)
    loss_fn = functools.partial(
        dpo_comparison_loss, beta=0.1, loss="sigmoid", label_smoothing=0.0, vocab_size=VOCAB
    )
    update = jit_update(
        dpo_update(UpdateContext(model, tx, schedule, loss_fn, grad_accum)), mesh, shardings, model
    )
    ref_before = jax.device_get(state.extras["ref_params"])
    with jax.set_mesh(mesh):
        new_state, metrics = update(state, put_batch(host, mesh))
    new_state = jax.device_get(new_state)
    for after, before in zip(
        jax.tree.leaves(new_state.extras["ref_params"]), jax.tree.leaves(ref_before), strict=True
    ):
        np.testing.assert_array_equal(after, before)  # the reference is frozen, bitwise
    return {k: float(v) for k, v in jax.device_get(metrics).items()}, new_state.params


@skip_if_not_enough_devices(8)
def test_an_update_is_the_same_with_grad_accum_4_and_on_8_devices():
    host = host_batch(arrays_of(comparisons(8)))
    want_metrics, want_params = one_update((1, 1, 1), 1, host)
    assert {"loss", "accuracy", "margin", "reward_chosen", "logp_rejected", "grad_norm"} <= set(
        want_metrics
    )
    for mesh_shape, grad_accum in (((1, 1, 1), 4), ((1, 8, 1), 1), ((2, 2, 2), 2)):
        metrics, params = one_update(mesh_shape, grad_accum, host)
        for name, value in want_metrics.items():
            assert metrics[name] == pytest.approx(value, rel=2e-5, abs=1e-6), (mesh_shape, name)
        assert_params_close(params, want_params, rtol=1e-5)


# --- end to end --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("dpo")
    tiny_sft_run(root / "sft")
    return root / "sft"


def dpo_argv(sft_dir, data, out_dir, *overrides) -> list[str]:
    return [
        "dpo",
        f"dpo.policy_from={sft_dir}",
        f"data.path={data}",
        f"out_dir={out_dir}",
        "train.seq_len=48",
        "train.batch_size=8",
        "train.steps=40",
        "train.eval_every=40",
        "train.eval_at_start=true",
        "train.log_every=10",
        "data.val_fraction=0.25",
        "optimizer.lr=1e-3",
        "optimizer.warmup_steps=2",
        "dpo.max_replies=3",
        "checkpoint.every=20",
        *overrides,
    ]


def evals(out_dir) -> list[dict]:
    return [r for r in read_metrics(out_dir / "metrics.jsonl") if r["split"] == "eval"]


def test_dpo_learns_a_visible_preference_not_shuffled_labels_and_keeps_the_reference(
    sft_run, tmp_path
):
    results = {}
    for shuffled in (False, True):
        data = tmp_path / f"prefs_{shuffled}.jsonl"
        write_preferences(data, 240, shuffled)
        out_dir = tmp_path / f"dpo_{shuffled}"
        assert cli_main(dpo_argv(sft_run, data, out_dir)) == 0
        results[shuffled] = evals(out_dir)
    start, trained = results[False][0], results[False][-1]
    assert start["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert start["margin"] == 0.0 and start["accuracy"] == 0.0
    assert trained["accuracy"] > 0.9 and trained["margin"] > 0.5
    assert trained["reward_chosen"] > trained["reward_rejected"]
    control = results[True][-1]
    assert 0.3 < control["accuracy"] < 0.7, control  # shuffled labels: nothing to learn

    out_dir = tmp_path / "dpo_False"
    checkpointer = Checkpointer(out_dir / "checkpoints", read_only=True)
    restored = checkpointer.manager.restore(40)["state"]
    checkpointer.close()
    sft_params = load_run(sft_run).params
    for ref, sft in zip(
        jax.tree.leaves(restored["extras"]["ref_params"]), jax.tree.leaves(sft_params), strict=True
    ):
        np.testing.assert_array_equal(ref, sft)
    assert not np.array_equal(
        restored["params"]["token_embedding_vd"], sft_params["token_embedding_vd"]
    )
    argv = ["generate", "--checkpoint", str(out_dir), "--prompt", "hi", "--max-new-tokens", "4"]
    assert cli_main(argv) == 0  # `generate` loads a DPO checkpoint like any other


@pytest.mark.parametrize(("loss", "beta"), [("simpo", "2.0"), ("orpo", "0.5")])
def test_a_reference_free_loss_learns_the_preference_and_keeps_no_reference(
    sft_run, tmp_path, loss, beta
):
    """Against the likelihood: the preferred reply is the one with fewer 'a's, which the
    policy finds less likely (a reference-free score starts out preferring the other)."""
    data = tmp_path / "prefs.jsonl"
    write_preferences(data, 240, False)
    records = [json.loads(line) for line in data.read_text().splitlines()]
    for record in records:
        if "scores" in record:
            record["scores"] = [-score for score in record["scores"]]
        else:
            record["chosen"], record["rejected"] = record["rejected"], record["chosen"]
    data.write_text("".join(json.dumps(record) + "\n" for record in records))
    out_dir = tmp_path / loss
    assert cli_main(dpo_argv(sft_run, data, out_dir, f"dpo.loss={loss}", f"dpo.beta={beta}")) == 0
    start, trained = evals(out_dir)[0], evals(out_dir)[-1]
    assert start["accuracy"] < 0.2 and start["margin"] < 0, start
    assert trained["accuracy"] > 0.9 and trained["margin"] > 0, trained
    checkpointer = Checkpointer(out_dir / "checkpoints", read_only=True)
    restored = checkpointer.manager.restore(40)["state"]
    checkpointer.close()
    assert "ref_params" not in (
        restored.get("extras") or {}
    )  # no frozen copy of the policy is kept


def test_resuming_with_or_without_a_reference_is_refused_in_one_line(sft_run, tmp_path, capsys):
    """A run started with a frozen reference cannot go on reference-free, nor the reverse:
    one line saying so (not 'no checkpoint reads back whole'), and the run is untouched."""
    data = tmp_path / "prefs.jsonl"
    write_preferences(data, 40, False)
    for first, then in (("sigmoid", "simpo"), ("orpo", "ipo")):
        out_dir = tmp_path / first
        assert cli_main(dpo_argv(sft_run, data, out_dir, *TWO_STEPS, f"dpo.loss={first}")) == 0
        before = sorted(p.name for p in out_dir.rglob("*"))
        capsys.readouterr()
        argv = dpo_argv(sft_run, data, out_dir, *TWO_STEPS, f"dpo.loss={then}", "train.steps=4")
        assert cli_main(argv) == 2
        errors = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert len(errors) == 1 and "a setting that decides them changed" in errors[0], errors
        assert ("[ref_params] but these settings keep []" in errors[0]) == (first == "sigmoid")
        assert sorted(p.name for p in out_dir.rglob("*")) == before
        assert finished_checkpoints(out_dir) == [2]


def test_a_resumed_run_without_its_starting_run_reproduces_the_metrics(sft_run, tmp_path):
    data = tmp_path / "prefs.jsonl"
    write_preferences(data, 80, False)
    steady = [
        "train.steps=4",
        "train.log_every=1",
        "checkpoint.every=2",
        "optimizer.warmup_steps=0",
        "optimizer.decay_steps=4",
    ]
    straight = tmp_path / "straight"
    assert cli_main(dpo_argv(sft_run, data, straight, *steady)) == 0
    shutil.copytree(sft_run, tmp_path / "sft")
    resumed = tmp_path / "resumed"
    argv = dpo_argv(tmp_path / "sft", data, resumed, *steady)
    assert cli_main([*argv, "train.steps=2"]) == 0
    assert finished_checkpoints(resumed) == [2]
    shutil.rmtree(tmp_path / "sft")  # the checkpoint holds the reference: not needed
    assert cli_main(argv) == 0
    lines = {
        name: {r["step"]: r for r in read_metrics(d / "metrics.jsonl") if r["split"] == "train"}
        for name, d in (("straight", straight), ("resumed", resumed))
    }
    for step in (3, 4):
        for key in ("loss", "accuracy", "margin", "logp_chosen", "grad_norm"):
            assert lines["resumed"][step][key] == lines["straight"][step][key], (step, key)


def test_bad_input_is_one_clear_line(sft_run, tmp_path, capsys):
    good = tmp_path / "prefs.jsonl"
    write_preferences(good, 40, False)
    malformed = tmp_path / "malformed.jsonl"
    malformed.write_text('{"prompt": "q", "chosen": "a"}\n')
    cases = [
        ([f"dpo.policy_from={tmp_path / 'nowhere'}"], "has no config.yaml"),
        (["dpo.policy_from="], "dpo.policy_from is not set"),
        ([f"data.path={malformed}"], "no 'rejected' field"),
        ([f"data.path={tmp_path / 'absent.jsonl'}"], "absent.jsonl"),
        (["dpo.loss=kto"], "dpo.loss='kto' is unknown"),
        (["dpo.beta=0"], "dpo.beta must be > 0"),
        (["dpo.label_smoothing=0.5"], "dpo.label_smoothing must lie in [0, 0.5)"),
        (["dpo.max_replies=2"], "raise dpo.max_replies"),
    ]
    for overrides, expected in cases:
        out_dir = tmp_path / "out"
        assert cli_main(dpo_argv(sft_run, good, out_dir, *TWO_STEPS, *overrides)) == 2, overrides
        errors = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert len(errors) == 1 and errors[0].startswith("error:"), (overrides, errors)
        assert expected in errors[0], errors
        assert not (out_dir / "checkpoints").exists()
