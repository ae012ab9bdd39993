"""Chat messages as tokens in the tokenizer's template, the SFT loss mask, and `<think>`.

Two kinds of template, the tokenizer's `chat_template` (fixed when it is loaded):

- jaxllm's own (`jaxllm`, `chatml`), for models trained here. A message is
  `<|im_start|>{role}<|im_sep|>{content}<|im_end|>`; a prompt for generation ends with
  `<|im_start|>assistant<|im_sep|>`. With `chatml` (Qwen's format) a message is
  `<|im_start|>{role}\n{content}<|im_end|>\n` and a prompt ends with `<|im_start|>assistant\n`.
  The markers are the tokenizer's special ids; roles and contents are encoded as plain text,
  so text that merely contains a marker never becomes one. An assistant content that starts
  with the literal text `<think>` and holds `</think>` is rendered with the two control
  tokens around the reasoning. An assistant's OpenAI-style `tool_calls` are written after
  its content as Hermes blocks (`jaxllm.tools`), joined by newlines as Qwen's template
  joins them, so data holding calls in the field or in the text trains the same tokens;
  a `tool` message is a turn like any other (role `tool`, never trained).
- a model's own Jinja template (`JinjaChatTemplate`), rendered as transformers'
  `apply_chat_template` renders it, then encoded as its `tokenize=True` does (control-token
  strings in the text become their ids, no BOS/EOS added). Messages may carry `tool` roles,
  `tool_calls` and `reasoning_content`, as the template reads them.

`render_conversation` also returns the SFT loss mask: 1 on what each trained assistant turn
writes (reasoning included) up to and including its stop token, so the model learns to
answer and to stop; 0 on system, user and tool turns and on template text. For a Jinja
template the assistant's text is what its `{% generation %}` blocks mark (character spans
-> tokens through the encoding's offsets, as transformers' `return_assistant_tokens_mask`),
else what each assistant message adds when the conversation is rendered prefix by prefix
(messages[:i] with the generation prompt, then messages[:i+1]), cut after its last stop
token; a template whose renderings do not extend each other cannot give masks (DataError).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from jaxllm.chat_templates import (
    IM_END,
    IM_SEP,
    IM_START,
    THINK_END,
    THINK_START,
    JinjaChatTemplate,
)
from jaxllm.errors import DataError
from jaxllm.tokenizer import Tokenizer
from jaxllm.tools import hermes_blocks

ROLES = ("system", "user", "assistant", "tool")

Message = Mapping[str, Any]


def split_thinking(content: str) -> tuple[str | None, str]:
    """(reasoning, answer) of an assistant content; reasoning is None without `<think>`."""
    if content.startswith(THINK_START) and THINK_END in content:
        thinking, _, answer = content[len(THINK_START) :].partition(THINK_END)
        return thinking, answer
    return None, content


def message_text(message: Message) -> str:
    """The text jaxllm's templates write for a message: its content, then one `<tool_call>`
    block per entry of its `tool_calls` field (joined by newlines)."""
    parts = [message["content"]] if message["content"] else []
    return "\n".join(parts + hermes_blocks(message.get("tool_calls") or []))


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
    """A message's ids and loss mask in jaxllm's template: its content and `<|im_end|>`
    marked when `trained`."""
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


def _jinja(tokenizer: Tokenizer) -> JinjaChatTemplate | None:
    template = tokenizer.chat_template
    return template if isinstance(template, JinjaChatTemplate) else None


def _rendered(
    template: JinjaChatTemplate,
    messages: Sequence[Message],
    add_generation_prompt: bool,
    tools: Sequence[Mapping[str, Any]] | None = None,
) -> tuple[str, list[tuple[int, int]]]:
    """`template.render`, its errors (the template's `raise_exception` too) as DataError."""
    import jinja2

    try:
        return template.render(messages, add_generation_prompt, tools or None)
    except jinja2.TemplateError as error:
        raise DataError(f"chat template {template.origin}: {error}") from None


def _span_mask(offsets: Sequence[tuple[int, int]], spans: Sequence[tuple[int, int]]) -> list[int]:
    """1 on each token whose characters overlap a span (spans in order), as transformers'
    `return_assistant_tokens_mask` marks them."""
    mask = [0] * len(offsets)
    span_index = 0
    for index, (start, end) in enumerate(offsets):
        while span_index < len(spans) and start >= spans[span_index][1]:
            span_index += 1
        if span_index == len(spans):
            break
        if end > spans[span_index][0]:
            mask[index] = 1
    return mask


def _assistant_spans(template: JinjaChatTemplate, messages: Sequence[Message], text: str):
    """Per assistant message, the characters of `text` (the whole conversation rendered)
    that it adds: what rendering messages[:i+1] adds to messages[:i] with the generation
    prompt. DataError when a rendering is not a prefix of the next."""
    spans = []
    for index, message in enumerate(messages):
        if message.get("role") != "assistant":
            continue
        prompt, _ = _rendered(template, messages[:index], add_generation_prompt=True)
        turn, _ = _rendered(template, messages[: index + 1], add_generation_prompt=False)
        if not (turn.startswith(prompt) and text.startswith(turn)):
            raise DataError(
                f"chat template {template.origin} is not prefix-stable: the conversation "
                f"rendered up to message {index} (assistant) is not how the whole conversation "
                "begins, so the assistant's tokens cannot be told apart; use a template with "
                "{% generation %} blocks (chat.template=PATH.jinja)"
            )
        spans.append((len(prompt), len(turn)))
    return spans


def _cut_after_stop(ids: Sequence[int], mask: list[int], stops: set[int], span) -> None:
    """Unmark the tokens of `span` (a token range) after its last stop token."""
    start, end = span
    last_stop = next((i for i in range(end - 1, start - 1, -1) if ids[i] in stops), None)
    if last_stop is not None:
        mask[last_stop + 1 : end] = [0] * (end - last_stop - 1)


def _jinja_conversation(
    tokenizer: Tokenizer, template: JinjaChatTemplate, messages: Sequence[Message], train_on: str
) -> tuple[list[int], list[int]]:
    text, generation_spans = _rendered(template, messages, add_generation_prompt=False)
    ids, offsets = tokenizer.encode_chat_text(text)
    if template.marks_generation:
        spans = generation_spans
    else:
        spans = _assistant_spans(template, messages, text)
    if train_on == "last":
        spans = spans[-1:]
    masks = [_span_mask(offsets, [span]) for span in spans]
    mask = [int(any(column)) for column in zip(*masks, strict=True)] if masks else [0] * len(ids)
    if not template.marks_generation:
        stops = set(tokenizer.stop_ids)
        for span_mask in masks:
            marked = [i for i, on in enumerate(span_mask) if on]
            if marked:
                _cut_after_stop(ids, mask, stops, (marked[0], marked[-1] + 1))
    return ids, mask


def render_conversation(
    tokenizer: Tokenizer, messages: Sequence[Message], train_on: str = "all"
) -> tuple[list[int], list[int]]:
    """(ids, loss_mask) of a whole conversation, training `all` assistant turns or the
    `last` one."""
    template = _jinja(tokenizer)
    if template is not None:
        return _jinja_conversation(tokenizer, template, messages, train_on)
    assistant_turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    trained_turns = set(assistant_turns if train_on == "all" else assistant_turns[-1:])
    ids: list[int] = []
    mask: list[int] = []
    for index, message in enumerate(messages):
        message_ids, message_mask = render_message_with_mask(
            tokenizer, message["role"], message_text(message), index in trained_turns
        )
        ids += message_ids
        mask += message_mask
    return ids, mask


def render_reply(tokenizer: Tokenizer, messages: Sequence[Message]) -> tuple[list[int], list[int]]:
    """(ids, loss_mask) of a conversation whose last message is a reply being scored or
    compared, ending at that reply's stop token, as a sampled reply ends (what a template
    writes after it left off): a reward model reads its score at the last id, in training
    and in RL alike."""
    template = _jinja(tokenizer)
    if template is None:
        ids, mask = render_conversation(tokenizer, messages)
        end = len(ids) - len(_message_tail(tokenizer))
        return ids[:end], mask[:end]
    prompt, _ = _rendered(template, messages[:-1], add_generation_prompt=True)
    text, _ = _rendered(template, messages, add_generation_prompt=False)
    if not text.startswith(prompt):
        raise DataError(
            f"chat template {template.origin} is not prefix-stable: the conversation rendered "
            f"up to message {len(messages) - 1} is not how the whole conversation begins"
        )
    ids, offsets = tokenizer.encode_chat_text(text)
    mask = _span_mask(offsets, [(len(prompt), len(text))])
    marked = [i for i, on in enumerate(mask) if on]
    stops = set(tokenizer.stop_ids)
    end = next((i + 1 for i in reversed(marked) if ids[i] in stops), len(ids))
    return ids[:end], mask[:end]


def render_for_generation(
    tokenizer: Tokenizer,
    messages: Sequence[Message],
    tools: Sequence[Mapping[str, Any]] | None = None,
) -> list[int]:
    """A conversation's ids followed by the opening of the assistant's reply. `tools` (the
    schemas of `jaxllm.tools.tool_schemas`) reach a model's own Jinja template, which
    describes them as it was trained to (Qwen3: in the system turn); jaxllm's templates
    write no tool list: a model trained here learns its tools from its SFT data."""
    template = _jinja(tokenizer)
    if template is not None:
        text, _ = _rendered(template, messages, add_generation_prompt=True, tools=tools)
        return tokenizer.encode_chat_text(text)[0]
    ids = [t for m in messages for t in render_message(tokenizer, m["role"], message_text(m))]
    return ids + _message_head(tokenizer, "assistant")


def visible_tokens(tokenizer: Tokenizer, tokens: Iterable[int], hide_thinking: bool):
    """Yield the tokens a reader sees: without `<think>…</think>` when hiding it (and the
    tokenizer has them), and without the closing stop token."""
    think_ids = tokenizer.think_ids() if hide_thinking else None
    think, end_think = think_ids if think_ids is not None else (None, None)
    stops = set(tokenizer.stop_ids)
    thinking = False
    for token in tokens:
        if token in stops:
            return
        if token == think:
            thinking = True
        elif token == end_think:
            thinking = False
        elif not thinking:
            yield token


def reply_answer(tokenizer: Tokenizer, reply: Iterable[int]) -> str:
    """The answer text of a generated reply: after any `</think>`, up to its stop token."""
    visible = visible_tokens(tokenizer, reply, hide_thinking=True)
    return tokenizer.decode(visible, skip_special_tokens=True).strip()


def render_tool_results(
    tokenizer: Tokenizer,
    messages: Sequence[Message],
    results: Sequence[Message],
    tools: Sequence[Mapping[str, Any]] | None = None,
) -> list[int]:
    """The ids that follow an assistant turn which ended at its stop token and called
    tools: the rest of that turn's template text, the `tool` messages `results`, and the
    opening of the next assistant turn. `messages` is the conversation up to and including
    that assistant turn.

    In jaxllm's templates these are the message tail, each result as a message and the
    assistant header. With a model's own Jinja template, they are what follows that turn's
    stop token when `messages + results` is rendered with the generation prompt (Qwen3
    writes a result as a user turn inside `<tool_response>`). The turn's stop token is
    found by counting: rendered alone, the conversation holds k stop-token texts up to
    that turn's; the results follow the k-th of the longer rendering (a template may
    render a last assistant turn differently from an earlier one, as Qwen3 adds an empty
    `<think>` block to a last turn without reasoning). DataError when there is none."""
    template = _jinja(tokenizer)
    if template is None:
        ids = _message_tail(tokenizer)
        for result in results:
            ids = ids + render_message(tokenizer, result["role"], result["content"])
        return ids + _message_head(tokenizer, "assistant")
    before, _ = _rendered(template, messages, add_generation_prompt=False, tools=tools)
    after, _ = _rendered(template, [*messages, *results], add_generation_prompt=True, tools=tools)
    stop_texts = [tokenizer.decode([t], skip_special_tokens=False) for t in tokenizer.stop_ids]
    found = [(before.rfind(text), text) for text in stop_texts if text and text in before]
    if found:
        _, stop = max(found)
        count = before.count(stop)
        end = -1
        for _ in range(count):
            end = after.find(stop, end + 1)
            if end < 0:
                break
        if end >= 0:
            return tokenizer.encode_chat_text(after[end + len(stop) :])[0]
    raise DataError(
        f"chat template {template.origin} renders no stop token after the assistant's turn, "
        "so the tool results that follow it cannot be told apart; use a template that ends "
        "each turn with one of the tokenizer's stop tokens"
    )
