"""Rule-based rewards by name, combined with weights from the config (GRPO).

A reward function is `(prompt, completion, example) -> float`: the prompt's last user turn,
the reply's text (reasoning included, `<|im_end|>` not), and the prompt record's fields
(`answer`, `family`, ...) plus `completion_ids` (the reply's token ids, stop token
included). Register your own with `register_reward(name, fn)` before the stage starts.

Built in (`make_rewards` binds them to a tokenizer and the reply budget):
- `correct`: 1.0 when the reply's answer matches the example's `answer`
  (`jaxllm.answers.answers_match`: equal strings, math-verify's equality, or equal
  numbers); else 0.0. The reply's answer is its text after `</think>`, up to
  `<|im_end|>`, read by `extract_answer` in the example's own `answer_format` (a prompt
  row's field) or else `grpo.answer_format` (`auto`: the last `\\boxed{}`, else what
  follows `####`, else the whole text).
- `format`: 1.0 for exactly `<think>` ... `</think>` first, a non-empty answer after it,
  and `<|im_end|>` last, checked on token ids (typed "<think>" text is not the token);
  else 0.0.
- `length`: DAPO's soft overlong penalty: 0 up to N - cache tokens, falling linearly to
  -1 at N (the reply budget), with cache = `grpo.length_cache`.
- `reward_model`: a reward run's score of the reply, normalised by that run's recorded
  mean and std (the stage computes it on the device and hands it over as
  `example["reward_model_score"]`), so GRPO can do RLHF too.
Every value is a float32; weights multiply and add: reward = sum_name w_name * r_name.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np

from jaxllm.answers import answers_match, extract_answer
from jaxllm.errors import ConfigError
from jaxllm.tokenizer import Tokenizer

RewardFn = Callable[[str, str, dict], float]

_USER_REWARDS: dict[str, RewardFn] = {}
BUILTIN = ("correct", "format", "length", "reward_model")


def register_reward(name: str, fn: RewardFn) -> None:
    """Make `fn` available as `grpo.rewards.<name>` (an experiment script calls this)."""
    if name in BUILTIN:
        raise ValueError(f"'{name}' is a built-in reward; choose another name")
    _USER_REWARDS[name] = fn


def final_answer(tokenizer: Tokenizer, ids: list[int]) -> str:
    """The reply's answer text: after the last `</think>` (if the tokenizer has one), before
    its stop token."""
    end_think = (tokenizer.think_ids() or (None, None))[1]
    stops = tokenizer.stop_ids
    if end_think in ids:
        ids = ids[len(ids) - ids[::-1].index(end_think) :]
    return tokenizer.decode((t for t in ids if t not in stops), skip_special_tokens=True).strip()


def format_ok(tokenizer: Tokenizer, ids: list[int]) -> bool:
    """Exactly one `<think>` (first) and one `</think>`, a non-empty answer after it, and
    one stop token (`<|im_end|>` in jaxllm's template), the last; never for a tokenizer
    without `<think>` (the `format` reward refuses one, see `make_rewards`)."""
    if tokenizer.think_ids() is None:
        return False
    think, end_think = tokenizer.think_ids()
    stops = tokenizer.stop_ids
    if not ids or ids[0] != think or ids[-1] not in stops:
        return False
    if sum(t in stops for t in ids) != 1:
        return False
    if ids.count(think) != 1 or ids.count(end_think) != 1:
        return False
    answer = ids[ids.index(end_think) + 1 : -1]
    return bool(tokenizer.decode(answer).strip())


def make_rewards(
    weights: Mapping[str, float],
    tokenizer: Tokenizer,
    max_new_tokens: int,
    length_cache: int,
    answer_format: str = "auto",
) -> dict[str, RewardFn]:
    """The named reward functions of `weights` (a ConfigError for an unknown name);
    `answer_format` reads a reply's answer where the example names no `answer_format`."""

    def correct(prompt: str, completion: str, example: dict) -> float:
        how = example.get("answer_format") or answer_format
        answer = extract_answer(final_answer(tokenizer, example["completion_ids"]), how)
        return float(answers_match(answer, example["answer"]))

    builtin: dict[str, RewardFn] = {
        "correct": correct,
        "format": lambda prompt, completion, example: float(
            format_ok(tokenizer, example["completion_ids"])
        ),
        "length": lambda prompt, completion, example: overlong_penalty(
            len(example["completion_ids"]), max_new_tokens, length_cache
        ),
        "reward_model": lambda prompt, completion, example: example["reward_model_score"],
    }
    if weights.get("format"):  # weighted 0 (grpo.rewards.format=0), it may stay unmet
        tokenizer.special_id("<think>")  # a DataError now for a tokenizer without it
    available = {**builtin, **_USER_REWARDS}
    unknown = [name for name in weights if name not in available]
    if unknown:
        raise ConfigError(
            f"grpo.rewards names unknown reward(s) {', '.join(unknown)}; use "
            f"{', '.join(available)} or register_reward(name, fn) in your script"
        )
    return {name: available[name] for name in weights}


def overlong_penalty(length: int, max_length: int, cache: int) -> float:
    """0 for length <= max - cache, then linear to -1 at max (DAPO's soft overlong
    punishment)."""
    if length <= max_length - cache:
        return 0.0
    return max(-1.0, (max_length - cache - length) / max(cache, 1))


def score_replies(
    rewards: Mapping[str, RewardFn],
    weights: Mapping[str, float],
    prompts: list[str],
    completions: list[str],
    examples: list[dict],
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """(weighted total (B,), each named reward (B,)), float32. (The stage has checked that
    every prompt has an `answer` when `correct` is used.)"""
    named = {
        name: np.array(
            [fn(p, c, e) for p, c, e in zip(prompts, completions, examples, strict=True)],
            np.float32,
        )
        for name, fn in rewards.items()
    }
    total = np.zeros(len(prompts), np.float32)
    for name, values in named.items():
        total += np.float32(weights[name]) * values
    return total, named
