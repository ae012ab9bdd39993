"""Chat messages as tokens in the tokenizer's template, the SFT loss mask, and `<think>`.

A message is `<|im_start|>{role}<|im_sep|>{content}<|im_end|>` with roles `system`, `user`
and `assistant`; a prompt for generation ends with `<|im_start|>assistant<|im_sep|>`. With
`chat.template=chatml` (Qwen's format, for imported models trained on it) a message is
`<|im_start|>{role}\n{content}<|im_end|>\n` and a prompt ends with `<|im_start|>assistant\n`.
The template is the tokenizer's `chat_template`, fixed when it is loaded; the templates'
names, markers and Jinja texts live in `jaxllm.chat_templates`. The markers are the
tokenizer's special ids; roles and contents are encoded as plain text, so text that merely
contains a marker never becomes one. An assistant reply may open with `<think>…</think>`
(its reasoning) before the answer; in data, an assistant content that starts with the
literal text `<think>` and holds `</think>` is rendered with the two control tokens around
the reasoning.

`render_conversation` also returns the SFT loss mask: 1 on the tokens of assistant contents
(reasoning included) and on each assistant turn's closing `<|im_end|>`, so the model learns
to answer and to stop; 0 on system and user turns and on template tokens.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from jaxllm.chat_templates import IM_END, IM_SEP, IM_START, THINK_END, THINK_START
from jaxllm.tokenizer import Tokenizer

ROLES = ("system", "user", "assistant")


def split_thinking(content: str) -> tuple[str | None, str]:
    """(reasoning, answer) of an assistant content; reasoning is None without `<think>`."""
    if content.startswith(THINK_START) and THINK_END in content:
        thinking, _, answer = content[len(THINK_START) :].partition(THINK_END)
        return thinking, answer
    return None, content


def _content_ids(tokenizer: Tokenizer, role: str, content: str) -> list[int]:
    thinking, answer = split_thinking(content) if role == "assistant" else (None, content)
    if thinking is None:
        return tokenizer.encode(answer)
    return [
        tokenizer.special_id(THINK_START),
        *tokenizer.encode(thinking),
        tokenizer.special_id(THINK_END),
        *tokenizer.encode(answer),
    ]


def render_message_with_mask(
    tokenizer: Tokenizer, role: str, content: str, trained: bool
) -> tuple[list[int], list[int]]:
    """A message's ids and loss mask: its content and `<|im_end|>` marked when `trained`."""
    if role not in ROLES:
        raise ValueError(f"unknown role '{role}'; use one of {', '.join(ROLES)}")
    head = _message_head(tokenizer, role)
    body = [*_content_ids(tokenizer, role, content), tokenizer.special_id(IM_END)]
    tail = _message_tail(tokenizer)
    ids = head + body + tail
    return ids, [0] * len(head) + [int(trained)] * len(body) + [0] * len(tail)


def _message_tail(tokenizer: Tokenizer) -> list[int]:
    """The tokens after a message's `<|im_end|>`: chatml's newline, none in ours."""
    return tokenizer.encode("\n") if tokenizer.chat_template == "chatml" else []


def _message_head(tokenizer: Tokenizer, role: str) -> list[int]:
    """The tokens before a message's content: its opening marker and role."""
    start = tokenizer.special_id(IM_START)
    if tokenizer.chat_template == "chatml":
        return [start, *tokenizer.encode(f"{role}\n")]
    return [start, *tokenizer.encode(role), tokenizer.special_id(IM_SEP)]


def render_message(tokenizer: Tokenizer, role: str, content: str) -> list[int]:
    return render_message_with_mask(tokenizer, role, content, trained=False)[0]


def render_conversation(
    tokenizer: Tokenizer, messages: Sequence[dict[str, str]], train_on: str = "all"
) -> tuple[list[int], list[int]]:
    """(ids, loss_mask) of a whole conversation, training `all` assistant turns or the
    `last` one."""
    assistant_turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    trained_turns = set(assistant_turns if train_on == "all" else assistant_turns[-1:])
    ids: list[int] = []
    mask: list[int] = []
    for index, message in enumerate(messages):
        message_ids, message_mask = render_message_with_mask(
            tokenizer, message["role"], message["content"], index in trained_turns
        )
        ids += message_ids
        mask += message_mask
    return ids, mask


def render_reply(
    tokenizer: Tokenizer, messages: Sequence[dict[str, str]]
) -> tuple[list[int], list[int]]:
    """(ids, loss_mask) of a conversation whose last message is a reply being scored or
    compared, ending at that reply's `<|im_end|>`, as a sampled reply ends (chatml's newline
    after it left off): a reward model reads its score at the last id, in training and in
    RL alike."""
    ids, mask = render_conversation(tokenizer, messages)
    end = len(ids) - len(_message_tail(tokenizer))
    return ids[:end], mask[:end]


def render_for_generation(tokenizer: Tokenizer, messages: Sequence[dict[str, str]]) -> list[int]:
    """A conversation's ids followed by the opening of the assistant's reply."""
    ids = [t for m in messages for t in render_message(tokenizer, m["role"], m["content"])]
    return ids + _message_head(tokenizer, "assistant")


def visible_tokens(tokenizer: Tokenizer, tokens: Iterable[int], hide_thinking: bool):
    """Yield the tokens a reader sees: without `<think>…</think>` when hiding it, and
    without the closing `<|im_end|>`."""
    think, end_think = tokenizer.special_id(THINK_START), tokenizer.special_id(THINK_END)
    end = tokenizer.special_id(IM_END)
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


def reply_answer(tokenizer: Tokenizer, reply: Iterable[int]) -> str:
    """The answer text of a generated reply: after any `</think>`, up to `<|im_end|>`."""
    return tokenizer.decode(visible_tokens(tokenizer, reply, hide_thinking=True)).strip()
