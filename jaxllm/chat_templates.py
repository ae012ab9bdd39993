"""The chat templates by name, their control tokens and their Jinja texts; a model's own
Jinja template, rendered as transformers' `apply_chat_template` renders it.

What the tokenizer (its special tokens), the chat rendering (`jaxllm.chat`) and the Hugging
Face files (`tokenizer_config.json`'s `chat_template`) share. A leaf: it imports nothing of
jaxllm, so each of them can import it.

A `JinjaChatTemplate` renders in the environment transformers builds (a sandbox that cannot
change the data it is given, `trim_blocks`, `lstrip_blocks`, `loopcontrols`, and the globals
`raise_exception`, `strftime_now`, `namespace`, `dict`, the `tojson` filter that keeps
non-ASCII and takes `indent`/`separators`/`sort_keys`), with the variables `messages`,
`tools`, `documents`, `add_generation_prompt`, the tokenizer's named special tokens
(`bos_token`, `eos_token`, ...) and `enable_thinking` when set. A `{% generation %}` block
marks text the assistant writes; rendering reports its character spans.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from datetime import datetime
from functools import cached_property, lru_cache
from typing import Any

IM_START = "<|im_start|>"  # a message begins, then its role
IM_SEP = "<|im_sep|>"  # between role and content (the `jaxllm` template)
IM_END = "<|im_end|>"  # a message ends
THINK_START = "<think>"  # reasoning starts
THINK_END = "</think>"  # reasoning ends
CHAT_TOKENS = (IM_START, IM_SEP, IM_END, THINK_START, THINK_END)

# `jaxllm`: <|im_start|>{role}<|im_sep|>{content}<|im_end|>; `chatml` (Qwen's, for models
# trained on it): <|im_start|>{role}\n{content}<|im_end|>\n.
CHAT_TEMPLATES = ("jaxllm", "chatml")

# The same templates in Jinja, for `tokenizer_config.json` (transformers'
# `apply_chat_template` gives the ids `jaxllm.chat.render_for_generation` does).
JINJA_TEMPLATES = {
    "jaxllm": "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '<|im_sep|>' + m['content']"
    " + '<|im_end|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant<|im_sep|>' }}{% endif %}",
    "chatml": "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content']"
    " + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}",
}

# `chat.template` values besides `CHAT_TEMPLATES`: the model folder's own Jinja template; a
# path ending in `JINJA_SUFFIX` names a template file.
MODEL_TEMPLATE = "model"
JINJA_SUFFIX = ".jinja"

# Names of the message fields a reply's reasoning may come under; templates read the first.
REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")

_GENERATION_BLOCK = re.compile(r"\{%-?\s*generation\s*-?%\}")


@dataclass(frozen=True)
class JinjaChatTemplate:
    """A model's own chat template and what it is rendered with.

    `origin` says where it came from (a file, for error messages); `special_tokens` are the
    tokenizer's named special tokens (`bos_token` -> `<s>`), visible to the template;
    `enable_thinking` is passed to it when not None (Qwen3's switch).
    """

    origin: str
    source: str
    special_tokens: Mapping[str, str] = field(default_factory=dict)
    enable_thinking: bool | None = None

    @cached_property
    def marks_generation(self) -> bool:
        """Whether the template marks the assistant's text with `{% generation %}`."""
        return bool(_GENERATION_BLOCK.search(self.source))

    def render(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = False,
        tools: Sequence[Mapping[str, Any]] | None = None,
    ) -> tuple[str, list[tuple[int, int]]]:
        """(text, generation spans): the rendered conversation and the character spans
        `[start, end)` of its `{% generation %}` blocks, in order.

        Raises jinja2's `TemplateError` (the template's own `raise_exception` included).
        """
        variables: dict[str, Any] = {**self.special_tokens}
        if self.enable_thinking is not None:
            variables["enable_thinking"] = self.enable_thinking
        template = _compiled(self.source)
        blocks: list[str] = []
        spans: list[tuple[int, int]] = []
        with template.environment.tracking_generation(blocks, spans):
            for block in template.generate(
                messages=[_with_reasoning_aliases(m) for m in _plain(list(messages))],
                tools=_plain(list(tools)) if tools is not None else None,
                documents=None,
                add_generation_prompt=add_generation_prompt,
                **variables,
            ):
                blocks.append(block)
        return "".join(blocks), spans


def _plain(value: Any) -> Any:
    """`value` rebuilt from plain JSON types (what a sandboxed template may see), without
    message keys whose value is None (templates test for a key, not for None)."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items() if v is not None}
    if isinstance(value, list | tuple):
        return [_plain(item) for item in value]
    return value


def _with_reasoning_aliases(message: dict) -> dict:
    """The message with its reasoning (under any of `REASONING_FIELDS`) also under
    `thinking` and `reasoning_content`, as transformers passes it."""
    reasoning = next((message[k] for k in REASONING_FIELDS if message.get(k) is not None), None)
    if reasoning is None:
        return message
    return {"thinking": reasoning, **message, "reasoning_content": reasoning}


@lru_cache(maxsize=16)
def _compiled(source: str):
    """`source` compiled in transformers' chat-template environment."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationBlocks(jinja2.ext.Extension):
        """`{% generation %}...{% endgeneration %}`: the text as is, its span recorded."""

        tags = {"generation"}

        def __init__(self, environment):
            super().__init__(environment)
            self._tracking: ContextVar = ContextVar("generation_spans", default=None)
            environment.extend(tracking_generation=self.tracking)

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
            call = self.call_method("_record", [], [])
            return jinja2.nodes.CallBlock(call, [], [], body).set_lineno(lineno)

        def _record(self, caller) -> str:
            text = caller()
            tracking = self._tracking.get()
            if tracking is not None:
                blocks, spans = tracking
                start = len("".join(blocks))
                spans.append((start, start + len(text)))
            return text

        @contextmanager
        def tracking(self, blocks: list[str], spans: list[tuple[int, int]]):
            token = self._tracking.set((blocks, spans))
            try:
                yield
            finally:
                self._tracking.reset(token)

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(
            value,
            ensure_ascii=ensure_ascii,
            indent=indent,
            separators=separators,
            sort_keys=sort_keys,
        )

    environment = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[GenerationBlocks, jinja2.ext.loopcontrols]
    )
    environment.filters["tojson"] = tojson
    environment.globals["raise_exception"] = raise_exception
    environment.globals["strftime_now"] = lambda format: datetime.now().strftime(format)
    environment.globals["dict"] = dict
    return environment.from_string(source)
