"""Preference data: people (or a model) compare replies to the same prompt.

A `.jsonl` line is one of (the formats of TRL and of Anthropic's HH data):
- a pair: `{"prompt": P, "chosen": R, "rejected": R}`, P a string (one user turn) or a
  message list, R a string (one assistant turn) or a message list (the turns after P);
- a pair without a prompt: `{"chosen": C, "rejected": C}`, two whole conversations that
  share a beginning: the prompt is their longest common run of whole messages, the replies
  what follows. C is a message list or an HH transcript string
  ("\\n\\nHuman: ...\\n\\nAssistant: ...");
- a ranking of K >= 2 replies: `{"prompt": P, "responses": [R, ...], "ranking": [i0, i1,
  ...]}` (reply indices, best first) or `"scores": [s0, s1, ...]` (higher is better; equal
  scores are ties).
A pair may carry `"label_probability"`: the probability in [0, 1] that the chosen reply is
better (a soft label, from a model rather than a person); or TRL's `"margin"`, a finite
number the chosen reply's score should beat the rejected one's by: the reward model's loss
is then -log s(r_chosen - r_rejected - margin). DPO ignores a margin, as TRL's DPO does;
a ranking, or a pair with a soft label, may not carry one.

Every line becomes a `Comparison` (prompt messages, K replies, a rank per reply); every
problem is a `DataError` naming the file and line. `render_comparison` renders each reply
after the prompt with the chat template, so it ends with `<|im_end|>`, the token a reward
model reads, and marks the reply's tokens, whose log-probabilities DPO sums.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from jaxllm.chat import render_conversation, render_reply
from jaxllm.data.conversations import Conversation, checked_messages, read_jsonl_records
from jaxllm.errors import DataError
from jaxllm.tokenizer import Tokenizer

HH_TURN = re.compile(r"\n\n(Human|Assistant): ")


@dataclass(frozen=True)
class Comparison:
    """K >= 2 replies to one prompt and how they were ranked."""

    prompt: Conversation  # the messages before the replies
    replies: tuple[Conversation, ...]  # K continuations of the prompt
    ranks: tuple[int, ...]  # per reply, 0 = best; equal ranks are ties (a soft label's: by p)
    label_probability: float | None = None  # pairs: P(reply 0 is better than reply 1)
    margin: float | None = None  # pairs: the score gap reply 0 should win by (TRL's)

    def pairs(self) -> list[tuple[int, int, float]]:
        """(i, j, probability that reply i is better than reply j) for every pair i < j:
        1 or 0 by rank, 0.5 for a tie, the label probability where one was given."""
        if self.label_probability is not None:
            return [(0, 1, self.label_probability)]
        result = []
        for i in range(len(self.replies)):
            for j in range(i + 1, len(self.replies)):
                a, b = self.ranks[i], self.ranks[j]
                result.append((i, j, 1.0 if a < b else 0.0 if a > b else 0.5))
        return result


@dataclass
class PreferenceReport:
    """Counts a run reports about its preference data."""

    comparisons: int = 0
    rankings: int = 0  # comparisons of more than two replies
    soft_labels: int = 0
    ties: int = 0  # pairs of replies ranked equal
    margins: int = 0  # pairs with a `margin`
    dropped_too_long: int = 0  # comparisons with a reply longer than a row (the stage's)
    files: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return (
            f"{self.comparisons} comparisons ({self.rankings} rankings of more than 2 replies, "
            f"{self.soft_labels} soft labels, {self.ties} tied pairs, {self.margins} margins) from "
            f"{len(self.files)} file(s)"
        )


def hh_transcript_messages(text: str, where: str, field: str = "conversation") -> Conversation:
    """An HH transcript ("\\n\\nHuman: ...\\n\\nAssistant: ...") as user/assistant messages."""
    parts = HH_TURN.split(text)
    if len(parts) < 3 or parts[0].strip():
        raise DataError(
            f"{where}: '{field}' must be an HH transcript starting with "
            "'\\n\\nHuman: ', or a message list"
        )
    roles = {"Human": "user", "Assistant": "assistant"}
    messages = [
        {"role": roles[speaker], "content": content}
        for speaker, content in zip(parts[1::2], parts[2::2], strict=True)
    ]
    return checked_messages(messages, where)


def _prompt(value: object, where: str) -> Conversation:
    if isinstance(value, str):
        return checked_messages([{"role": "user", "content": value}], where, "prompt")
    return checked_messages(value, where, "prompt")


def _reply(value: object, where: str, name: str) -> Conversation:
    if isinstance(value, str):
        return checked_messages([{"role": "assistant", "content": value}], where, name)
    messages = checked_messages(value, where, name)
    if messages[0]["role"] != "assistant":
        raise DataError(
            f"{where}: '{name}' is a reply to 'prompt': start it with an assistant turn"
        )
    return messages


def _split_at_common_prefix(
    chosen: Conversation, rejected: Conversation, where: str
) -> tuple[Conversation, Conversation, Conversation]:
    """(prompt, chosen reply, rejected reply): the prompt is the longest run of whole
    messages both start with; each reply is what follows it."""
    common = 0
    while common < min(len(chosen), len(rejected)) - 1 and chosen[common] == rejected[common]:
        common += 1
    prompt, chosen_reply, rejected_reply = chosen[:common], chosen[common:], rejected[common:]
    if not prompt:
        raise DataError(f"{where}: 'chosen' and 'rejected' share no first message to prompt with")
    if chosen_reply[0]["role"] != "assistant" or rejected_reply[0]["role"] != "assistant":
        raise DataError(
            f"{where}: after their common messages 'chosen' and 'rejected' must go on with an "
            "assistant turn"
        )
    return prompt, chosen_reply, rejected_reply


def _conversation(value: object, where: str, name: str) -> Conversation:
    if isinstance(value, str):
        return hh_transcript_messages(value, where, name)
    return checked_messages(value, where, name)


def _ranks(record: dict, num_replies: int, where: str) -> tuple[int, ...]:
    if "ranking" in record:
        ranking = record["ranking"]
        is_permutation = (
            isinstance(ranking, list)
            and all(type(index) is int for index in ranking)
            and sorted(ranking) == list(range(num_replies))
        )
        if not is_permutation:
            raise DataError(
                f"{where}: 'ranking' must be a permutation of the reply indices "
                f"0..{num_replies - 1} (best first), got {ranking!r}"
            )
        ranks = [0] * num_replies
        for rank, index in enumerate(ranking):
            ranks[index] = rank
        return tuple(ranks)
    if "scores" in record:
        scores = record["scores"]
        if (
            not isinstance(scores, list)
            or len(scores) != num_replies
            or not all(isinstance(s, int | float) and not isinstance(s, bool) for s in scores)
            or not all(math.isfinite(s) for s in scores)
        ):
            raise DataError(
                f"{where}: 'scores' must be {num_replies} finite numbers, one per response"
            )
        distinct = sorted(set(scores), reverse=True)
        return tuple(distinct.index(s) for s in scores)
    raise DataError(f"{where}: 'responses' needs a 'ranking' (best first) or 'scores'")


def comparison_of(record: object, where: str) -> Comparison:
    """The `Comparison` of one JSONL record (see the module docstring for the formats)."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: a line must be a JSON object (chosen/rejected or responses)")
    if "responses" in record:
        if "prompt" not in record:
            raise DataError(f"{where}: a ranking needs a 'prompt'")
        if "margin" in record:
            raise DataError(
                f"{where}: 'margin' belongs to a pair (chosen, rejected), not to a ranking; "
                "drop it or write the ranking as pairs"
            )
        responses = record["responses"]
        if not isinstance(responses, list) or len(responses) < 2:
            raise DataError(f"{where}: 'responses' must list at least 2 replies to compare")
        replies = [_reply(r, where, f"responses[{i}]") for i, r in enumerate(responses)]
        comparison = Comparison(
            _prompt(record["prompt"], where), tuple(replies), _ranks(record, len(replies), where)
        )
    elif "chosen" in record and "rejected" in record:
        if "prompt" in record:
            prompt = _prompt(record["prompt"], where)
            chosen = _reply(record["chosen"], where, "chosen")
            rejected = _reply(record["rejected"], where, "rejected")
        else:
            prompt, chosen, rejected = _split_at_common_prefix(
                _conversation(record["chosen"], where, "chosen"),
                _conversation(record["rejected"], where, "rejected"),
                where,
            )
        probability, margin = _label_probability(record, where), _margin(record, where)
        if probability is not None and margin is not None:
            raise DataError(f"{where}: a pair carries 'label_probability' or 'margin', not both")
        comparison = Comparison(
            prompt, (chosen, rejected), _pair_ranks(probability), probability, margin
        )
    else:
        missing = "rejected" if "chosen" in record else "chosen"
        raise DataError(
            f"{where}: no '{missing}' field; a line is a pair (chosen, rejected) or a ranking "
            "(prompt, responses, ranking or scores)"
        )
    for i in range(len(comparison.replies)):
        for j in range(i + 1, len(comparison.replies)):
            if comparison.replies[i] == comparison.replies[j]:
                raise DataError(
                    f"{where}: replies {i} and {j} are identical; a comparison needs different "
                    "replies"
                )
    return comparison


def _pair_ranks(probability: float | None) -> tuple[int, int]:
    """The ranks of (chosen, rejected): the reply a soft label favours is best (what the
    reward stage's Plackett-Luce and DPO's best-reply NLL read); p = 0.5 is a tie."""
    if probability is None or probability > 0.5:
        return (0, 1)
    return (1, 0) if probability < 0.5 else (0, 0)


def _label_probability(record: dict, where: str) -> float | None:
    if "label_probability" not in record:
        return None
    value = record["label_probability"]
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1:
        raise DataError(f"{where}: 'label_probability' must be a number in [0, 1], got {value!r}")
    return float(value)


def _margin(record: dict, where: str) -> float | None:
    if "margin" not in record:
        return None
    value = record["margin"]
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise DataError(f"{where}: 'margin' must be a finite number, got {value!r}")
    return float(value)


def read_comparisons(
    path: str | Path, report: PreferenceReport | None = None
) -> Iterator[tuple[str, Comparison]]:
    """Yield (where, comparison) of every line of the .jsonl files under `path`."""
    report = report if report is not None else PreferenceReport()
    for where, record in read_jsonl_records(path, "preference data (pairs or rankings)"):
        comparison = comparison_of(record, where)
        file = where.rpartition(":")[0]
        if file not in report.files:
            report.files.append(file)
        report.comparisons += 1
        report.rankings += len(comparison.replies) > 2
        report.soft_labels += comparison.label_probability is not None
        report.margins += comparison.margin is not None
        report.ties += sum(p == 0.5 for _, _, p in comparison.pairs())
        yield where, comparison


class RenderedReply(NamedTuple):
    """One reply of a comparison rendered after its prompt."""

    ids: list[int]  # prompt + reply under the chat template
    end: int  # index of the reply's last token, its closing `<|im_end|>`
    reply_mask: list[int]  # 1 on the reply's assistant contents and their `<|im_end|>`


def render_comparison(tokenizer: Tokenizer, comparison: Comparison) -> list[RenderedReply]:
    """Per reply: the ids of prompt + reply under the chat template, the index of its last
    token (where a reward model reads its score), and the mask of the reply tokens whose
    log-probabilities DPO sums (SFT's mask, limited to the reply: role headers and the
    prompt are not counted)."""
    prompt_len = len(render_conversation(tokenizer, comparison.prompt)[0])
    rendered = []
    for reply in comparison.replies:
        ids, mask = render_reply(tokenizer, [*comparison.prompt, *reply])
        reply_mask = [0] * prompt_len + mask[prompt_len:]
        rendered.append(RenderedReply(ids, len(ids) - 1, reply_mask))
    return rendered
