"""Tunix's GRPO and DPO step times at the shape `bench_rl_steps.py` gives.

    PYTHON_WITH_TUNIX experiments/peers/tunix_steps.py --spec runs/bench_rl_steps/peer_spec.json

Run by `experiments/bench_rl_steps.py` in an interpreter that has `google-tunix` (never
imported by jaxllm). Tunix's `Llama3` of the spec's shape (tied embeddings), random
weights, float32 on the CPU, one device.
- GRPO: its `GRPOLearner` on an `RLCluster` with the vanilla sampler (prompts of random
  letters of the spec's token counts, left-padded to 64 tokens as jaxllm's
  `grpo.max_prompt_tokens`; G replies of up to the spec's new tokens at temperature 1;
  beta 0, one iteration, a reward of the reply's length); a step is the interval between
  the starts of two global steps: the rollout, the rewards, the advantages and one
  optimizer step.
- DPO: its `DPOTrainer` (sigmoid loss, beta 0.1, a frozen reference of the same weights)
  on pre-tokenized pairs of the spec's token counts, padded to the longest prompt and reply
  of the run (prompts on the left, as Tunix asks); a step is the interval between two of
  the loop's `on_train_step_start` hooks: the reference's log-probs, the policy's forward
  and backward pass and AdamW (the loop keeps up to two steps in flight, so the interval
  is the device's rate).
Tunix has no reward-model trainer. Prints one JSON line: {"version": ..., stage: [seconds
per timed step, ...] or why there is none}.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import time
from pathlib import Path

import jax
import numpy as np
import optax
from flax import nnx
from tunix.models.llama3 import model as llama3
from tunix.rl import rl_cluster as rl_cluster_lib
from tunix.rl.grpo import grpo_learner
from tunix.rl.rollout import base_rollout
from tunix.sft import hooks
from tunix.sft.dpo import dpo_trainer

LETTERS = "abcdefghijklmnopqrstuvwxyz"


class CharTokenizer:
    """One token per letter (ids 1-26); the vocabulary's last two ids are BOS and EOS."""

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size

    def encode(self, text: str, **kwargs) -> list[int]:
        return [LETTERS.find(c) + 1 for c in text]  # 0 (padding) for anything else

    def decode(self, ids, **kwargs) -> str:
        return "".join(LETTERS[i - 1] if 1 <= i <= len(LETTERS) else "?" for i in ids)

    def bos_id(self) -> int:
        return self.vocab_size - 2

    def eos_id(self) -> int:
        return self.vocab_size - 1

    def pad_id(self) -> int:
        return 0


class StepStarts(hooks.TrainingHooks):
    """The time each training step starts."""

    def __init__(self):
        self.starts: list[float] = []

    def on_train_start(self, train_ctx):
        pass

    def on_train_end(self, train_ctx):
        self.starts.append(time.perf_counter())

    def on_train_step_start(self, train_ctx):
        self.starts.append(time.perf_counter())

    def on_train_step_end(self, train_ctx, train_step, train_loss, step_time=None):
        pass

    def on_eval_step_start(self, train_ctx):
        pass

    def on_eval_step_end(self, train_ctx, eval_loss):
        pass


def llama(spec: dict, seed: int) -> llama3.Llama3:
    m = spec["model"]
    config = llama3.ModelConfig(
        num_layers=m["num_layers"],
        vocab_size=m["vocab_size"],
        embed_dim=m["hidden"],
        hidden_dim=m["mlp"],
        num_heads=m["num_heads"],
        head_dim=m["hidden"] // m["num_heads"],
        num_kv_heads=m["num_kv_heads"],
        rope_theta=int(m["rope_theta"]),
        norm_eps=m["norm_eps"],
        weight_tying=True,
    )
    return llama3.Llama3(config, rngs=nnx.Rngs(seed))


def pair_batches(spec: dict) -> list[dpo_trainer.TrainingInput]:
    """Random tokens of the spec's pair lengths, `pairs_per_step` a batch, padded to the
    longest prompt (left) and reply (right) of all: fixed widths, as Tunix's own
    `max_prompt_length` and `max_response_length` give (a width per batch would compile
    each step anew)."""
    rng = np.random.default_rng(0)
    vocab, size = spec["model"]["vocab_size"], spec["pairs_per_step"]
    pairs = spec["pairs"]
    prompt_width = max(p for p, _, _ in pairs)
    reply_width = max(max(c, r) for _, c, r in pairs)
    batches = []
    for first in range(0, len(pairs) - size + 1, size):
        chunk = pairs[first : first + size]

        def padded(lengths, width, left):
            ids = np.zeros((size, width), np.int32)
            mask = np.zeros((size, width), np.int32)
            for row, length in enumerate(lengths):
                cols = slice(width - length, width) if left else slice(0, length)
                ids[row, cols] = rng.integers(1, vocab, length)
                mask[row, cols] = 1
            return ids, mask

        prompt_ids, prompt_mask = padded([p for p, _, _ in chunk], prompt_width, True)
        chosen_ids, chosen_mask = padded([c for _, c, _ in chunk], reply_width, False)
        rejected_ids, rejected_mask = padded([r for _, _, r in chunk], reply_width, False)
        batches.append(
            dpo_trainer.TrainingInput(
                prompt_ids=prompt_ids,
                prompt_mask=prompt_mask,
                chosen_ids=chosen_ids,
                chosen_mask=chosen_mask,
                rejected_ids=rejected_ids,
                rejected_mask=rejected_mask,
            )
        )
    return batches


def dpo_times(spec: dict) -> list[float]:
    timer = StepStarts()
    batches = pair_batches(spec)[: spec["steps"]]
    trainer = dpo_trainer.DPOTrainer(
        model=llama(spec, 0),
        ref_model=llama(spec, 0),
        optimizer=optax.adamw(1e-5),
        training_config=dpo_trainer.DPOTrainingConfig(
            eval_every_n_steps=10**9, max_steps=len(batches), beta=0.1, pbar_description=None
        ),
    )
    trainer.training_hooks = timer
    trainer.train(batches)
    return list(np.diff(timer.starts))


def grpo_times(spec: dict) -> list[float]:
    """Seconds between the starts of the GRPO learner's global steps: the rollout of
    prompts x group_size replies by the vanilla sampler, the rewards, the old policy's
    log-probs and one optimizer step."""
    rng = np.random.default_rng(0)
    lengths, steps = spec["grpo_prompt_lengths"], spec["steps"]
    batches = [
        {"prompts": np.array(["".join(rng.choice(list(LETTERS), n)) for n in lengths])}
        for _ in range(steps)
    ]
    auto = jax.sharding.AxisType.Auto
    mesh = jax.make_mesh((1, 1), ("fsdp", "tp"), axis_types=(auto, auto))
    roles = (rl_cluster_lib.Role.ACTOR, rl_cluster_lib.Role.REFERENCE, rl_cluster_lib.Role.ROLLOUT)
    max_prompt = 64  # jaxllm's grpo.max_prompt_tokens
    cluster = rl_cluster_lib.RLCluster(
        actor=llama(spec, 0),
        reference=llama(spec, 0),
        tokenizer=CharTokenizer(spec["model"]["vocab_size"]),
        cluster_config=rl_cluster_lib.ClusterConfig(
            role_to_mesh={role: mesh for role in roles},
            rollout_engine="vanilla",
            training_config=rl_cluster_lib.RLTrainingConfig(
                actor_optimizer=optax.adamw(1e-5),
                eval_every_n_steps=10**9,
                max_steps=steps,
                pbar_description=None,
            ),
            rollout_config=base_rollout.RolloutConfig(
                max_tokens_to_generate=spec["new_tokens"],
                max_prompt_length=max_prompt,
                kv_cache_size=max_prompt + spec["new_tokens"],
                temperature=1.0,
            ),
        ),
    )
    learner = grpo_learner.GRPOLearner(
        rl_cluster=cluster,
        algo_config=grpo_learner.GRPOConfig(
            num_generations=spec["group_size"], num_iterations=1, beta=0.0, epsilon=0.2
        ),
        reward_fns=lambda prompts, completions, **kwargs: [float(len(c)) for c in completions],
    )
    starts = []
    run_global_step = learner._run_global_step  # timed from outside, not changed

    def timed_global_step(*args, **kwargs):
        starts.append(time.perf_counter())
        return run_global_step(*args, **kwargs)

    learner._run_global_step = timed_global_step
    learner.train(batches)
    jax.block_until_ready(nnx.state(cluster.actor_trainer.model))
    starts.append(time.perf_counter())
    return list(np.diff(starts))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", required=True, help="the JSON bench_rl_steps.py writes")
    spec = json.loads(Path(parser.parse_args().spec).read_text())
    version = importlib.metadata.version("google-tunix")
    found: dict = {"version": f"{version} (jax {jax.__version__})"}
    stages = {"grpo": grpo_times, "dpo": dpo_times}
    for stage in spec["stages"]:
        if stage not in stages:
            found[stage] = "no trainer"
            continue
        try:
            found[stage] = stages[stage](spec)[spec["warmup"] :]
        except Exception as error:  # noqa: BLE001 - the table says why this stage has none
            found[stage] = f"failed: {type(error).__name__}: {str(error)[:60]}"
    print(json.dumps(found))


if __name__ == "__main__":
    main()
