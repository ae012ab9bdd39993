"""Preference data (pairs, prompt-less pairs, HH transcripts, rankings, soft labels) and the
reward-model losses (Bradley-Terry with a target probability, all pairs, Plackett-Luce)."""

import itertools
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import tiny_config

from jaxllm.data.comparison_batches import comparison_arrays
from jaxllm.data.preferences import PreferenceReport, read_comparisons, render_comparison
from jaxllm.errors import DataError
from jaxllm.losses import positions_from_segments, sequence_scores
from jaxllm.model import LanguageModel
from jaxllm.rl.preference_losses import (
    all_pairs_loss,
    pairwise_loss,
    plackett_luce_loss,
    rank_targets,
)
from jaxllm.tokenizer import load_tokenizer

BYTES = load_tokenizer("bytes")


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def comparisons_of(tmp_path, *records):
    path = tmp_path / "prefs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    report = PreferenceReport()
    return [c for _, c in read_comparisons(path, report)], report


def test_every_format_becomes_a_prompt_replies_and_ranks(tmp_path):
    hh_chosen = "\n\nHuman: hi\n\nAssistant: hello!\n\nHuman: name?\n\nAssistant: Ada."
    hh_rejected = "\n\nHuman: hi\n\nAssistant: hello!\n\nHuman: name?\n\nAssistant: no."
    comparisons, report = comparisons_of(
        tmp_path,
        {"prompt": "2+2?", "chosen": "4", "rejected": "5"},
        {"prompt": [user("2+2?")], "chosen": [assistant("4")], "rejected": [assistant("5")]},
        {
            "chosen": [user("hi"), assistant("yes"), user("sure?"), assistant("yes!")],
            "rejected": [user("hi"), assistant("yes"), user("sure?"), assistant("no")],
        },
        {"chosen": hh_chosen, "rejected": hh_rejected, "label_probability": 0.8},
        {"prompt": "pick", "responses": ["a", "b", "c"], "ranking": [2, 0, 1]},
        {"prompt": "pick", "responses": ["a", "b", "c"], "scores": [1.0, 3.0, 1.0]},
    )
    plain, messages, promptless, hh, ranked, scored = comparisons
    assert plain == messages
    assert plain.prompt == [user("2+2?")] and plain.replies == ([assistant("4")], [assistant("5")])
    assert plain.pairs() == [(0, 1, 1.0)]
    assert promptless.prompt == [user("hi"), assistant("yes"), user("sure?")]
    assert promptless.replies == ([assistant("yes!")], [assistant("no")])
    assert hh.prompt == [user("hi"), assistant("hello!"), user("name?")]
    assert hh.replies == ([assistant("Ada.")], [assistant("no.")])
    assert hh.pairs() == [(0, 1, 0.8)] and hh.ranks == (0, 1)
    assert ranked.ranks == (1, 2, 0)  # reply 2 best, then 0, then 1
    assert ranked.pairs() == [(0, 1, 1.0), (0, 2, 0.0), (1, 2, 0.0)]
    assert scored.ranks == (1, 0, 1)  # ties share a rank
    assert scored.pairs() == [(0, 1, 0.0), (0, 2, 0.5), (1, 2, 1.0)]
    assert (report.comparisons, report.rankings, report.soft_labels, report.ties) == (6, 2, 1, 1)


def test_a_soft_labels_ranks_follow_its_probability(tmp_path):
    """What reads ranks (Plackett-Luce, DPO's best-reply NLL) sees the reply the label
    favours as best, and p = 0.5 as a tie; the target stays p."""
    pair = {"prompt": "q", "chosen": "a", "rejected": "b"}
    lines = [{**pair, "label_probability": p} for p in (0.2, 0.5, 0.9)]
    comparisons, _ = comparisons_of(tmp_path, *lines)
    assert [c.ranks for c in comparisons] == [(1, 0), (0, 0), (0, 1)]
    assert [c.pairs() for c in comparisons] == [[(0, 1, 0.2)], [(0, 1, 0.5)], [(0, 1, 0.9)]]


def test_a_pairs_margin_reaches_its_batch_entry_and_zero_stands_for_none(tmp_path):
    path = tmp_path / "prefs.jsonl"
    records = [
        {"prompt": "q", "responses": ["a", "b", "c"], "ranking": [1, 0, 2]},
        {"prompt": "q", "chosen": "yes", "rejected": "no", "margin": 0.5},
        {"prompt": "q", "chosen": "yes", "rejected": "no"},
        {"prompt": "q", "chosen": "no", "rejected": "yes", "margin": -2},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    report = PreferenceReport()
    comparisons = list(read_comparisons(path, report))
    assert [c.margin for _, c in comparisons] == [None, 0.5, None, -2.0]
    assert report.margins == 2 and "2 margins" in report.summary()
    arrays = comparison_arrays(comparisons, BYTES, 32, 3, report, "reward.max_replies")
    expected = np.zeros((4, 3, 3), np.float32)
    expected[1, 0, 1], expected[3, 0, 1] = 0.5, -2.0  # chosen (reply 0) over rejected
    np.testing.assert_array_equal(arrays.required_margin_nkk, expected)
    np.testing.assert_array_equal(
        arrays.take(np.array([3, -1]))["required_margin_nkk"][0], expected[3]
    )


def test_each_reply_is_rendered_after_the_prompt_and_ends_with_im_end(tmp_path):
    (comparison,), _ = comparisons_of(tmp_path, {"prompt": "q", "chosen": "yes", "rejected": "n"})
    chosen, rejected = render_comparison(BYTES, comparison)
    im_end = BYTES.special_id("<|im_end|>")
    assert chosen.ids[chosen.end] == rejected.ids[rejected.end] == im_end
    assert chosen.end == len(chosen.ids) - 1 and len(chosen.ids) == len(rejected.ids) + 2
    assert BYTES.decode(chosen.ids).count("yes") == 1
    # The reply mask marks the reply's contents and its <|im_end|>, nothing of the prompt.
    for reply, text in ((chosen, "yes"), (rejected, "n")):
        marked = [t for t, m in zip(reply.ids, reply.reply_mask, strict=True) if m]
        assert marked == [*BYTES.encode(text), im_end]


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", "not valid JSON"),
        ('{"prompt": "q", "chosen": "a"}', "no 'rejected' field"),
        ('{"prompt": "q", "responses": ["a"], "ranking": [0]}', "at least 2 replies"),
        ('{"prompt": "q", "responses": ["a", "b"], "ranking": [0, 0]}', "permutation"),
        ('{"prompt": "q", "responses": ["a", "b"], "scores": [1]}', "2 finite numbers"),
        ('{"prompt": "q", "responses": ["a", "b"]}', "needs a 'ranking'"),
        ('{"prompt": "q", "chosen": "a", "rejected": "a"}', "replies 0 and 1 are identical"),
        ('{"prompt": "q", "chosen": "a", "rejected": "b", "label_probability": 1.5}', "[0, 1]"),
        ('{"prompt": "q", "chosen": "a", "rejected": "b", "margin": "1"}', "'margin' must be a"),
        ('{"prompt": "q", "chosen": "a", "rejected": "b", "margin": NaN}', "finite number, got"),
        ('{"prompt": "q", "chosen": "a", "rejected": "b", "margin": true}', "finite number, got"),
        (
            '{"prompt": "q", "chosen": "a", "rejected": "b", "margin": 1, "label_probability": 1}',
            "'label_probability' or 'margin', not both",
        ),
        (
            '{"prompt": "q", "responses": ["a", "b"], "ranking": [0, 1], "margin": 1}',
            "'margin' belongs to a pair (chosen, rejected), not to a ranking",
        ),
        ('{"chosen": "plain text", "rejected": "other"}', "HH transcript"),
        ('{"prompt": "q", "chosen": 5, "rejected": "b"}', "'chosen' must be a string or a"),
        (json.dumps({"prompt": "q", "chosen": [user("a")], "rejected": "b"}), "assistant turn"),
        (
            json.dumps(
                {"chosen": [user("a"), assistant("b")], "rejected": [user("c"), assistant("d")]}
            ),
            "share no first message",
        ),
    ],
)
def test_malformed_preference_data_is_one_error_naming_file_and_line(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "q", "chosen": "a", "rejected": "b"}\n' + line + "\n")
    with pytest.raises(DataError) as error:
        list(read_comparisons(path))
    assert str(error.value).startswith(f"{path}:2: ") and message in str(error.value)
    assert "\n" not in str(error.value)


def test_pairwise_loss_is_ln2_at_equal_scores_with_gradient_minus_and_plus_one_half():
    def loss(scores, p):
        return pairwise_loss(scores[:1], scores[1:], jnp.array([p]))[0]

    equal = jnp.array([0.3, 0.3])
    assert float(loss(equal, 1.0)) == pytest.approx(math.log(2), rel=1e-6)
    np.testing.assert_allclose(jax.grad(loss)(equal, 1.0), [-0.5, 0.5], rtol=1e-6)
    np.testing.assert_array_equal(jax.grad(loss)(equal, 0.5), [0.0, 0.0])  # a tie: no push
    d = 1.7  # a soft label is the same as p hard labels for a and 1 - p for b
    soft = loss(jnp.array([d, 0.0]), 0.8)
    hard = 0.8 * loss(jnp.array([d, 0.0]), 1.0) + 0.2 * loss(jnp.array([0.0, d]), 1.0)
    assert float(soft) == pytest.approx(float(hard), rel=1e-6)


def reference_pair_mean(scores, ranks, valid):
    terms = []
    for i, j in itertools.combinations(range(len(scores)), 2):
        if valid[i] and valid[j]:
            p = 1.0 if ranks[i] < ranks[j] else 0.0 if ranks[i] > ranks[j] else 0.5
            d = scores[i] - scores[j]
            terms.append(-(p * -np.log1p(np.exp(-d)) + (1 - p) * -np.log1p(np.exp(d))))
    return np.mean(terms)


def reference_plackett_luce(scores, ranks, valid):
    order = sorted((r, i) for i, (r, v) in enumerate(zip(ranks, valid, strict=True)) if v)
    ordered = np.array([scores[i] for _, i in order], np.float64)
    return -sum(ordered[i] - np.log(np.exp(ordered[i:]).sum()) for i in range(len(ordered)))


def test_all_pairs_and_plackett_luce_match_float64_references():
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(5, 4)).astype(np.float32)
    ranks = np.array([[0, 1, 2, 3], [3, 2, 1, 0], [1, 0, 1, 2], [0, 0, 0, 0], [2, 0, 1, 0]])
    valid = np.array([[1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 0, 0]], bool)
    pairs = all_pairs_loss(
        jnp.asarray(scores), *rank_targets(jnp.asarray(ranks), jnp.asarray(valid))
    )
    luce = plackett_luce_loss(jnp.asarray(scores), jnp.asarray(ranks), jnp.asarray(valid))
    for b in range(5):
        s64 = scores[b].astype(np.float64)
        assert float(pairs[b]) == pytest.approx(reference_pair_mean(s64, ranks[b], valid[b]))
        assert float(luce[b]) == pytest.approx(reference_plackett_luce(s64, ranks[b], valid[b]))


def test_plackett_luce_of_two_is_bradley_terry_and_ignores_a_shift():
    scores = jnp.array([[1.3, -0.4], [0.2, 0.9]])
    ranks, valid = jnp.array([[0, 1], [1, 0]]), jnp.ones((2, 2), bool)
    luce = plackett_luce_loss(scores, ranks, valid)
    bradley_terry = pairwise_loss(scores[:, 0], scores[:, 1], jnp.array([1.0, 0.0]))
    np.testing.assert_allclose(luce, bradley_terry, rtol=1e-6)
    pairs = all_pairs_loss(scores, *rank_targets(ranks, valid))
    np.testing.assert_allclose(pairs, bradley_terry, rtol=1e-6)
    shifted = plackett_luce_loss(scores + 5.0, ranks, valid)
    np.testing.assert_allclose(shifted, luce, rtol=1e-5)


def test_a_reply_scores_the_same_left_padded_right_padded_and_beside_other_rows():
    model = LanguageModel(tiny_config("model.scalar_heads=[reward]").model)
    params = model.init(jax.random.key(0))
    head = params["heads"]["reward"]  # a head starts at 0: give it a direction
    head["w_d"] = jax.random.normal(jax.random.key(1), head["w_d"].shape)
    ids = np.random.default_rng(0).integers(0, 256, 23)
    width = 40

    def row(ids, pad_left):
        tokens, segments = np.zeros(width, np.int32), np.zeros(width, np.int32)
        start = width - len(ids) if pad_left else 0
        tokens[start : start + len(ids)], segments[start : start + len(ids)] = ids, 1
        return tokens, segments, start + len(ids) - 1

    def scores(rows):
        tokens, segments, ends = (np.stack(x) for x in zip(*rows, strict=True))
        positions = positions_from_segments(segments)
        return np.asarray(
            sequence_scores(model, params, "reward", tokens, positions, segments, ends)
        )

    alone = np.asarray(
        sequence_scores(
            model, params, "reward", ids[None], np.arange(23)[None], np.ones((1, 23)), [22]
        )
    )[0]
    other = np.random.default_rng(1).integers(0, 256, 31)
    got = scores([row(ids, False), row(ids, True), row(other, True), row(ids, False)])
    np.testing.assert_allclose(got[[0, 1, 3]], alone, rtol=0, atol=1e-5)
    assert abs(got[2] - alone) > 1e-4  # another reply scores differently
