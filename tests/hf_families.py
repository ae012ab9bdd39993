"""Hugging Face folders like the published ones of each family, built offline for tests.

`family_folder(path, family)` writes what `save_pretrained` leaves for a model of that
family: a random model (small, with the real config's ratios: grouped-query attention,
head_dim, Gemma 3's sliding pattern, experts), a `tokenizer.json` trained here in the
family's style (byte-level BPE for Llama 3 and Qwen; sentencepiece-style BPE with byte
fallback for Gemma), its special tokens and BOS convention, a chat template in the style of
the published one, and `generation_config.json` with the family's eos ids.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import transformers
from tokenizers import (
    Regex,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
)
from tokenizers.trainers import BpeTrainer

# Close to the published templates: Llama 3.x's system header with its dates, Qwen2.5's
# default system prompt, Qwen3's thinking switch and tool responses, Gemma 3's `model`
# role and system text in the first user turn.
LLAMA3_TEMPLATE = (
    "{{- bos_token }}"
    "{%- if not date_string is defined %}{%- set date_string = '26 Jul 2024' %}{%- endif %}"
    "{%- if messages[0]['role'] == 'system' %}"
    "{%- set system_message = messages[0]['content']|trim %}{%- set messages = messages[1:] %}"
    "{%- else %}{%- set system_message = '' %}{%- endif %}"
    "{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' }}"
    "{{- 'Cutting Knowledge Date: December 2023\\n' }}"
    "{{- 'Today Date: ' + date_string + '\\n\\n' }}"
    "{{- system_message }}{{- '<|eot_id|>' }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' "
    "+ message['content'] | trim + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)
QWEN3_TEMPLATE = (
    "{%- if messages[0].role == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'user' %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- elif message.role == 'assistant' %}"
    "{%- set content = message.content %}{%- set reasoning_content = '' %}"
    "{%- if '</think>' in content %}"
    "{%- set reasoning_content = content.split('</think>')[0].rstrip('\\n')"
    ".split('<think>')[-1].lstrip('\\n') %}"
    "{%- set content = content.split('</think>')[-1].lstrip('\\n') %}{%- endif %}"
    "{%- if loop.last or reasoning_content %}"
    "{{- '<|im_start|>assistant\\n<think>\\n' + reasoning_content.strip('\\n') "
    "+ '\\n</think>\\n\\n' + content.lstrip('\\n') }}"
    "{%- else %}{{- '<|im_start|>assistant\\n' + content }}{%- endif %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- elif message.role == 'tool' %}"
    "{{- '<|im_start|>user\\n<tool_response>\\n' + message.content "
    "+ '\\n</tool_response><|im_end|>\\n' }}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}{%- endif %}"
)
QWEN25_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a "
    "helpful assistant.<|im_end|>\\n' }}{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'user' or (message.role == 'system' and not loop.first) "
    "or message.role == 'assistant' %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
GEMMA3_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}{%- set first_user_prefix = '' -%}{%- set loop_messages = messages -%}"
    "{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if message['role'] == 'assistant' -%}{%- set role = 'model' -%}"
    "{%- else -%}{%- set role = message['role'] -%}{%- endif -%}"
    "{{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else '') }}"
    "{{ message['content'] | trim }}{{ '<end_of_turn>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\\n' }}{%- endif -%}"
)

LLAMA3_SPECIALS = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",
    "<|eot_id|>",
]
QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
GEMMA_SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]

# The tokenizers' training text: a little of everything a prompt may hold.
TRAINING_TEXT = [
    "The quick brown fox jumps over the lazy dog. 12 + 30 = 42, and 3.14159 is pi.",
    "def add(a, b):\n    return a + b  # code with    runs of spaces\n\n",
    "日本語のテキストと中文文本, émojis 🙂🚀 and accents: café, naïve.",
    "Question: What is 7 * 6? Answer: 42. Let me think step by step.",
] * 20

SHAPE = dict(
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    initializer_range=0.2,  # logits of O(1): a wrong mapping shows
)


# The split patterns of the published tokenizer.json files: Llama 3 groups up to three
# digits, Qwen2 splits every digit (and its tokenizer.json puts text in NFC first).
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_PATTERN = LLAMA3_PATTERN.replace(r"\p{N}{1,3}", r"\p{N}")


def _byte_level_bpe(specials: list[str], bos: str | None, vocab_size: int) -> Tokenizer:
    """Byte-level BPE as Llama 3 (`bos` added to plain text) and Qwen (no `bos`) ship it:
    a split by the family's pattern, then bytes as characters."""
    tokenizer = Tokenizer(models.BPE())
    pattern = LLAMA3_PATTERN if bos is not None else QWEN2_PATTERN
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(pattern), "isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    if bos is None:
        tokenizer.normalizer = normalizers.NFC()
    tokenizer.decoder = decoders.ByteLevel()
    trainer = BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(TRAINING_TEXT, trainer)
    if bos is not None:
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A",
            pair=f"{bos} $A {bos} $B",
            special_tokens=[(bos, tokenizer.token_to_id(bos))],
        )
    else:
        tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    return tokenizer


def _sentencepiece_bpe(specials: list[str], vocab_size: int) -> Tokenizer:
    """Gemma's style: spaces as U+2581, BPE with byte fallback (<0x..> tokens), <bos> first."""
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tokenizer.normalizer = normalizers.Replace(" ", "\u2581")
    tokenizer.pre_tokenizer = pre_tokenizers.Split(" ", "merged_with_previous")
    tokenizer.decoder = decoders.Sequence(
        [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    )
    byte_tokens = [f"<0x{value:02X}>" for value in range(256)]
    trainer = BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials + byte_tokens, show_progress=False
    )
    tokenizer.train_from_iterator(TRAINING_TEXT, trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<bos> $A",
        pair="<bos> $A <bos> $B",
        special_tokens=[("<bos>", tokenizer.token_to_id("<bos>"))],
    )
    return tokenizer


def _model(family: str, vocab_size: int, special: dict) -> transformers.PreTrainedModel:
    torch.manual_seed(0)
    common = dict(SHAPE, vocab_size=vocab_size, **special)
    if family == "llama3":
        config = transformers.LlamaConfig(
            **common,
            head_dim=16,
            tie_word_embeddings=True,
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 16,
            },
            rope_theta=500_000.0,
        )
        return transformers.LlamaForCausalLM(config)
    if family == "qwen2":
        config = transformers.Qwen2Config(**common, tie_word_embeddings=True, rope_theta=1e6)
        return transformers.Qwen2ForCausalLM(config)
    if family == "qwen3":
        config = transformers.Qwen3Config(
            **common, head_dim=32, tie_word_embeddings=True, rope_theta=1_000_000.0
        )
        return transformers.Qwen3ForCausalLM(config)
    if family == "qwen3_moe":
        config = transformers.Qwen3MoeConfig(
            **common,
            head_dim=32,
            moe_intermediate_size=32,
            num_experts=8,
            num_experts_per_tok=2,
            norm_topk_prob=True,
            tie_word_embeddings=False,
        )
        return transformers.Qwen3MoeForCausalLM(config)
    if family == "gemma3":
        # Embeddings x sqrt(width) = 8: at 0.2 each token's own embedding outweighs the
        # rest and greedy decoding repeats it; at 0.05 the text varies.
        config = transformers.Gemma3TextConfig(
            **{**common, "initializer_range": 0.05},
            head_dim=32,
            query_pre_attn_scalar=32,
            sliding_window=8,  # shorter than the prompts, so the local layers differ
            layer_types=["sliding_attention", "full_attention"],
            rope_theta=1_000_000.0,
            rope_local_base_freq=10_000.0,
            rope_scaling={"rope_type": "linear", "factor": 8.0},
            final_logit_softcapping=None,
        )
        return transformers.Gemma3ForCausalLM(config)
    raise ValueError(family)


FAMILIES = ("llama3", "qwen2", "qwen3", "gemma3", "qwen3_moe")


def family_folder(path: Path, family: str) -> Path:
    """A save_pretrained folder of a random `family` model with its tokenizer files."""
    path.mkdir(parents=True, exist_ok=True)
    if family == "llama3":
        tokenizer = _byte_level_bpe(LLAMA3_SPECIALS, "<|begin_of_text|>", 400)
        names = dict(bos_token="<|begin_of_text|>", eos_token="<|eot_id|>", pad_token=None)
        eos = ["<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"]
        template = LLAMA3_TEMPLATE
    elif family in ("qwen2", "qwen3", "qwen3_moe"):
        tokenizer = _byte_level_bpe(QWEN_SPECIALS, None, 400)
        names = dict(bos_token=None, eos_token="<|im_end|>", pad_token="<|endoftext|>")
        eos = ["<|im_end|>", "<|endoftext|>"]
        template = QWEN25_TEMPLATE if family == "qwen2" else QWEN3_TEMPLATE
    else:
        tokenizer = _sentencepiece_bpe(GEMMA_SPECIALS, 600)
        names = dict(bos_token="<bos>", eos_token="<eos>", pad_token="<pad>")
        eos = ["<eos>", "<end_of_turn>"]
        template = GEMMA3_TEMPLATE
    tokenizer.save(str(path / "tokenizer.json"))
    ids = {key: tokenizer.token_to_id(value) for key, value in names.items() if value}
    eos_ids = [tokenizer.token_to_id(token) for token in eos]
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **{key: value for key, value in names.items() if value},
        "chat_template": template,
        "model_max_length": SHAPE["max_position_embeddings"],
        "clean_up_tokenization_spaces": False,
    }
    (path / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))
    special = {f"{key.split('_')[0]}_token_id": value for key, value in ids.items()}
    model = _model(family, tokenizer.get_vocab_size(), special)
    model.generation_config = transformers.GenerationConfig(
        bos_token_id=ids.get("bos_token"),
        eos_token_id=eos_ids,
        pad_token_id=ids.get("pad_token"),
    )
    model.save_pretrained(path)
    return path
