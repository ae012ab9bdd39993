"""Judges: who says which of two replies to a prompt is better, as a probability.

Every judge is called as `judge(prompts, replies_a, replies_b)` on aligned lists (a prompt
is a message list, a reply a string) and returns P(reply a is better than reply b) per
pair, float64 (`judge_one` asks about one pair):
- `GoldJudge`: the simulated labelers' view, sigmoid((g_a - g_b) / tau) of a gold rule
  (tau = 0: 1, 0, or 0.5 for equal gold), for experiments;
- `RewardModelJudge`: a reward run, sigmoid(r_a - r_b) of its scores;
- `PolicyJudge`: a chat model asked "which reply is better, A or B?" through the chat
  template, reading the probability of its first reply token being `A` against `B`, asked
  in both orders and averaged, so a judge that always answers "A" says 0.5 (position bias
  cancels).
Swapping a and b gives 1 - p: exactly for the gold and reward-model judges (the logistic
is evaluated on |d| and mirrored), up to rounding for the policy judge.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.chat import render_for_generation, render_reply
from jaxllm.config import REWARD_HEAD
from jaxllm.errors import UserError
from jaxllm.losses import scaled_vocab_logits, sequence_scores
from jaxllm.rl.labelers import GoldRule

Messages = list[dict[str, str]]
# (prompts, replies a, replies b) -> P(a better than b) per pair, float64
Judge = Callable[[Sequence[Messages], Sequence[str], Sequence[str]], np.ndarray]


def mirrored_sigmoid(d: np.ndarray) -> np.ndarray:
    """sigmoid(d), float64, computed as 1 - sigmoid(-d) for negative d, so that
    mirrored_sigmoid(-d) == 1 - mirrored_sigmoid(d) exactly."""
    d = np.asarray(d, np.float64)
    upper = 1 / (1 + np.exp(-np.abs(d)))
    return np.where(d >= 0, upper, 1 - upper)


def judge_one(judge, prompt: Messages, reply_a: str, reply_b: str) -> float:
    """P(reply_a is better than reply_b) for one pair."""
    return float(judge([prompt], [reply_a], [reply_b])[0])


class GoldJudge:
    """The simulated labelers: P(a better) = sigmoid((g_a - g_b) / tau) of a gold rule."""

    def __init__(self, rule: GoldRule, tau: float):
        if not tau >= 0:
            raise UserError(f"a gold judge's tau must be >= 0, got {tau}")
        self.rule, self.tau = rule, tau

    def __call__(self, prompts, replies_a, replies_b) -> np.ndarray:
        gap = np.array(
            [self.rule(a) - self.rule(b) for a, b in zip(replies_a, replies_b, strict=True)]
        )
        if self.tau == 0:
            return np.where(gap > 0, 1.0, np.where(gap < 0, 0.0, 0.5))
        return mirrored_sigmoid(gap / self.tau)


def _padded(rows: Sequence[Sequence[int]], pad_id: int, length: int):
    tokens = np.full((len(rows), length), pad_id, np.int32)
    segments = np.zeros((len(rows), length), np.int32)
    for i, ids in enumerate(rows):
        tokens[i, : len(ids)], segments[i, : len(ids)] = ids, 1
    positions = np.broadcast_to(np.arange(length, dtype=np.int32), tokens.shape)
    return tokens, positions, segments


class RewardModelJudge:
    """A reward run as a judge: P(a better) = sigmoid(r_a - r_b). Each distinct (prompt,
    reply) is scored once, rows in a canonical (sorted) order and padded to the model's
    context, so a reply's score does not depend on the pairs it came with."""

    def __init__(self, run, rows_per_call: int = 64):
        if REWARD_HEAD not in run.model.cfg.scalar_heads:
            raise UserError("the judge's run has no 'reward' head; pass a `jaxllm reward` run")
        self.run, self.rows_per_call = run, rows_per_call
        self._score = jax.jit(
            lambda params, tokens, positions, segments, ends: sequence_scores(
                run.model, params, REWARD_HEAD, tokens, positions, segments, ends
            )
        )

    def scores(self, prompts: Sequence[Messages], replies: Sequence[str]) -> np.ndarray:
        """float64 reward-model score of each (prompt, reply), read at its `<|im_end|>`."""
        tokenizer, context = self.run.tokenizer, self.run.model.cfg.max_seq_len
        rendered = [
            tuple(render_reply(tokenizer, [*p, {"role": "assistant", "content": r}])[0])
            for p, r in zip(prompts, replies, strict=True)
        ]
        unique = sorted(set(rendered))
        too_long = [len(ids) for ids in unique if len(ids) > context]
        if too_long:
            raise UserError(
                f"a prompt and reply of {max(too_long)} tokens exceed the judge's context of "
                f"{context}; shorten them"
            )
        score_of = {}
        for start in range(0, len(unique), self.rows_per_call):
            rows = unique[start : start + self.rows_per_call]
            rows = rows + [rows[-1]] * (self.rows_per_call - len(rows))  # one compiled shape
            tokens, positions, segments = _padded(rows, tokenizer.pad_id, context)
            ends = np.array([len(ids) - 1 for ids in rows], np.int32)
            values = np.asarray(self._score(self.run.params, tokens, positions, segments, ends))
            score_of.update(zip(rows, values.astype(np.float64), strict=True))
        return np.array([score_of[ids] for ids in rendered])

    def __call__(self, prompts, replies_a, replies_b) -> np.ndarray:
        count = len(prompts)
        scores = self.scores([*prompts, *prompts], [*replies_a, *replies_b])
        return mirrored_sigmoid(scores[:count] - scores[count:])


COMPARISON_QUESTION = (
    "Which reply to the conversation below is better? Answer with one letter, A or B.\n\n"
    "Conversation:\n{conversation}\n\nReply A:\n{reply_a}\n\nReply B:\n{reply_b}"
)


class PolicyJudge:
    """A chat model as a judge: asked `COMPARISON_QUESTION` as one user turn, the
    probability of `A` against `B` as the first token of its reply, p = P(A), in both
    orders: P(a better) = (P(A | a first) + P(B | b first)) / 2."""

    def __init__(self, run, question: str = COMPARISON_QUESTION):
        tokenizer = run.tokenizer
        ids = [tokenizer.encode(letter) for letter in ("A", "B")]
        if any(len(i) != 1 for i in ids):
            raise UserError("the judge's tokenizer does not encode 'A' and 'B' as one token each")
        self.run, self.question = run, question
        self.choice_ids = jnp.array([ids[0][0], ids[1][0]])
        vocab = tokenizer.vocab_size

        def first_token_a(params, tokens, positions, segments, last):
            logits_btv = run.model.logits(params, tokens, positions, segments)
            logits_bv = jnp.take_along_axis(logits_btv, last[:, None, None], axis=1)[:, 0]
            pair_b2 = scaled_vocab_logits(logits_bv, 1.0, vocab)[:, self.choice_ids]
            return jax.nn.softmax(pair_b2, axis=-1)[:, 0]

        self._first_token_a = jax.jit(first_token_a)

    def probability_of_a(self, prompts, first, second) -> np.ndarray:
        """P(answer A | A = first, B = second) per pair, float64."""
        tokenizer, context = self.run.tokenizer, self.run.model.cfg.max_seq_len
        rows = []
        for prompt, a, b in zip(prompts, first, second, strict=True):
            conversation = "\n".join(f"{m['role']}: {m['content']}" for m in prompt)
            text = self.question.format(conversation=conversation, reply_a=a, reply_b=b)
            rows.append(render_for_generation(tokenizer, [{"role": "user", "content": text}]))
        longest = max(len(ids) for ids in rows)
        if longest > context:
            raise UserError(
                f"a comparison question of {longest} tokens exceeds the judge's context of "
                f"{context}; shorten the prompts or replies"
            )
        tokens, positions, segments = _padded(rows, tokenizer.pad_id, context)
        last = np.array([len(ids) - 1 for ids in rows], np.int32)
        p = self._first_token_a(self.run.params, tokens, positions, segments, last)
        return np.asarray(p, np.float64)

    def __call__(self, prompts, replies_a, replies_b) -> np.ndarray:
        a_first = self.probability_of_a(prompts, replies_a, replies_b)
        b_first = self.probability_of_a(prompts, replies_b, replies_a)
        return (a_first + (1 - b_first)) / 2
