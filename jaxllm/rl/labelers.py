"""Simulated labelers: a gold rule stands in for human taste, and noise for human error.

No person is at hand on a CPU, so a known rule scores each reply (its *gold* reward) and a
labeler ranks the replies of a prompt by sampling from Plackett-Luce on gold / tau:
P(a first among a, b) = sigmoid((g_a - g_b) / tau), the Bradley-Terry noise of real
labelers, with tau -> 0 a perfect labeler; replies of equal gold are ties. Because the
rule is known, every later stage can log the gold reward beside its proxy (the reward
model) and show reward hacking.

Gold rules (host functions of the reply text, floats):
- `length`: -|len(reply) - target| / target, best at `target` characters; a reward model
  that learns "longer is better" from short replies is over-optimised by rambling.
- `liked_words`: liked words (from a fixed list) per word, minus the share of repeated
  words; a policy can game a proxy by repeating a liked word, which the gold rule punishes.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence

import numpy as np

GoldRule = Callable[[str], float]

LIKED_WORDS = frozenset({"good", "kind", "clear", "thanks", "yes", "great", "help", "sure"})


def length_rule(target: int = 40) -> GoldRule:
    """-|characters - target| / target: 0 at the target length, lower either side."""
    return lambda reply: -abs(len(reply) - target) / target


def liked_words_rule(reply: str) -> float:
    """(liked words - repeated words) / words: liked vocabulary, used without repetition."""
    words = re.findall(r"[a-z']+", reply.lower())
    if not words:
        return 0.0
    liked = sum(word in LIKED_WORDS for word in words)
    repeated = len(words) - len(set(words))
    return (liked - repeated) / len(words)


GOLD_RULES: dict[str, GoldRule] = {"length": length_rule(), "liked_words": liked_words_rule}


def noisy_ranking(gold: Sequence[float], tau: float, rng: np.random.Generator) -> list[int]:
    """Reply indices best first, drawn from Plackett-Luce on gold / tau (Gumbel-max: sort
    gold / tau + Gumbel noise). For two replies, P(a before b) = sigmoid((g_a - g_b) / tau);
    tau = 0 sorts by gold (ties by index)."""
    gold = np.asarray(gold, np.float64)
    if tau == 0:
        return sorted(range(len(gold)), key=lambda i: (-gold[i], i))
    keys = gold / tau + rng.gumbel(size=len(gold))
    return [int(i) for i in np.argsort(-keys, kind="stable")]


def label(
    prompt: str | list[dict[str, str]],
    replies: Sequence[str],
    rule: GoldRule,
    tau: float,
    rng: np.random.Generator,
) -> dict:
    """One preference record (the scores form of `jaxllm.data.preferences`) for the replies
    to `prompt`: a noisy labeler's ranking of `rule`'s gold rewards, as scores (K - 1 for
    the first, 0 for the last), where replies of equal gold are ties (the labeler sees no
    difference; their score is the mean of their places). The gold rewards ride along in
    `gold` so a reward-hacking watch can read them."""
    gold = [rule(reply) for reply in replies]
    order = noisy_ranking(gold, tau, rng)
    place = {reply: len(replies) - 1 - position for position, reply in enumerate(order)}
    scores = [
        float(np.mean([place[j] for j in range(len(replies)) if gold[j] == gold[i]]))
        for i in range(len(replies))
    ]
    return {"prompt": prompt, "responses": list(replies), "scores": scores, "gold": gold}


def bayes_ceiling(gold_pairs: Sequence[tuple[float, float]], tau: float) -> float:
    """The best pairwise accuracy any reward model can reach on these labelers' labels:
    the mean over pairs of max(P, 1 - P), P = sigmoid((g_a - g_b) / tau) (ties: 0.5)."""
    total = 0.0
    for gold_a, gold_b in gold_pairs:
        if tau == 0:
            total += 0.5 if gold_a == gold_b else 1.0
            continue
        total += 1 / (1 + math.exp(-abs(gold_a - gold_b) / tau))  # max(P, 1 - P), no overflow
    return total / len(gold_pairs)
