"""The chat templates by name, their control tokens and their Jinja texts.

What the tokenizer (its special tokens), the chat rendering (`jaxllm.chat`) and the Hugging
Face files (`tokenizer_config.json`'s `chat_template`) share. A leaf: it imports nothing of
jaxllm, so each of them can import it.
"""

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
