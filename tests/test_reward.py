"""`jaxllm reward`: the loss against values worked by hand (TRL's margin and centring), then
a reward model learns a preference it can see, and does not learn shuffled labels (the
control that shows the eval can fail)."""

import dataclasses
import json
import math
import random

import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm.cli import main as cli_main
from jaxllm.data.comparison_batches import comparison_arrays
from jaxllm.data.preferences import Comparison, PreferenceReport
from jaxllm.metrics import read_metrics
from jaxllm.stages.reward import comparison_loss
from jaxllm.tokenizer import load_tokenizer


def softplus(x: float) -> float:
    """-log sigmoid(-x)."""
    return math.log1p(math.exp(x))


def batch_of(*comparisons: Comparison, rows: list[int]) -> dict:
    """The host batch of `rows` (-1: an empty comparison) of comparisons padded to K = 3."""
    items = [(f"line {i}", c) for i, c in enumerate(comparisons)]
    arrays = comparison_arrays(
        items, load_tokenizer("bytes"), 32, 3, PreferenceReport(), "reward.max_replies"
    )
    return arrays.take(np.asarray(rows))


def conversation(role: str, text: str) -> list[dict]:
    return [{"role": role, "content": text}]


PAIR = Comparison(
    conversation("user", "q"),
    (conversation("assistant", "good"), conversation("assistant", "bad")),
    (0, 1),
)
RANKING = Comparison(  # reply 0 best, then 2, then 1
    conversation("user", "q"),
    tuple(conversation("assistant", text) for text in ("a", "b", "c")),
    (0, 2, 1),
)


def test_a_pairs_margin_is_subtracted_inside_the_logistic_as_trls_reward_loss():
    with_margin = dataclasses.replace(PAIR, margin=0.5)
    batch = batch_of(with_margin, PAIR, RANKING, rows=[0, 1, 2])
    scores_bk = jnp.array([[1.5, -0.5, 7.0], [1.5, -0.5, 7.0], [2.0, -1.0, 0.5]])
    loss_sum, aux = comparison_loss(scores_bk, batch, loss="pairs", center_coefficient=0.0)
    # -log s(r_c - r_r - 0.5) = -log s(1.5); the pair without a margin and the ranking as before.
    margin_loss, plain_loss = softplus(-1.5), softplus(-2.0)
    ranking = (softplus(-3.0) + 2 * softplus(-1.5)) / 3
    assert float(loss_sum) == pytest.approx(margin_loss + plain_loss + ranking, rel=1e-6)
    assert float(aux.means["margin"][0]) == pytest.approx(2.0 + 2.0 + 3.0 + 1.5 + 1.5, rel=1e-6)


def test_centring_adds_c_times_the_squared_sum_of_each_pair_averaged_within_a_comparison():
    batch = batch_of(PAIR, RANKING, rows=[0, 1, -1])
    # The pair's third reply is padding and the last comparison empty: their scores of 7
    # and 9 must count nowhere.
    scores_bk = jnp.array([[1.5, -0.5, 7.0], [2.0, -1.0, 0.5], [9.0, 9.0, 9.0]])
    c = 0.1
    loss_sum, aux = comparison_loss(scores_bk, batch, loss="pairs", center_coefficient=c)
    plain_sum, _ = comparison_loss(scores_bk, batch, loss="pairs", center_coefficient=0.0)
    # The pair: TRL's c (r_c + r_r)^2 = 0.1 x 1^2 (the mean score's c x 0.5^2 was 4x weaker).
    pair = softplus(-2.0) + c * 1.0
    # The ranking's pairs (0, 1), (0, 2), (2 over 1): margins 3, 1.5, 1.5 and squared sums
    # 1, 6.25, 0.25, each averaged over the 3 pairs.
    ranking = (softplus(-3.0) + 2 * softplus(-1.5)) / 3 + c * (1.0 + 6.25 + 0.25) / 3
    assert float(aux.denominator) == 2.0
    assert float(loss_sum) == pytest.approx(pair + ranking, rel=1e-6)
    assert float(loss_sum - plain_sum) == pytest.approx(c * (1.0 + 2.5), rel=1e-6)
    luce_sum, _ = comparison_loss(scores_bk, batch, loss="plackett_luce", center_coefficient=c)
    luce_plain, _ = comparison_loss(scores_bk, batch, loss="plackett_luce", center_coefficient=0.0)
    assert float(luce_sum - luce_plain) == pytest.approx(c * (1.0 + 2.5), rel=1e-6)


@pytest.mark.parametrize("sliding", [False, True])
def test_a_packed_batch_scores_each_reply_as_if_alone(sliding):
    """Each comparison's replies share one packed row: every reply's score is the one it
    gets in a row of its own, and an empty comparison has no tokens. A sliding-window
    layer measures its window in positions, so a reply held after others in the row sees
    as much of its prompt as alone."""
    import jax
    from helpers import tiny_config

    from jaxllm.config import REWARD_HEAD
    from jaxllm.losses import sequence_scores
    from jaxllm.model import LanguageModel
    from jaxllm.stages.reward import comparison_scores

    window = {"sliding_window": 6, "layer_types": ["sliding_attention"] * 2} if sliding else {}
    model_cfg = dataclasses.replace(tiny_config().model, scalar_heads=[REWARD_HEAD], **window)
    model = LanguageModel(model_cfg)
    params = model.init(jax.random.key(0))
    params = jax.tree.map(lambda x: x + 0.05 * jnp.cos(jnp.arange(x.size).reshape(x.shape)), params)
    items = [(f"line {i}", c) for i, c in enumerate((PAIR, RANKING, PAIR))]
    arrays = comparison_arrays(
        items, load_tokenizer("bytes"), 32, 3, PreferenceReport(), "reward.max_replies"
    )
    batch = arrays.take(np.array([0, 1, -1, 2]))
    assert batch["segment_ids_nt"][2].max() == 0  # the empty comparison
    assert set(batch["segment_ids_nt"][1].tolist()) == {0, 1, 2, 3, 4}  # prompt, 3 replies
    prompt = int(arrays.shared_prompt_n[1])
    assert prompt > 3 and (batch["segment_ids_nt"][1] == 1).sum() == prompt  # held once
    got = np.asarray(comparison_scores(model, params, batch))
    for row, source in ((0, 0), (1, 1), (3, 2)):
        for k in range(2 + (source == 1)):
            alone = sequence_scores(
                model,
                params,
                REWARD_HEAD,
                arrays.tokens_nkt[source, k][None],
                np.arange(32)[None],
                arrays.segment_ids_nkt[source, k][None],
                arrays.end_nk[source, k][None],
            )
            assert got[row, k] == pytest.approx(float(alone[0]), rel=1e-5, abs=1e-6)


def test_batches_grouped_by_length_hold_less_padding_and_each_comparison_once_an_epoch():
    from jaxllm.data.comparison_batches import LENGTH_GROUP_BATCHES, ComparisonBatches

    rng = random.Random(0)
    replies = [
        Comparison(
            conversation("user", "q"),
            tuple(conversation("assistant", "x" * rng.randint(1, 60)) for _ in range(2)),
            (0, 1),
        )
        for _ in range(64)
    ]
    items = [(f"line {i}", c) for i, c in enumerate(replies)]
    arrays = comparison_arrays(
        items, load_tokenizer("bytes"), 96, 2, PreferenceReport(), "reward.max_replies"
    )
    rows_n = arrays.row_lengths()
    assert rows_n.tolist() == [(arrays.take([i])["segment_ids_nt"] > 0).sum() for i in range(64)]
    padding = {}
    for grouped in (False, True):
        batches = ComparisonBatches(arrays, 4, None, seed=3, group_by_length=grouped)
        epoch = np.concatenate([batches.rows(step) for step in range(16)])
        assert sorted(epoch.tolist()) == list(range(64))  # each comparison once
        again = ComparisonBatches(arrays, 4, None, seed=3, group_by_length=grouped)
        assert (again.rows(21) == batches.rows(21)).all()  # a step is the same batch anew
        widths = [arrays.width(int(rows_n[batches.rows(s)].max())) for s in range(16)]
        padding[grouped] = 1 - rows_n.sum() / (4 * sum(widths))
    assert padding[True] < 0.6 * padding[False], padding
    # Within a run of LENGTH_GROUP_BATCHES batches, each batch is a slice of the lengths
    # sorted: no batch's rows overlap another's in length.
    grouped = ComparisonBatches(arrays, 4, None, seed=3, group_by_length=True)
    spans = sorted(
        (rows_n[grouped.rows(s)].min(), rows_n[grouped.rows(s)].max())
        for s in range(LENGTH_GROUP_BATCHES)
    )
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:], strict=False))


def write_preferences(path, count: int, shuffle_labels: bool, seed: int = 0) -> None:
    """Replies of 12 random letters; the preferred one holds more 'a's. Mixed formats: string
    pairs, message pairs, rankings of three by scores, a few soft labels."""
    rng = random.Random(seed)

    def reply(a_share: float) -> str:
        return "".join("a" if rng.random() < a_share else rng.choice("bcdefgh") for _ in range(12))

    lines = []
    for index in range(count):
        good, bad = reply(0.7), reply(0.1)
        if shuffle_labels and rng.random() < 0.5:
            good, bad = bad, good
        if index % 5 == 0:
            middle = reply(0.4)
            record = {"prompt": "rate", "responses": [bad, good, middle], "scores": [0, 2, 1]}
        elif index % 5 == 1:
            record = {
                "prompt": [{"role": "user", "content": "rate"}],
                "chosen": [{"role": "assistant", "content": good}],
                "rejected": [{"role": "assistant", "content": bad}],
            }
        else:
            record = {"prompt": "rate", "chosen": good, "rejected": bad}
            if index % 7 == 0:
                record["label_probability"] = 0.9
        lines.append(json.dumps(record))
    path.write_text("\n".join(lines) + "\n")


def held_out(tmp_path, shuffle_labels: bool, capsys) -> dict:
    data = tmp_path / f"prefs_{shuffle_labels}.jsonl"
    write_preferences(data, 400, shuffle_labels)
    out_dir = tmp_path / f"rm_{shuffle_labels}"
    argv = [
        "reward",
        "preset=tiny",
        f"data.path={data}",
        f"out_dir={out_dir}",
        "model.max_seq_len=64",
        "train.seq_len=48",
        "train.batch_size=16",
        "train.steps=80",
        "train.eval_every=80",
        "data.val_fraction=0.25",
        "optimizer.lr=3e-3",
        "optimizer.warmup_steps=5",
        "reward.max_replies=3",
    ]
    assert cli_main(argv) == 0
    assert "400 comparisons (80 rankings of more than 2 replies" in capsys.readouterr().out
    (line,) = [r for r in read_metrics(out_dir / "metrics.jsonl") if r["split"] == "eval"]
    return line


def test_a_reward_model_learns_a_visible_preference_and_not_shuffled_labels(tmp_path, capsys):
    learned = held_out(tmp_path, shuffle_labels=False, capsys=capsys)
    control = held_out(tmp_path, shuffle_labels=True, capsys=capsys)
    print(f"held out, labels as given: {learned}\nheld out, labels shuffled: {control}")  # figures
    assert learned["accuracy"] > 0.9 and learned["margin"] > 1.0
    assert 0.35 < control["accuracy"] < 0.65, control
    assert control["loss"] > learned["loss"]


@pytest.mark.parametrize(
    ("field", "message"),
    [
        ({"label_probability": 0.9}, "has no soft labels, but 4 comparisons"),
        ({"margin": 1.0}, "has no margins, but 4 pairs carry a 'margin'"),
    ],
)
def test_plackett_luce_refuses_soft_labels_and_margins(tmp_path, capsys, field, message):
    data = tmp_path / "prefs.jsonl"
    records = [
        {
            "prompt": "rate",
            "chosen": f"good {i}",
            "rejected": f"bad {i}",
            **(field if i < 4 else {}),
        }
        for i in range(40)
    ]
    data.write_text("".join(json.dumps(record) + "\n" for record in records))
    argv = ["reward", "preset=tiny", f"data.path={data}", f"out_dir={tmp_path / 'rm'}"]
    assert cli_main([*argv, "reward.loss=plackett_luce"]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0] and "use reward.loss=pairs" in errors[0]
    assert not (tmp_path / "rm" / "config.yaml").exists()


@pytest.mark.parametrize("override", ["reward.loss=hinge", "reward.max_replies=1"])
def test_bad_reward_settings_are_one_config_error(tmp_path, capsys, override):
    assert cli_main(["reward", "preset=tiny", f"out_dir={tmp_path}", override]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and override.split("=")[0] in errors[0]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ([], "data.path is not set"),
        (["reward.max_replies=2"], "3 replies but reward.max_replies=2"),
        (["train.seq_len=8"], "training comparisons fit train.seq_len=8"),
        (["data.eval_path=EMPTY"], "empty.jsonl holds no comparisons; add .jsonl lines"),
    ],
)
def test_bad_reward_data_is_one_error_and_writes_no_run(tmp_path, capsys, extra, message):
    data = tmp_path / "prefs.jsonl"
    write_preferences(data, 40, shuffle_labels=False)
    argv = ["reward", "preset=tiny", f"out_dir={tmp_path / 'rm'}"]
    if extra:
        argv.append(f"data.path={data}")
    (tmp_path / "empty.jsonl").write_text("\n")
    extra = [e.replace("EMPTY", str(tmp_path / "empty.jsonl")) for e in extra]
    assert cli_main([*argv, *extra]) == 2
    captured = capsys.readouterr()
    errors = [line for line in captured.err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], captured.err
    assert "Traceback" not in captured.err
    assert not (tmp_path / "rm" / "config.yaml").exists()
