"""What every on-policy stage shares (PPO, and GRPO with each of its advantage estimators):
the set-up before the first rollout and the parts of a rollout that are not the algorithm's.

`OnPolicy` holds, for a stage whose config section has `policy_from`, `max_prompt_tokens`,
`max_new_tokens`, `builtin_prompts` and `eval_prompts`:
- the config with `train.seq_len` = P + N (a rollout row: the prompt left-padded to P
  tokens, then N completion columns), the mesh (checked against the rows of one step), the
  tokenizer, the policy model and the reward model's (the same backbone, a `reward` head);
- the training and held-out prompts, rendered and checked to fit P, and the shuffled order
  the training prompts are drawn in (a pure function of the step, so a resumed run draws
  the same ones);
- the Generator (stopping at the tokenizer's stop ids: `<|im_end|>` in jaxllm's template,
  an imported model's eos ids), and `roll_out` / `rows` around it: one reply per row, or
  with `max_turns` above 1 a multi-turn episode per row whose tool calls run between
  turns (`jaxllm.rl.episodes`; tools per prompt row, `"tools": [...]`, else the section's
  `tools`);
- the last rollout's figures for its train line, and `samples.jsonl`;
- `stage(...)`: the `Stage` with what every on-policy stage sets the same way (params from
  `policy_from`, rows trimmed to their longest reply, one log line per rollout).

An algorithm brings only what differs: its batch (how many replies per prompt and how they
are scored), its update (advantages, loss, extra state) and its eval.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grain
import jax
import numpy as np

from jaxllm.config import REWARD_HEAD, Config, check_for_stage
from jaxllm.data.prompts import (
    Prompt,
    PromptFields,
    offered_tools,
    rendered_prompts,
    train_and_eval_prompts,
)
from jaxllm.errors import ConfigError
from jaxllm.generate import Generator
from jaxllm.model import LanguageModel
from jaxllm.rl.episodes import Rollout, episode_figures, roll_out
from jaxllm.rl.rollouts import rollout_figures, rollout_rows, trimmed_row_fields
from jaxllm.sharding import check_batch_fits, make_mesh
from jaxllm.stages.common import announce, load_configured_tokenizer, params_from_run
from jaxllm.tokenizer import Tokenizer
from jaxllm.tools import check_tools
from jaxllm.trainer import RunResult, Stage, run_training


def room_problems(cfg: Config, section: str) -> list[str]:
    """A rollout row must fit the context: `section`.max_prompt_tokens + max_new_tokens <=
    model.max_seq_len (one line when not); its tools must be registered ones, and offered
    only where a second turn can read their results."""
    own = getattr(cfg, section)
    total = own.max_prompt_tokens + own.max_new_tokens
    problems = []
    if total > cfg.model.max_seq_len:
        problems.append(
            f"{section}.max_prompt_tokens={own.max_prompt_tokens} + {section}.max_new_tokens="
            f"{own.max_new_tokens} = {total} exceed model.max_seq_len={cfg.model.max_seq_len}; "
            "lower one of them or raise model.max_seq_len"
        )
    try:
        check_tools(own.tools, f"{section}.tools")
    except ConfigError as error:
        problems.append(str(error))
    if own.tools and own.max_turns < 2:
        problems.append(
            f"{section}.tools={list(own.tools)} can never be used at {section}.max_turns="
            f"{own.max_turns}: a tool's result is read in the next turn; set "
            f"{section}.max_turns=3 (or more), or drop {section}.tools"
        )
    return problems


@dataclasses.dataclass
class OnPolicy:
    """An on-policy stage's set-up (see the module docstring); `on_policy` builds it."""

    name: str  # the stage, also its config section
    cfg: Config  # train.seq_len = prompt_tokens + new_tokens
    mesh: Any
    tokenizer: Tokenizer
    model: LanguageModel
    reward_model: LanguageModel  # the policy's backbone with a `reward` head
    generator: Generator
    stop_ids: list[int]  # the tokenizer's: a reply ends at the first
    prompt_tokens: int  # P
    new_tokens: int  # N
    train_prompts: list[Prompt]
    eval_prompts: list[Prompt]
    train_ids: list[list[int]]
    eval_ids: list[list[int]]
    order: Any  # grain: the training prompts' shuffled, repeated order
    last_rollout: dict[str, float] = dataclasses.field(default_factory=dict)
    # Consecutive rows the update may compute as one packed row (`rl.rollouts.group_rows`),
    # in groups of `group_size` rows that share one prompt, held once (GRPO's groups; 1:
    # PPO's rollouts, each with its own); pack_rows 1: every row computes its own.
    pack_rows: int = 1
    group_size: int = 1

    @property
    def section(self) -> Any:
        return getattr(self.cfg, self.name)

    def step_prompts(self, step: int, count: int) -> list[int]:
        """Indices of the `count` training prompts of `step` (the same after a resume)."""
        return [self.order[step * count + j] for j in range(count)]

    def roll_out(
        self,
        params,
        prompts: Sequence[Prompt],
        prompt_ids: Sequence[Sequence[int]],
        keys,
        max_rows: int | None = None,
        **sampling,
    ) -> Rollout:
        """The replies to `prompts` (rendered as `prompt_ids`; one key per row, or one for
        all, row i then drawing with fold_in(key, i)), timed after the params are ready (the
        time is the rollout's alone). With `max_turns` > 1, one episode per row, run in
        calls of at most `max_rows` rows (default: one call)."""
        max_turns = self.section.max_turns
        return roll_out(
            self.generator,
            params,
            self.tokenizer,
            prompt_ids,
            keys,
            stop_ids=self.stop_ids,
            max_turns=max_turns,
            messages=[prompt.messages for prompt in prompts] if max_turns > 1 else (),
            tools=[offered_tools(p, self.section.tools) for p in prompts] if max_turns > 1 else (),
            max_rows=max_rows,
            **sampling,
        )

    def rows(self, prompt_ids, rollout: Rollout, gold_b=None) -> dict[str, np.ndarray]:
        """The rollouts as host rows (`rl.rollouts.rollout_rows`); an episode has ended
        (`ended_b`) when it was not truncated."""
        rows = rollout_rows(
            prompt_ids,
            rollout.completion,
            self.prompt_tokens,
            self.tokenizer.pad_id,
            self.stop_ids,
            gold_b,
        )
        if rollout.episodes is not None:
            rows["ended_b"] = 1.0 - episode_figures(rollout.episodes)["truncated"]
        return rows

    def record(self, rows: dict[str, np.ndarray], rollout: Rollout) -> None:
        """Keep the training rollout's figures for its train line."""
        self.last_rollout.update(rollout_figures(rows, rollout.elapsed_s))
        self.last_rollout.update(self.episode_means(rollout))

    @staticmethod
    def episode_means(rollout: Rollout, suffix: str = "") -> dict[str, float]:
        """The episodes' mean `turns`, `tool_calls`, `tool_errors` and `truncated`, and
        `tool_call_rate` (the share with a call); {} without episodes."""
        if rollout.episodes is None:
            return {}
        figures = episode_figures(rollout.episodes)
        figures["tool_call_rate"] = (figures["tool_calls"] > 0).astype(np.float32)
        return {f"{name}{suffix}": float(values.mean()) for name, values in figures.items()}

    def texts(self, rollout: Rollout) -> list[str]:
        """Each reply's text, its stop token left out (of an episode, its last turn)."""
        return [
            self.tokenizer.decode(t for t in reply if t not in self.stop_ids)
            for reply in rollout.replies()
        ]

    def episode_lines(self, rollout: Rollout) -> list[dict]:
        """Per row, what a samples.jsonl line adds for an episode: its messages after the
        prompt (assistant turns and tool results) and its figures; {} without episodes."""
        if rollout.episodes is None:
            return [{} for _ in rollout.completion.tokens]
        return [
            {
                "messages": episode.messages,
                "turns": episode.turns,
                "tool_calls": episode.tool_calls,
                "tool_errors": episode.tool_errors,
                "truncated": episode.truncated,
            }
            for episode in rollout.episodes
        ]

    def write_samples(self, lines: list[dict]) -> None:
        """Append the first `train.samples` of `lines` to `out_dir/samples.jsonl` (process 0)."""
        if jax.process_index() != 0 or not self.cfg.train.samples:
            return
        with (Path(self.cfg.out_dir) / "samples.jsonl").open("a") as file:
            for line in lines[: self.cfg.train.samples]:
                file.write(json.dumps(line) + "\n")

    def stage(self, **fields) -> Stage:
        """The Stage: `fields` (batch, loss_fn, update, ...) plus what every on-policy stage
        sets the same way."""
        return Stage(
            name=self.name,
            model=self.model,
            **trimmed_row_fields(
                self.prompt_tokens, self.new_tokens, self.pack_rows, self.group_size
            ),
            initial_params=params_from_run(
                self.section.policy_from, f"{self.name}.policy_from", self.cfg.lora
            ),
            batch_metrics=lambda: dict(self.last_rollout),
            rollouts=True,
            **fields,
        )

    def run(self, stage: Stage, summary: str) -> RunResult:
        """Say what the run will do, then train it."""
        announce(
            self.name,
            f"{len(self.train_ids)} training and {len(self.eval_ids)} held-out prompts; " + summary,
        )
        return run_training(self.cfg, stage, self.mesh)


def on_policy(
    cfg: Config, name: str, rows_per_step: int, rows_what: str, micro_batches: int = 1
) -> OnPolicy:
    """The set-up of on-policy stage `name` (its config section), whose steps roll out
    `rows_per_step` replies (`rows_what` names the settings that make them), which must
    split over the data-parallel devices, and so must each of their `micro_batches`
    parts. Checks the config for the stage first (its `config_problems` included)."""
    check_for_stage(cfg, name)
    section = getattr(cfg, name)
    if not section.policy_from:
        raise ConfigError(f"{name}.policy_from is not set; pass the out_dir of an SFT run")
    p, n = section.max_prompt_tokens, section.max_new_tokens
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, seq_len=p + n))
    mesh = make_mesh(cfg.mesh)
    check_batch_fits(mesh, rows_per_step, micro_batches, what=rows_what)
    tokenizer = load_configured_tokenizer(cfg)
    train_prompts, eval_prompts = train_and_eval_prompts(
        cfg.data.path,
        cfg.data.eval_path,
        cfg.data.val_fraction,
        section.builtin_prompts,
        section.eval_prompts,
        cfg.train.seed,
        PromptFields.of(cfg.data),
        cfg.data.hf_split,
        cfg.data.builtin_family_names(),
    )
    where = f"{name}.max_prompt_tokens={p}"
    tools = section.tools if section.max_turns > 1 else None  # None: no tools offered
    train_ids = rendered_prompts(tokenizer, train_prompts, p, where, tools)
    model = LanguageModel(cfg.model, lora=cfg.lora)
    return OnPolicy(
        name=name,
        cfg=cfg,
        mesh=mesh,
        tokenizer=tokenizer,
        model=model,
        reward_model=model.base.with_heads([REWARD_HEAD]),
        generator=Generator(model, tokenizer.vocab_size, tokenizer.pad_id, n, mesh),
        stop_ids=list(tokenizer.stop_ids),
        prompt_tokens=p,
        new_tokens=n,
        train_prompts=train_prompts,
        eval_prompts=eval_prompts,
        train_ids=train_ids,
        eval_ids=rendered_prompts(tokenizer, eval_prompts, p, where, tools),
        order=grain.MapDataset.range(len(train_ids)).seed(cfg.train.seed).shuffle().repeat(None),
    )
