"""The chat template and `<think>` handling.

A message is `<|im_start|>{role}<|im_sep|>{content}<|im_end|>` with roles `system`, `user`
and `assistant`; a prompt for generation ends with `<|im_start|>assistant<|im_sep|>`. The
five markers are the tokenizer's special ids; roles and contents are encoded as plain text,
so text that merely contains a marker never becomes one. An assistant reply may open with
`<think>…</think>` (its reasoning) before the answer.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from jaxllm.tokenizer import Tokenizer

ROLES = ("system", "user", "assistant")


def render_message(tokenizer: Tokenizer, role: str, content: str) -> list[int]:
    if role not in ROLES:
        raise ValueError(f"unknown role '{role}'; use one of {', '.join(ROLES)}")
    ids = tokenizer.special_ids
    return [
        ids["<|im_start|>"],
        *tokenizer.encode(role),
        ids["<|im_sep|>"],
        *tokenizer.encode(content),
        ids["<|im_end|>"],
    ]


def render_for_generation(tokenizer: Tokenizer, messages: Sequence[dict[str, str]]) -> list[int]:
    """A conversation's ids followed by the opening of the assistant's reply."""
    ids = [t for m in messages for t in render_message(tokenizer, m["role"], m["content"])]
    special = tokenizer.special_ids
    return ids + [special["<|im_start|>"], *tokenizer.encode("assistant"), special["<|im_sep|>"]]


def visible_tokens(tokenizer: Tokenizer, tokens: Iterable[int], hide_thinking: bool):
    """Yield the tokens a reader sees: without `<think>…</think>` when hiding it, and
    without the closing `<|im_end|>`."""
    think, end_think = tokenizer.special_id("<think>"), tokenizer.special_id("</think>")
    end = tokenizer.special_id("<|im_end|>")
    thinking = False
    for token in tokens:
        if token == end:
            return
        if hide_thinking and token == think:
            thinking = True
        elif hide_thinking and token == end_think:
            thinking = False
        elif not thinking:
            yield token
