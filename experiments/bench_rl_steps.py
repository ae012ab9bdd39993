"""RL steps side by side: jaxllm's GRPO, DPO and reward-model steps beside TRL's and Tunix's.

    python experiments/bench_rl_steps.py [--steps 8] [--warmup 3] [--out runs/bench_rl_steps] \
        [--trl-python /work/peers_venv/bin/python] [--tunix-python /work/tunix_venv/bin/python] \
        [--torch-threads 1] [--stages grpo,dpo,reward] [--rounds 1]

One shape (issue #35): the `shakespeare` preset's Llama (4 layers, width 128, 4 heads,
SwiGLU 344, 320-row tied embedding: 0.83M params, float32, byte tokens), on the CPU.
- GRPO: 16 built-in task prompts (about 25 characters, 47 tokens under the chat template)
  x 8 replies of up to 32 new tokens, sampled at temperature 1; one update per step
  (iterations 1, minibatches 1, beta 0: no reference model).
- DPO: 16 pairs per step (sigmoid loss, beta 0.1, a frozen reference).
- reward model: 16 pairs per step (Bradley-Terry, center coefficient 0.025).
Pairs: a built-in prompt and two replies of 10-20 random letters (about 15 tokens).

What a step includes:
- jaxllm: the stage run in-process (`jaxllm grpo|dpo|reward` on the recipe configs of
  `experiments/configs`, from a 2-step SFT run of the preset), its figures read from the
  run's own `metrics.jsonl` train lines. GRPO: `batch_time_s` (the rollout: prefill and
  sampling, the host rewards, the rows) + `step_time_s` (one compiled update: the
  advantages, the loss, its gradient and AdamW; with one optimizer step per batch the old
  log-probs are the loss's own forward pass, as TRL's). DPO and reward: `step_time_s`,
  the trainer's time between two finished steps (the batch is cut on the host while the
  device runs the step before). `tokens/s` is the trainer's `tokens_per_sec` (row positions
  the update computes over `step_time_s`), `padding` its `padding_fraction` (the share of
  those positions that hold no token).
- TRL (`experiments/peers/trl_steps.py`, PyTorch on the CPU): `Trainer.training_step` as
  its trainers run it, timed from a callback's `on_step_begin` to `on_step_end`; GRPO's
  step generates the 128 replies with `transformers` `generate` and scores them, then
  takes the optimizer step; DPO's runs the policy and the reference (no precomputed
  log-probs); the reward model's is `LlamaForSequenceClassification` with one label.
- Tunix (`experiments/peers/tunix_steps.py`, JAX): its `DPOTrainer` step (the reference's
  log-probs, the policy's update) and its `GRPOLearner`'s global step (the vanilla
  sampler's rollout of the 128 replies, prompts left-padded to 64 tokens, the rewards,
  the advantages and one optimizer step); Tunix has no reward-model trainer.
Peers get random weights of the same shape (`LlamaForCausalLM`, Tunix's Llama), rows of
the same token lengths as jaxllm's (per prompt and reply), AdamW, float32 and no extra
features (no gradient checkpointing, no vLLM, no reference model in GRPO). One difference
stays: jaxllm's 2-step SFT model ends some replies early (about 25 of 32 tokens on
average), where the peers' random models nearly always run to 32. Each figure is the
median step time of steps `--warmup` + 1 to `--steps` (the first ones compile).
Each stage runs on jaxllm, then at once on the peers, before the next stage, so a
neighbour's load on shared cores falls on both sides of a ratio alike; `--rounds R` does
that R times (each a fresh run) and reports the medians over rounds, the ratio as the
median of the rounds' ratios (each round's in brackets).
The peers run in their own interpreters (`--trl-python`, `--tunix-python`; a virtual
environment with `pip install trl` or `google-tunix`, or the `bench` extra), each printing
one JSON line; without one its column says so. `--torch-threads 1` pins torch to one
thread: on cores that other jobs share, torch's default threads can slow it tenfold.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

from jaxllm.chat import render_for_generation, render_reply
from jaxllm.cli import main as cli_main
from jaxllm.config import load_config
from jaxllm.data.prompts import builtin_prompts
from jaxllm.metrics import read_metrics
from jaxllm.tokenizer import load_tokenizer

CONFIGS = Path(__file__).parent / "configs"
PEERS = Path(__file__).parent / "peers"
PRESET = "shakespeare"
PROMPTS, GROUP, NEW_TOKENS, PAIRS = 16, 8, 32, 16
STAGES = ("grpo", "dpo", "reward")


def run_stage(argv: list[str]) -> None:
    code = cli_main(argv)
    if code != 0:
        sys.exit(f"error: jaxllm {' '.join(argv)} exited with {code}")


def sft_run(out: Path) -> Path:
    """A 2-step SFT run of the preset on the built-in tasks: what the stages start from."""
    out_dir = out / "sft"
    if not (out_dir / "checkpoints").is_dir():
        run_stage(
            [
                "sft",
                f"preset={PRESET}",
                "model.max_seq_len=128",
                "model.scan_layers=false",  # as the recipe configs
                "data.path=builtin",
                "sft.builtin_examples=64",
                "sft.eval_prompts=0",
                "train.batch_size=8",
                "train.seq_len=128",
                "train.samples=0",
                "train.eval_every=100",
                "train.steps=2",
                "checkpoint.every=2",
                f"out_dir={out_dir}",
            ]
        )
    return out_dir


def write_pairs(path: Path, count: int, seed: int) -> None:
    """`count` pairs: a built-in prompt and two replies of 10-20 random letters."""
    rng = random.Random(seed)

    def reply() -> str:
        return "".join(rng.choice("abcdefghij") for _ in range(rng.randint(10, 20)))

    lines = [
        json.dumps({"prompt": p.text, "chosen": reply(), "rejected": reply()})
        for p in builtin_prompts(count, seed)
    ]
    path.write_text("\n".join(lines) + "\n")


def pair_lengths(path: Path) -> list[list[int]]:
    """[prompt tokens, chosen reply tokens, rejected reply tokens] of each pair, under the
    chat template (a reply's tokens end with its <|im_end|>): what the peers' rows hold."""
    tokenizer = load_tokenizer("bytes")
    lengths = []
    for line in path.read_text().splitlines():
        record = json.loads(line)
        prompt = [{"role": "user", "content": record["prompt"]}]
        prompt_len = len(render_for_generation(tokenizer, prompt, None))
        replies = [
            len(render_reply(tokenizer, [*prompt, {"role": "assistant", "content": record[k]}])[0])
            - prompt_len
            for k in ("chosen", "rejected")
        ]
        lengths.append([prompt_len, *replies])
    return lengths


def jaxllm_stage(
    stage: str, sft: Path, out: Path, pairs: Path, steps: int, overrides: list[str]
) -> list[dict]:
    """Run `jaxllm <stage>` for `steps` steps at the benchmark's shape, then `overrides`;
    its train lines."""
    out_dir = out / stage
    common = [
        f"out_dir={out_dir}",
        f"train.steps={steps}",
        "train.log_every=1",
        "train.eval_at_start=false",
        f"train.eval_every={steps}",
        "train.samples=0",
        f"checkpoint.every={steps}",
    ]
    if stage == "grpo":
        specific = [
            f"grpo.policy_from={sft}",
            "data.path=builtin",
            f"train.batch_size={PROMPTS}",
            f"grpo.group_size={GROUP}",
            f"grpo.max_new_tokens={NEW_TOKENS}",
            "grpo.eval_prompts=8",
        ]
    else:
        start = "dpo.policy_from" if stage == "dpo" else "reward.init_from"
        specific = [f"{start}={sft}", f"data.path={pairs}", f"train.batch_size={PAIRS}"]
    config = CONFIGS / f"{stage}_recipe.yaml"
    shutil.rmtree(out_dir, ignore_errors=True)  # a fresh run, not a resumed one
    run_stage([stage, "--config", str(config), *common, *specific, *overrides])
    return [r for r in read_metrics(out_dir / "metrics.jsonl") if r["split"] == "train"]


def jaxllm_figures(stage: str, lines: list[dict], warmup: int) -> dict:
    timed = lines[warmup:]
    step_s = [
        line["step_time_s"] + (line["batch_time_s"] if stage == "grpo" else 0.0) for line in timed
    ]
    return {
        "step_s": statistics.median(step_s),
        "tokens_per_sec": statistics.median(line["tokens_per_sec"] for line in timed),
        "padding_fraction": statistics.mean(line["padding_fraction"] for line in timed),
    }


def peer_figures(python: str | None, script: str, spec: Path) -> dict:
    """The peer's median step time per stage, or why there is none ({stage: str})."""
    if not python:
        return {stage: "not run" for stage in STAGES}
    result = subprocess.run(
        [python, str(PEERS / script), "--spec", str(spec)],
        capture_output=True,
        text=True,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )
    last = result.stdout.strip().splitlines()[-1:] if result.returncode == 0 else []
    if not last:
        reason = (result.stderr.strip().splitlines() or ["no output"])[-1][:80]
        return {"version": "?"} | {stage: f"failed: {reason}" for stage in STAGES}
    found = json.loads(last[0])
    figures = {"version": found["version"]}
    for stage in STAGES:
        times = found.get(stage)
        figures[stage] = statistics.median(times) if isinstance(times, list) else str(times)
    return figures


def peer_spec(out: Path, model, pairs: Path, stage: str, args) -> Path:
    """The peers' spec for one stage: the model's shape and the rows' token lengths."""
    tokenizer = load_tokenizer("bytes")
    spec = out / f"peer_spec_{stage}.json"
    spec.write_text(
        json.dumps(
            {
                "model": {
                    "vocab_size": model.vocab_size,
                    "num_layers": model.num_layers,
                    "hidden": model.embed_dim,
                    "num_heads": model.num_heads,
                    "num_kv_heads": model.num_kv_heads,
                    "mlp": model.mlp_dim,
                    "norm_eps": model.norm_eps,
                    "rope_theta": model.rope_theta,
                    "max_seq_len": 128,
                },
                "stages": [stage],
                "steps": args.steps,
                "warmup": args.warmup,
                "group_size": GROUP,
                "new_tokens": NEW_TOKENS,
                "grpo_prompt_lengths": [
                    len(render_for_generation(tokenizer, p.messages, None))
                    for p in builtin_prompts(PROMPTS, 0)
                ],
                "pairs": pair_lengths(pairs)[: PAIRS * args.steps],
                "pairs_per_step": PAIRS,
                "torch_threads": args.torch_threads,
            }
        )
    )
    return spec


def median_figure(values: list):
    """The median of a peer's per-round figures, or its first reason for having none."""
    times = [v for v in values if isinstance(v, float)]
    return statistics.median(times) if times else values[0]


def cell(value) -> str:
    return f"{value:.3f}" if isinstance(value, float) else value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8, help="timed steps + warm-up, per stage")
    parser.add_argument("--warmup", type=int, default=3, help="first steps left out")
    parser.add_argument("--out", default="runs/bench_rl_steps")
    parser.add_argument("--trl-python", help="an interpreter with trl installed")
    parser.add_argument("--tunix-python", help="an interpreter with google-tunix installed")
    parser.add_argument(
        "--torch-threads", type=int, help="torch.set_num_threads for TRL (default: torch's)"
    )
    parser.add_argument("--stages", default=",".join(STAGES), help="comma-separated")
    parser.add_argument(
        "--rounds", type=int, default=1, help="each stage's sides run back to back this often"
    )
    parser.add_argument(
        "--override",
        action="append",
        default=[],
        help="KEY=VALUE for jaxllm's runs, e.g. grpo.share_prompt=false (repeatable)",
    )
    args = parser.parse_args()
    if not 0 <= args.warmup < args.steps:
        parser.error(f"--warmup {args.warmup} must leave steps out of --steps {args.steps}")
    stages = args.stages.split(",")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    pairs = out / "pairs.jsonl"
    write_pairs(pairs, PAIRS * args.steps * 2, seed=0)
    sft = sft_run(out)
    model = load_config(None, [f"preset={PRESET}"]).model
    # Each stage's sides run back to back, round after round, so that a neighbour's load
    # on the shared cores falls on both sides of a ratio alike.
    rounds = {stage: [] for stage in stages}
    specs = {stage: peer_spec(out, model, pairs, stage, args) for stage in stages}
    for _ in range(args.rounds):
        for stage in stages:
            lines = jaxllm_stage(stage, sft, out, pairs, args.steps, args.override)
            rounds[stage].append(
                {
                    "jaxllm": jaxllm_figures(stage, lines, args.warmup),
                    "trl": peer_figures(args.trl_python, "trl_steps.py", specs[stage]),
                    "tunix": peer_figures(args.tunix_python, "tunix_steps.py", specs[stage]),
                }
            )
    first = rounds[stages[0]][0]
    versions = {peer: first[peer].get("version", "-") for peer in ("trl", "tunix")}
    print(
        f"# {PRESET} ({model.num_layers} layers, width {model.embed_dim}, {model.num_heads} "
        f"heads, float32, CPU); median s/step of steps {args.warmup + 1}-{args.steps}"
        + (f", the median of {args.rounds} rounds" if args.rounds > 1 else "")
        + f"; TRL {versions['trl']}, Tunix {versions['tunix']}"
    )
    print(
        "stage | jaxllm s/step | jaxllm tokens/s | padding | TRL s/step | Tunix s/step "
        "| jaxllm / TRL"
    )
    print("---|---|---|---|---|---|---")
    shapes = {
        "grpo": f"GRPO, {PROMPTS} prompts x {GROUP} replies x {NEW_TOKENS} new tokens",
        "dpo": f"DPO, {PAIRS} pairs",
        "reward": f"reward model, {PAIRS} pairs",
    }
    for stage in stages:
        runs = rounds[stage]
        mine = {
            name: statistics.median(r["jaxllm"][name] for r in runs)
            for name in ("step_s", "tokens_per_sec", "padding_fraction")
        }
        peers = [median_figure([r[peer][stage] for r in runs]) for peer in ("trl", "tunix")]
        ratios = [
            r["jaxllm"]["step_s"] / r["trl"][stage]
            for r in runs
            if isinstance(r["trl"][stage], float)
        ]
        ratio = f"{statistics.median(ratios):.2f}x" if ratios else "-"
        if len(ratios) > 1:
            ratio += " (" + ", ".join(f"{x:.2f}" for x in ratios) + ")"
        print(
            f"{shapes[stage]} | {mine['step_s']:.3f} | {mine['tokens_per_sec']:,.0f} | "
            f"{mine['padding_fraction']:.2f} | {cell(peers[0])} | {cell(peers[1])} | {ratio}"
        )


if __name__ == "__main__":
    main()
