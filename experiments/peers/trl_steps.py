"""TRL's GRPO, DPO and reward-model step times at the shape `bench_rl_steps.py` gives.

    PYTHON_WITH_TRL experiments/peers/trl_steps.py --spec runs/bench_rl_steps/peer_spec.json

Run by `experiments/bench_rl_steps.py` in an interpreter that has `trl` (never imported by
jaxllm). A random-init `LlamaForCausalLM` of the spec's shape, float32 on the CPU; text of
single-character tokens (a character-level tokenizer with the model's vocabulary size),
so each prompt and reply has the token count the spec names. Each stage runs its TRL
trainer for the spec's steps; a callback times each step from `on_step_begin` to
`on_step_end` (for GRPO that is generation, the reward, the log-probs and the optimizer
step). Prints one JSON line: {"version": ..., stage: [seconds per timed step, ...]}.
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import tempfile
import time
from pathlib import Path

import torch
import trl
from datasets import Dataset
from tokenizers import Tokenizer, models
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    PreTrainedTokenizerFast,
    TrainerCallback,
)

LETTERS = "abcdefghijklmnopqrstuvwxyz"


class StepTimes(TrainerCallback):
    """Seconds of each training step, `on_step_begin` to `on_step_end`."""

    def __init__(self):
        self.times: list[float] = []
        self.started = 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        self.started = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.times.append(time.perf_counter() - self.started)


def char_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    """One token per character: `vocab_size - 2` characters, then <pad> and <eos>."""
    chars = LETTERS + "".join(chr(0x100 + i) for i in range(vocab_size - 2 - len(LETTERS)))
    vocab = {c: i for i, c in enumerate(chars)} | {"<pad>": vocab_size - 2, "<eos>": vocab_size - 1}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=None))
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>")


def llama_config(spec: dict, tokenizer, **extra) -> LlamaConfig:
    m = spec["model"]
    return LlamaConfig(
        vocab_size=m["vocab_size"],
        hidden_size=m["hidden"],
        intermediate_size=m["mlp"],
        num_hidden_layers=m["num_layers"],
        num_attention_heads=m["num_heads"],
        num_key_value_heads=m["num_kv_heads"],
        max_position_embeddings=m["max_seq_len"],
        rms_norm_eps=m["norm_eps"],
        rope_theta=m["rope_theta"],
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        **extra,
    )


def text(rng: random.Random, tokens: int) -> str:
    return "".join(rng.choice(LETTERS) for _ in range(tokens))


def common_args(spec: dict, out: str, batch_size: int) -> dict:
    return dict(
        output_dir=out,
        per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=1,
        max_steps=spec["steps"],
        learning_rate=1e-5,
        logging_steps=spec["steps"],
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,  # TRL's configs turn it on by default
        dataloader_num_workers=0,
        seed=0,
    )


def pair_rows(spec: dict, with_eos_room: bool) -> list[dict]:
    """Prompt, chosen, rejected text of the spec's token counts (a reply's count includes
    its end token, which TRL appends)."""
    rng = random.Random(0)
    rows = []
    for prompt, chosen, rejected in spec["pairs"]:
        end = 1 if with_eos_room else 0
        rows.append(
            {
                "prompt": text(rng, prompt),
                "chosen": text(rng, chosen - end),
                "rejected": text(rng, rejected - end),
            }
        )
    return rows


def grpo_times(spec: dict, tokenizer, out: str) -> list[float]:
    torch.manual_seed(0)
    model = LlamaForCausalLM(llama_config(spec, tokenizer))
    rng = random.Random(0)
    lengths = spec["grpo_prompt_lengths"]
    prompts = [text(rng, lengths[i % len(lengths)]) for i in range(len(lengths) * spec["steps"])]
    group = spec["group_size"]
    args = trl.GRPOConfig(
        **common_args(spec, out, len(lengths) * group),
        num_generations=group,
        max_completion_length=spec["new_tokens"],
        temperature=1.0,
        beta=0.0,
        num_iterations=1,
        loss_type="grpo",
        shuffle_dataset=False,
    )
    timer = StepTimes()
    trainer = trl.GRPOTrainer(
        model=model,
        reward_funcs=lambda completions, **kwargs: [float(len(c)) for c in completions],
        args=args,
        train_dataset=Dataset.from_list([{"prompt": p} for p in prompts]),
        processing_class=tokenizer,
        callbacks=[timer],
    )
    trainer.train()
    return timer.times


def dpo_times(spec: dict, tokenizer, out: str) -> list[float]:
    torch.manual_seed(0)
    model = LlamaForCausalLM(llama_config(spec, tokenizer))
    args = trl.DPOConfig(
        **common_args(spec, out, spec["pairs_per_step"]),
        beta=0.1,
        max_length=spec["model"]["max_seq_len"],
        precompute_ref_log_probs=False,
    )
    timer = StepTimes()
    trainer = trl.DPOTrainer(
        model=model,
        ref_model=copy.deepcopy(model).eval(),  # the frozen reference, as jaxllm's
        args=args,
        train_dataset=Dataset.from_list(pair_rows(spec, with_eos_room=True)),
        processing_class=tokenizer,
        callbacks=[timer],
    )
    trainer.train()
    return timer.times


def reward_times(spec: dict, tokenizer, out: str) -> list[float]:
    torch.manual_seed(0)
    model = LlamaForSequenceClassification(llama_config(spec, tokenizer, num_labels=1))
    args = trl.RewardConfig(
        **common_args(spec, out, spec["pairs_per_step"]),
        max_length=spec["model"]["max_seq_len"],
        center_rewards_coefficient=0.025,
    )
    timer = StepTimes()
    trainer = trl.RewardTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(pair_rows(spec, with_eos_room=True)),
        processing_class=tokenizer,
        callbacks=[timer],
    )
    trainer.train()
    return timer.times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", required=True, help="the JSON bench_rl_steps.py writes")
    spec = json.loads(Path(parser.parse_args().spec).read_text())
    if spec.get("torch_threads"):
        torch.set_num_threads(spec["torch_threads"])
    tokenizer = char_tokenizer(spec["model"]["vocab_size"])
    stages = {"grpo": grpo_times, "dpo": dpo_times, "reward": reward_times}
    found: dict = {
        "version": f"{trl.__version__} (torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads)"
    }
    for stage in spec["stages"]:
        with tempfile.TemporaryDirectory() as out:
            try:
                found[stage] = stages[stage](spec, tokenizer, out)[spec["warmup"] :]
            except Exception as error:  # noqa: BLE001 - the table says why this stage has none
                found[stage] = f"failed: {type(error).__name__}: {str(error)[:60]}"
    print(json.dumps(found))


if __name__ == "__main__":
    main()
