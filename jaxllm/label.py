"""`jaxllm label`: sample replies from a run and rank them with a simulated labeler.

For each prompt, K replies are sampled from the run (`jaxllm.rl.rollouts`), duplicates and
empty replies are dropped, and a noisy labeler of a gold rule (`jaxllm.rl.labelers`) ranks
the rest; prompts left with fewer than two distinct replies are skipped and counted. Each
written line is a ranking record of `jaxllm.data.preferences` (`prompt`, `responses`,
`scores`, ties where the gold is equal) plus `gold` (the rule's reward of each reply),
`rule` and `tau`, so a reward model can train on it and later stages can measure the gold
reward beside their proxy.
The output is written whole or not at all (a temporary file renamed at the end).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import jax
import numpy as np

from jaxllm.data.prompts import Prompt, rendered_prompts
from jaxllm.errors import UserError
from jaxllm.generate import Generator
from jaxllm.rl.labelers import GOLD_RULES, label
from jaxllm.rl.rollouts import sample_groups
from jaxllm.stages.common import LoadedRun

ROWS_PER_CALL = 256  # sampler rows per call: bounds the KV cache of a long prompt list


@dataclass
class LabelReport:
    prompts: int = 0
    written: int = 0
    skipped_too_few: int = 0  # fewer than two distinct non-empty replies
    duplicates: int = 0  # replies dropped as a copy of an earlier one
    empty: int = 0
    truncated: int = 0  # replies cut off at max_new_tokens (no <|im_end|>)

    def summary(self) -> str:
        return (
            f"{self.written} of {self.prompts} prompts labelled; {self.skipped_too_few} skipped "
            f"with fewer than 2 distinct replies; replies dropped: {self.duplicates} duplicate, "
            f"{self.empty} empty; {self.truncated} replies cut off without <|im_end|>"
        )


def sample_and_label(
    run: LoadedRun,
    prompts: list[Prompt],
    output: str | Path,
    *,
    replies: int,
    rule: str,
    tau: float,
    temperature: float,
    max_new_tokens: int,
    seed: int,
) -> LabelReport:
    """Write one labelled ranking per prompt (with >= 2 distinct replies) to `output`."""
    output = Path(output)
    if rule not in GOLD_RULES:
        raise UserError(f"unknown gold rule '{rule}'; use one of {', '.join(GOLD_RULES)}")
    if replies < 2:
        raise UserError(f"--replies {replies}: a ranking needs at least 2 replies per prompt")
    if not tau >= 0:
        raise UserError(f"--tau {tau} must be >= 0 (0: a labeler without noise)")
    if output.exists():
        raise UserError(f"{output} exists; remove it or choose another --output")
    tokenizer, context = run.tokenizer, run.model.cfg.max_seq_len
    budget = min(max_new_tokens, context - 1)
    ids = rendered_prompts(
        tokenizer, prompts, context - budget, f"--max-new-tokens {budget} of {context} context"
    )
    generator = Generator(run.model, tokenizer.vocab_size, tokenizer.pad_id, budget)
    end = tokenizer.special_id("<|im_end|>")
    completion = sample_groups(
        generator,
        run.params,
        ids,
        replies,
        jax.random.key(seed),
        max_rows=ROWS_PER_CALL,
        temperature=temperature,
        stop_ids=[end],
    )
    report = LabelReport(prompts=len(prompts))
    rng = np.random.default_rng(seed)
    output.parent.mkdir(parents=True, exist_ok=True)
    partial = output.with_name(output.name + ".partial")
    with partial.open("w", encoding="utf-8") as file:
        for index, prompt in enumerate(prompts):
            texts: list[str] = []
            for row in range(index * replies, (index + 1) * replies):
                tokens = completion.row(row)
                report.truncated += end not in tokens
                text = tokenizer.decode(t for t in tokens if t != end)
                if not text.strip():
                    report.empty += 1
                elif text in texts:
                    report.duplicates += 1
                else:
                    texts.append(text)
            if len(texts) < 2:
                report.skipped_too_few += 1
                continue
            record = label(prompt.messages, texts, GOLD_RULES[rule], tau, rng)
            file.write(json.dumps({**record, "rule": rule, "tau": tau}) + "\n")
            report.written += 1
    os.replace(partial, output)
    return report
