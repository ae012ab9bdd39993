"""A toy RL stage on the shared loop, for tests: roll out with the current params, score
each completion by a rule, take one clipped policy-gradient step.

    python tests/toy_rl_stage.py OUT_DIR STEPS [dotted.key=value ...]

The reward is the share of completion tokens that are ASCII bytes (ids below 128). The
batch is a pure function of (state, step): the rollout key is `fold_in(state.rng, step)`,
so a resumed run regenerates exactly the rollouts of the uninterrupted one.
"""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.config import load_config
from jaxllm.generate import Generator
from jaxllm.losses import token_logprobs
from jaxllm.model import LanguageModel
from jaxllm.rl.policy_losses import aggregate, clipped_policy_loss
from jaxllm.sharding import make_mesh, put_batch
from jaxllm.steps import LossAux
from jaxllm.tokenizer import load_tokenizer
from jaxllm.trainer import RunResult, Stage, run_training, step_key

PROMPTS = ["abc", "xyz", "aaa", "hey", "one", "two", "ant", "bee"]
NEW_TOKENS = 6
ASCII = 128


def toy_stage(cfg, mesh) -> Stage:
    tokenizer = load_tokenizer("bytes")
    model = LanguageModel(cfg.model)
    generator = Generator(model, tokenizer.vocab_size, tokenizer.pad_id, NEW_TOKENS, mesh)
    prompts = [tokenizer.encode(p) for p in PROMPTS]  # equal lengths: no left padding

    def batch(state, step):
        completion = generator(state.params, prompts, step_key(state, step), temperature=1.0)
        mask_bn = completion.mask.astype(np.float32)
        reward_b = ((completion.tokens < ASCII) * mask_bn).sum(1) / mask_bn.sum(1)
        rows_bs = np.concatenate([np.array(prompts), completion.tokens], axis=1)
        prompt_len = len(prompts[0])
        completion_mask_bt = np.zeros((len(prompts), rows_bs.shape[1] - 1), np.float32)
        completion_mask_bt[:, prompt_len - 1 :] = mask_bn  # targets of completion tokens
        old_logprobs_bt = np.zeros_like(completion_mask_bt)
        old_logprobs_bt[:, prompt_len - 1 :] = completion.logprobs
        advantage_b = reward_b - reward_b.mean()
        host = {
            "tokens": rows_bs[:, :-1],
            "targets": rows_bs[:, 1:],
            "mask": completion_mask_bt,
            "old_logprobs": old_logprobs_bt,
            "advantages": np.broadcast_to(advantage_b[:, None], completion_mask_bt.shape),
            "reward": reward_b.astype(np.float32),
        }
        return put_batch(host, mesh, model.rules)

    def loss_fn(model, params, batch):
        logits_btv = model.logits(params, batch["tokens"])
        logprobs_bt = token_logprobs(logits_btv, batch["targets"], vocab_size=tokenizer.vocab_size)
        terms = clipped_policy_loss(logprobs_bt, batch["old_logprobs"], batch["advantages"])
        mask_bt = batch["mask"]
        loss_sum, denominator = aggregate(terms.loss_bt, mask_bt, "token_mean")
        clipped_bt = terms.clipped_bt
        ratio_bt = jnp.exp(logprobs_bt - batch["old_logprobs"])
        rows = jnp.float32(mask_bt.shape[0])
        return loss_sum, LossAux(
            denominator,
            means={
                "reward": (jnp.sum(batch["reward"]), rows),
                "clip_fraction": (jnp.sum(clipped_bt * mask_bt), jnp.sum(mask_bt)),
                "ratio": (jnp.sum(ratio_bt * mask_bt), jnp.sum(mask_bt)),
            },
        )

    return Stage(
        name="toy_rl",
        model=model,
        batch=batch,
        tokens_per_step=len(PROMPTS) * NEW_TOKENS,
        loss_fn=loss_fn,
    )


def toy_rl(cfg) -> RunResult:
    """The stage function a `StageSpec("toy_rl", module="toy_rl_stage")` runs."""
    mesh = make_mesh(cfg.mesh)
    return run_training(cfg, toy_stage(cfg, mesh), mesh)


def main(out_dir: str, steps: int, *overrides: str) -> None:
    cfg = load_config(
        None,
        [
            "preset=tiny",
            f"out_dir={out_dir}",
            f"train.steps={steps}",
            "train.eval_every=1000",
            "checkpoint.every=5",
            "optimizer.lr=0.003",
            "optimizer.warmup_steps=0",
            *overrides,
        ],
    )
    mesh = make_mesh(cfg.mesh)
    run_training(cfg, toy_stage(cfg, mesh), mesh)
    jax.effects_barrier()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), *sys.argv[3:])
