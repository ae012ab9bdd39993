# ruff: noqa: E501 (the templates keep the published line breaks)
"""A model's own Jinja chat template: ids equal transformers' `apply_chat_template` for
templates written like the published Llama 3.2, Qwen2.5, Qwen3 and Gemma 3 ones, with and
without the generation prompt, system prompts, tools, tool messages and Qwen3's thinking
switch; SFT masks equal `return_assistant_tokens_mask` where a template marks
`{% generation %}`, and are each assistant's own tokens up to its stop token where it
does not; a template that cannot give masks is one error line."""

import json

import pytest

pytest.importorskip("transformers")
import tokenizers  # noqa: E402
from tokenizers import decoders, models, pre_tokenizers, processors, trainers  # noqa: E402
from transformers import AutoTokenizer, PreTrainedTokenizerFast  # noqa: E402

from jaxllm.chat import (  # noqa: E402
    render_conversation,
    render_for_generation,
    render_reply,
    render_tool_results,
    reply_answer,
    visible_tokens,
)
from jaxllm.config import Config  # noqa: E402
from jaxllm.errors import DataError  # noqa: E402
from jaxllm.hf.tokenizer import HFTokenizer  # noqa: E402
from jaxllm.stages.common import load_configured_tokenizer  # noqa: E402

LLAMA3_TEMPLATE = """{{- bos_token }}
{%- if custom_tools is defined %}
    {%- set tools = custom_tools %}
{%- endif %}
{%- if not tools_in_user_message is defined %}
    {%- set tools_in_user_message = true %}
{%- endif %}
{%- if not date_string is defined %}
    {%- if strftime_now is defined %}
        {%- set date_string = strftime_now("%d %b %Y") %}
    {%- else %}
        {%- set date_string = "26 Jul 2024" %}
    {%- endif %}
{%- endif %}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}

{#- This block extracts the system message, so we can slot it into the right place. #}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}

{#- System message #}
{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}
{%- if tools is not none %}
    {{- "Environment: ipython\\n" }}
{%- endif %}
{{- "Cutting Knowledge Date: December 2023\\n" }}
{{- "Today Date: " + date_string + "\\n\\n" }}
{{- system_message }}
{{- "<|eot_id|>" }}

{#- Custom tools are passed in a user message with some extra guidance #}
{%- if tools_in_user_message and not tools is none %}
    {%- if messages | length != 0 %}
        {%- set first_user_message = messages[0]['content']|trim %}
        {%- set messages = messages[1:] %}
    {%- else %}
        {{- raise_exception("Cannot put tools in the first user message when there's no first user message!") }}
    {%- endif %}
    {{- '<|start_header_id|>user<|end_header_id|>\\n\\n' -}}
    {{- "Given the following functions, please respond with a JSON for a function call " }}
    {{- "with its proper arguments that best answers the given prompt.\\n\\n" }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\\n\\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\\n\\n" }}
    {%- endfor %}
    {{- first_user_message + "<|eot_id|>"}}
{%- endif %}

{%- for message in messages %}
    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}
        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' }}
    {%- elif 'tool_calls' in message %}
        {%- if not message.tool_calls|length == 1 %}
            {{- raise_exception("This model only supports single tool-calls at once!") }}
        {%- endif %}
        {%- set tool_call = message.tool_calls[0].function %}
        {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}
        {{- '{"name": "' + tool_call.name + '", ' }}
        {{- '"parameters": ' }}
        {{- tool_call.arguments | tojson }}
        {{- "}" }}
        {{- "<|eot_id|>" }}
    {%- elif message.role == "tool" or message.role == "ipython" %}
        {{- "<|start_header_id|>ipython<|end_header_id|>\\n\\n" }}
        {%- if message.content is mapping or message.content is iterable %}
            {{- message.content | tojson }}
        {%- else %}
            {{- message.content }}
        {%- endif %}
        {{- "<|eot_id|>" }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""

QWEN25_TEMPLATE = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\\n<tool_call>\\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- message.content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""

QWEN3_TEMPLATE = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0].role == 'system' %}
        {{- messages[0].content + '\\n\\n' }}
    {%- endif %}
    {{- "# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0].role == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == "user" and message.content is string and not(message.content.startswith('<tool_response>') and message.content.endswith('</tool_response>')) %}
        {%- set ns.multi_step_tool = false %}
        {%- set ns.last_query_index = index %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if message.content is string %}
        {%- set content = message.content %}
    {%- else %}
        {%- set content = '' %}
    {%- endif %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {%- set reasoning_content = '' %}
        {%- if message.reasoning_content is string %}
            {%- set reasoning_content = message.reasoning_content %}
        {%- else %}
            {%- if '</think>' in content %}
                {%- set reasoning_content = content.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') %}
                {%- set content = content.split('</think>')[-1].lstrip('\\n') %}
            {%- endif %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query_index %}
            {%- if loop.last or (not loop.last and reasoning_content) %}
                {{- '<|im_start|>' + message.role + '\\n<think>\\n' + reasoning_content.strip('\\n') + '\\n</think>\\n\\n' + content.lstrip('\\n') }}
            {%- else %}
                {{- '<|im_start|>' + message.role + '\\n' + content }}
            {%- endif %}
        {%- else %}
            {{- '<|im_start|>' + message.role + '\\n' + content }}
        {%- endif %}
        {%- if message.tool_calls %}
            {%- for tool_call in message.tool_calls %}
                {%- if (loop.first and content) or (not loop.first) %}
                    {{- '\\n' }}
                {%- endif %}
                {%- if tool_call.function %}
                    {%- set tool_call = tool_call.function %}
                {%- endif %}
                {{- '<tool_call>\\n{"name": "' }}
                {{- tool_call.name }}
                {{- '", "arguments": ' }}
                {%- if tool_call.arguments is string %}
                    {{- tool_call.arguments }}
                {%- else %}
                    {{- tool_call.arguments | tojson }}
                {%- endif %}
                {{- '}\\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\\n\\n</think>\\n\\n' }}
    {%- endif %}
{%- endif %}"""

GEMMA3_TEMPLATE = """{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- if messages[0]['content'] is string -%}
        {%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}
    {%- else -%}
        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\\n\\n' -%}
    {%- endif -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else "") }}
    {%- if message['content'] is string -%}
        {{ message['content'] | trim }}
    {%- elif message['content'] is iterable -%}
        {%- for item in message['content'] -%}
            {%- if item['type'] == 'image' -%}
                {{ '<start_of_image>' }}
            {%- elif item['type'] == 'text' -%}
                {{ item['text'] | trim }}
            {%- endif -%}
        {%- endfor -%}
    {%- else -%}
        {{ raise_exception("Invalid content type") }}
    {%- endif -%}
    {{ '<end_of_turn>\\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{'<start_of_turn>model\\n'}}
{%- endif -%}
"""

# ChatML with the assistant's text marked, as templates written for training mark it.
MARKED_CHATML_TEMPLATE = """{%- for message in messages %}
    {{- '<|im_start|>' + message.role + '\\n' }}
    {%- if message.role == 'assistant' %}
        {%- generation %}
            {{- message.content + '<|im_end|>' }}
        {%- endgeneration %}
        {{- '\\n' }}
    {%- else %}
        {{- message.content + '<|im_end|>\\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}"""

# Writes the last message otherwise than the others: no prefix gives the next rendering.
UNSTABLE_TEMPLATE = """{%- for message in messages %}
    {{- ('FINAL ' if loop.last else '') + message.role + ': ' + message.content + '<|im_end|>\\n' }}
{%- endfor %}
{%- if add_generation_prompt %}{{- 'assistant: ' }}{%- endif %}"""

FAMILIES = {
    "llama3": (
        LLAMA3_TEMPLATE,
        ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
         "<|eom_id|>", "<|eot_id|>", "<|python_tag|>"],
        {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"},
        ["<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"],
    ),
    "qwen2_5": (
        QWEN25_TEMPLATE,
        ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<tool_call>", "</tool_call>"],
        {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"},
        ["<|im_end|>", "<|endoftext|>"],
    ),
    "qwen3": (
        QWEN3_TEMPLATE,
        ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<tool_call>", "</tool_call>",
         "<tool_response>", "</tool_response>", "<think>", "</think>"],
        {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"},
        ["<|im_end|>", "<|endoftext|>"],
    ),
    "gemma3": (
        GEMMA3_TEMPLATE,
        ["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>", "<start_of_image>"],
        {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>"},
        ["<eos>", "<end_of_turn>"],
    ),
    "marked_chatml": (
        MARKED_CHATML_TEMPLATE,
        ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        {"eos_token": "<|im_end|>"},
        ["<|im_end|>"],
    ),
    "unstable": (UNSTABLE_TEMPLATE, ["<|im_end|>"], {"eos_token": "<|im_end|>"}, ["<|im_end|>"]),
}  # fmt: skip

CORPUS = [
    "You are a helpful assistant. What is 2 + 2? Sure, it is 4. Today Date: 26 Jul 2024",
    "user assistant system model tool ipython function arguments name parameters json",
    "The weather in Paris is sunny, 23 degrees. 東京 🤖 numbers 12345.",
] * 10


def model_folder(tmp_path, family: str):
    """A save_pretrained tokenizer folder of `family`: a small byte-level BPE with the
    family's control tokens, its template in chat_template.jinja, its eos ids."""
    template, specials, names, stops = FAMILIES[family]
    backend = tokenizers.Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=420,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    backend.train_from_iterator(CORPUS, trainer)
    if "bos_token" in names:
        bos = names["bos_token"]
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 $B:1", special_tokens=[(bos, 0)]
        )
    folder = tmp_path / family
    fast = PreTrainedTokenizerFast(tokenizer_object=backend, **names)
    fast.chat_template = template
    fast.save_pretrained(folder)
    stop_ids = [backend.token_to_id(token) for token in stops]
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": stop_ids}))
    return folder


TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The weather in a city, 天气",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
]
SIMPLE = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What is 2 + 2?"},
    {"role": "assistant", "content": "Sure, it is 4."},
    {"role": "user", "content": "And 東京 🤖?"},
]
NO_SYSTEM = SIMPLE[1:]
TOOL_USE = [
    {"role": "user", "content": "What is the weather in Paris?"},
    {
        "role": "assistant",
        "content": "",
        "tool_calls": [
            {
                "type": "function",
                "function": {"name": "get_weather", "arguments": {"city": "Paris"}},
            }
        ],
    },
    {"role": "tool", "content": "sunny, 23 degrees"},
]
THINKING = [
    {"role": "user", "content": "What is 2 + 2?"},
    {"role": "assistant", "content": "It is 4.", "reasoning_content": "2 + 2 = 4"},
    {"role": "user", "content": "And 3 + 3?"},
]

CASES = [
    ("llama3", SIMPLE, None, {}),
    ("llama3", TOOL_USE, TOOLS, {}),
    ("qwen2_5", NO_SYSTEM, None, {}),  # the default system prompt
    ("qwen2_5", TOOL_USE, TOOLS, {}),
    ("qwen3", THINKING, None, {}),
    ("qwen3", THINKING, None, {"enable_thinking": False}),
    ("qwen3", THINKING, None, {"enable_thinking": True}),
    ("qwen3", [{"role": "system", "content": "Be brief."}, *TOOL_USE], TOOLS, {}),
    ("gemma3", SIMPLE, None, {}),
]


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("family, messages, tools, variables", CASES)
def test_ids_equal_apply_chat_template(
    tmp_path, family, messages, tools, variables, add_generation_prompt
):
    folder = model_folder(tmp_path, family)
    reference = AutoTokenizer.from_pretrained(folder)
    ours = HFTokenizer(folder, enable_thinking=variables.get("enable_thinking"))
    expected = reference.apply_chat_template(
        messages, tools=tools, add_generation_prompt=add_generation_prompt, **variables
    )["input_ids"]
    template = ours.chat_template
    text, _ = template.render(messages, add_generation_prompt, tools)
    assert ours.encode_chat_text(text)[0] == expected
    if tools is None and add_generation_prompt:
        assert render_for_generation(ours, messages) == expected
    elif tools is None and family != "qwen3":  # Qwen3's drops earlier turns' thinking
        assert render_conversation(ours, messages)[0] == expected


def test_qwen3_thinking_switch_from_the_config(tmp_path):
    folder = model_folder(tmp_path, "qwen3")
    cfg = Config()
    cfg.data.tokenizer, cfg.chat.template, cfg.chat.enable_thinking = str(folder), "model", False
    cfg.model.vocab_size = 512
    tokenizer = load_configured_tokenizer(cfg)
    prompt = tokenizer.decode(render_for_generation(tokenizer, THINKING))
    assert prompt.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")


def test_qwen3_masks_a_single_turn_and_refuses_earlier_thinking_turns(tmp_path):
    tokenizer = HFTokenizer(model_folder(tmp_path, "qwen3"))
    ids, mask = render_conversation(tokenizer, THINKING[:2])
    trained = tokenizer.decode(t for t, on in zip(ids, mask, strict=True) if on)
    assert trained == "<think>\n2 + 2 = 4\n</think>\n\nIt is 4.<|im_end|>"
    # Rendered last, a reply keeps its thinking; followed by a user turn, it loses it.
    with pytest.raises(DataError, match=r"up to message 1 \(assistant\) is not how"):
        render_conversation(tokenizer, [*THINKING, {"role": "assistant", "content": "6"}])


def test_generation_block_masks_equal_transformers(tmp_path):
    folder = model_folder(tmp_path, "marked_chatml")
    reference = AutoTokenizer.from_pretrained(folder)
    conversation = [*SIMPLE, {"role": "assistant", "content": "Eight, 東京."}]
    expected = reference.apply_chat_template(
        conversation, return_assistant_tokens_mask=True, return_dict=True
    )
    ids, mask = render_conversation(HFTokenizer(folder), conversation)
    assert ids == expected["input_ids"]
    assert mask == expected["assistant_masks"]
    assert sum(mask) > 0


@pytest.mark.parametrize(
    "family, end",
    [("qwen2_5", "<|im_end|>"), ("llama3", "<|eot_id|>"), ("gemma3", "<end_of_turn>")],
)
def test_prefix_masks_are_each_assistant_reply_through_its_stop_token(tmp_path, family, end):
    tokenizer = HFTokenizer(model_folder(tmp_path, family))
    conversation = [*NO_SYSTEM, {"role": "assistant", "content": "Eight."}]
    ids, mask = render_conversation(tokenizer, conversation)
    marked = [token if on else None for token, on in zip(ids, mask, strict=True)]
    runs, run = [], []
    for token in [*marked, None]:
        if token is None and run:
            runs.append(tokenizer.decode(run))
            run = []
        elif token is not None:
            run.append(token)
    assert runs == [f"Sure, it is 4.{end}", f"Eight.{end}"]
    last_only = render_conversation(tokenizer, conversation, train_on="last")[1]
    assert tokenizer.decode(t for t, on in zip(ids, last_only, strict=True) if on) == f"Eight.{end}"


def test_render_reply_ends_at_the_replys_stop_token(tmp_path):
    tokenizer = HFTokenizer(model_folder(tmp_path, "qwen2_5"))
    conversation = [*NO_SYSTEM, {"role": "assistant", "content": "Eight."}]
    ids, mask = render_reply(tokenizer, conversation)
    im_end = tokenizer.special_id("<|im_end|>")
    prompt = render_for_generation(tokenizer, conversation[:-1])
    assert ids == [*prompt, *tokenizer.encode("Eight."), im_end]  # no newline after it
    assert mask == [0] * len(prompt) + [1] * (len(ids) - len(prompt))


def test_a_template_that_is_not_prefix_stable_is_one_error_line(tmp_path):
    tokenizer = HFTokenizer(model_folder(tmp_path, "unstable"))
    with pytest.raises(DataError) as caught:
        render_conversation(tokenizer, [*NO_SYSTEM, {"role": "assistant", "content": "8"}])
    message = str(caught.value)
    assert "not prefix-stable" in message and "message 1 (assistant)" in message
    assert str(tmp_path / "unstable" / "chat_template.jinja") in message
    assert "\n" not in message


def test_a_templates_own_exception_is_one_error_line(tmp_path):
    tokenizer = HFTokenizer(model_folder(tmp_path, "gemma3"))
    with pytest.raises(DataError, match="Conversation roles must alternate") as caught:
        render_for_generation(tokenizer, [{"role": "assistant", "content": "hi"}])
    assert "\n" not in str(caught.value)


def test_a_jinja_file_replaces_the_folders_template(tmp_path):
    folder = model_folder(tmp_path, "qwen2_5")
    path = tmp_path / "plain.jinja"
    path.write_text("{% for m in messages %}{{ m.content }}<|im_end|>{% endfor %}")
    tokenizer = HFTokenizer(folder, chat_template=str(path))
    ids = render_for_generation(tokenizer, NO_SYSTEM[:1])
    assert ids == [*tokenizer.encode("What is 2 + 2?"), tokenizer.special_id("<|im_end|>")]


def test_a_qwen3_reply_shows_its_answer_without_the_thinking(tmp_path):
    tokenizer = HFTokenizer(model_folder(tmp_path, "qwen3"))
    reply = tokenizer.encode("<think>\n2 + 2 = 4\n</think>\n\nIt is 4.<|im_end|>")
    assert reply_answer(tokenizer, reply) == "It is 4."
    shown = tokenizer.decode(visible_tokens(tokenizer, reply, hide_thinking=False))
    assert shown == "<think>\n2 + 2 = 4\n</think>\n\nIt is 4."


def test_rewards_on_a_model_without_think_tokens(tmp_path):
    """Llama 3 has no <think>: answers are whole replies, a weighted format reward is
    refused up front, and the format metric is 0 rather than an error."""
    from jaxllm.rl.rewards import final_answer, format_ok, make_rewards

    tokenizer = HFTokenizer(model_folder(tmp_path, "llama3"))
    assert tokenizer.think_ids() is None
    reply = tokenizer.encode(" 42<|eot_id|>")
    assert final_answer(tokenizer, reply) == "42"
    assert not format_ok(tokenizer, reply)
    assert list(make_rewards({"correct": 1.0}, tokenizer, 8, 0)) == ["correct"]
    # weighted 0 (grpo.rewards.format=0, since overrides merge into the default weights)
    assert list(make_rewards({"correct": 1.0, "format": 0.0}, tokenizer, 8, 0)) == [
        "correct",
        "format",
    ]
    with pytest.raises(DataError, match=r"has no <think> token \(the reasoning format"):
        make_rewards({"correct": 1.0, "format": 0.1}, tokenizer, 8, 0)


@pytest.mark.parametrize("family", ["qwen2_5", "qwen3"])
def test_an_episode_with_a_tool_result_is_the_ids_of_apply_chat_template(tmp_path, family):
    """A multi-turn rollout's prompt, the call the model wrote, then what
    `render_tool_results` appends: the ids transformers gives the whole conversation
    (Qwen3 writes the result inside <tool_response> and adds no empty <think> block to the
    earlier turn)."""
    folder = model_folder(tmp_path, family)
    reference = AutoTokenizer.from_pretrained(folder)
    ours = HFTokenizer(folder)
    prompt = TOOL_USE[:1]
    call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    turn = {"role": "assistant", "content": call}
    result = {"role": "tool", "content": "sunny, 23 degrees"}
    written = ours.encode_chat_text(call + "<|im_end|>")[0]
    episode = (
        render_for_generation(ours, prompt, TOOLS)
        + written
        + render_tool_results(ours, [*prompt, turn], [result], TOOLS)
    )
    expected = reference.apply_chat_template(
        [*prompt, turn, result], tools=TOOLS, add_generation_prompt=True
    )["input_ids"]
    assert episode == expected
    assert "<tool_response>" in ours.decode(episode) or family == "qwen2_5"
