"""Supervised fine-tuning: assistant-only masked loss on packed conversations.

The step is the pre-training step: the batch's loss mask selects the assistant tokens, and
the loss is normalised per trained token over the whole global batch (every micro-batch
and device), so a short reply and a long one weigh each token the same. A run starts from
`sft.init_from` (another run's params, a fresh optimizer) and evaluates the held-out
conversation loss and, for the built-in data, the accuracy of greedy answers
(`jaxllm.answers.answers_match`).
"""

from __future__ import annotations

import functools
import random
from collections.abc import Sequence

import numpy as np

from jaxllm.answers import answers_match
from jaxllm.chat import render_for_generation, reply_answer
from jaxllm.config import Config
from jaxllm.data import builtin_chat, tool_task
from jaxllm.data.conversations import ChatDataReport, pack, read_conversations, render_all
from jaxllm.data.loader import LMBatches, eval_batches
from jaxllm.errors import ConfigError, DataError
from jaxllm.generate import Generator
from jaxllm.model import LanguageModel
from jaxllm.stages.common import (
    announce,
    configured_mesh,
    load_configured_tokenizer,
    params_from_run,
)
from jaxllm.steps import causal_lm_loss
from jaxllm.tokenizer import Tokenizer
from jaxllm.trainer import RunResult, Stage, by_step, run_training

VALIDATION = 200  # validation conversations of the built-in data


def make_accuracy_eval(
    model: LanguageModel,
    tokenizer: Tokenizer,
    examples: Sequence[builtin_chat.Example],
    max_new_tokens: int,
    mesh,
):
    """Greedy answers to held-out built-in prompts: accuracy (`jaxllm.answers.answers_match`)
    overall and per family, and the share of replies that end with a stop token
    (`<|im_end|>` in jaxllm's template)."""
    generator = Generator(model, tokenizer.vocab_size, tokenizer.pad_id, max_new_tokens, mesh)
    prompts = [
        render_for_generation(tokenizer, [{"role": "user", "content": e.prompt}]) for e in examples
    ]
    stops = list(tokenizer.stop_ids)
    longest = max(map(len, prompts))
    if longest + max_new_tokens > model.cfg.max_seq_len:
        raise ConfigError(
            f"held-out prompts of {longest} tokens plus sft.max_new_tokens={max_new_tokens} "
            f"exceed model.max_seq_len={model.cfg.max_seq_len}; raise it or lower "
            "sft.max_new_tokens"
        )

    def evaluate(state, key) -> dict[str, float]:
        completion = generator(state.params, prompts, key, temperature=0.0, stop_ids=stops)
        replies = [completion.row(i) for i in range(len(examples))]
        correct = np.array(
            [
                answers_match(reply_answer(tokenizer, reply), example.answer)
                for reply, example in zip(replies, examples, strict=True)
            ]
        )
        families = np.array([e.family for e in examples])
        metrics = {
            "accuracy": float(correct.mean()),
            "ends_with_im_end": float(np.mean([any(t in stops for t in r) for r in replies])),
            "eval_prompts": len(examples),
        }
        for family in builtin_chat.FAMILIES:
            if (families == family).any():
                metrics[f"accuracy_{family}"] = float(correct[families == family].mean())
        return metrics

    return evaluate


def _conversations(cfg: Config):
    """(train, validation) conversations and the held-out verifiable examples (built-in)."""
    if cfg.data.path == builtin_chat.NAME:
        seed = cfg.train.seed
        families = cfg.data.builtin_family_names()
        train = builtin_chat.examples(cfg.sft.builtin_examples, seed, families)
        rng = random.Random(seed)
        with_system = cfg.sft.builtin_system_fraction
        conversations = [e.messages(with_system=rng.random() < with_system) for e in train]
        validation = [
            e.messages(with_system=False)
            for e in builtin_chat.held_out(VALIDATION, seed + 1, train, families)
        ]
        verifiable = builtin_chat.held_out(cfg.sft.eval_prompts, seed + 2, train, families)
        return conversations, validation, verifiable
    if cfg.data.path == tool_task.NAME:  # held-out accuracy needs the tool: GRPO's evals
        demos = tool_task.demonstrations(
            cfg.sft.builtin_examples + VALIDATION, cfg.train.seed, cfg.sft.tool_fraction
        )
        messages = [line["messages"] for line in demos]
        return messages[:-VALIDATION], messages[-VALIDATION:], []
    if not cfg.data.path:
        raise DataError(
            "data.path is not set; pass a .jsonl chat file or folder, builtin or calculator"
        )
    conversations = _read_all(cfg.data.path, "data.path")
    if cfg.data.eval_path:
        return conversations, _read_all(cfg.data.eval_path, "data.eval_path"), []
    split = int(round(len(conversations) * (1 - cfg.data.val_fraction)))
    if split == len(conversations):
        raise DataError(
            f"the validation split is empty: data.val_fraction={cfg.data.val_fraction} of "
            f"{len(conversations)} conversations rounds to none; raise data.val_fraction or "
            "add conversations"
        )
    return conversations[:split], conversations[split:], []


def _read_all(path: str, key: str) -> list:
    conversations = [messages for _, messages in read_conversations(path)]
    if not conversations:
        raise DataError(
            f"{key}={path} holds no conversations; add .jsonl lines with 'messages' or "
            "'prompt'/'completion'"
        )
    return conversations


def _packed(conversations, tokenizer: Tokenizer, cfg: Config, split: str):
    """Rendered, masked and packed rows of the `split` conversations, and the counts to
    report; refuses a split that would train (or evaluate) no token."""
    report = ChatDataReport()
    rendered = render_all(conversations, tokenizer, cfg.sft.train_on, report)
    if not rendered:
        raise DataError(
            f"none of the {len(conversations)} {split} conversations has an assistant turn; "
            "SFT trains on assistant replies, so add them"
        )
    rows = pack(rendered, cfg.train.seq_len + 1, tokenizer.pad_id, cfg.sft.truncation, report)
    if report.trained_tokens == 0:
        raise DataError(
            f"the {split} conversations give 0 trained tokens: truncation at "
            f"train.seq_len={cfg.train.seq_len} cuts away every assistant reply; raise "
            "train.seq_len or set sft.truncation=drop"
        )
    return rows, report


def sft(cfg: Config) -> RunResult:
    """Fine-tune on `data.path` in `cfg.out_dir` (resuming if it holds a run)."""
    mesh = configured_mesh(cfg)
    tokenizer = load_configured_tokenizer(cfg)
    initial_params = (
        params_from_run(cfg.sft.init_from, "sft.init_from", cfg.lora) if cfg.sft.init_from else None
    )
    train_conversations, val_conversations, verifiable = _conversations(cfg)
    random.Random(cfg.train.seed).shuffle(train_conversations)

    train_rows, report = _packed(train_conversations, tokenizer, cfg, "training")
    val_rows, val_report = _packed(val_conversations, tokenizer, cfg, "validation")

    model = LanguageModel(cfg.model, lora=cfg.lora)
    batch_size, seq_len = cfg.train.batch_size, cfg.train.seq_len
    stage = Stage(
        name="sft",
        model=model,
        batch=by_step(LMBatches(train_rows, seq_len, batch_size, mesh, seed=cfg.train.seed)),
        tokens_per_step=batch_size * seq_len,
        loss_fn=functools.partial(causal_lm_loss, vocab_size=tokenizer.vocab_size),
        eval_batches=eval_batches(val_rows, seq_len, batch_size, cfg.train.eval_batches, mesh),
        extra_eval=make_accuracy_eval(model, tokenizer, verifiable, cfg.sft.max_new_tokens, mesh)
        if verifiable
        else None,
        initial_params=initial_params,
    )
    announce("sft", f"train {report.summary()}; validation {val_report.summary()}")
    return run_training(cfg, stage, mesh)
