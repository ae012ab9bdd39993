"""The training stages jaxllm knows, one record each.

The CLI (one command per stage), config loading (the key through which a stage starts from
another run), the pipeline (what it chains into each stage) and the pipeline's report (each
stage's headline and panels) all iterate over `STAGES`; none of them lists the stages again.
A new stage is its module (`jaxllm/stages/NAME.py`, or any importable module named by
`StageSpec.module`) with a function `NAME(cfg) -> RunResult` (and optionally
`config_problems(cfg) -> list[str]`, its cross-section checks), plus one
`register_stage(StageSpec(...))`, here or in user code.

This module imports no other part of jaxllm at import time (config loading reads it), so a
stage's module is imported only when the stage runs or is checked.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

from jaxllm.stages import reports


@dataclass(frozen=True)
class StageSpec:
    """One stage: how it is called, started, chained and reported."""

    name: str  # the command (`jaxllm NAME`), its config section and its pipeline section
    help: str  # the command's one-line description
    section: str | None = None  # its own `Config` section (pretrain reads shared ones only)
    # The dotted key naming the run it starts from (params, and the model, tokenizer and
    # chat template it inherits), or None for a stage that starts from scratch.
    start_key: str | None = None
    start_required: bool = False  # the stage cannot run without that run
    policy: bool = True  # its model is a policy (later stages may start from it)
    # Pipeline: dotted key -> the stage whose out_dir fills it when unset, and which must
    # come earlier (PPO's reward model).
    inputs: Mapping[str, str] = field(default_factory=dict)
    reads_comparisons: bool = False  # data.path is preference data (the label stage writes it)
    # The key counting the built-in examples it trains on when data.path=builtin, so the
    # report's held-out prompts avoid them.
    builtin_examples_key: str | None = None
    # Report: (eval lines, record) -> one line; (eval lines, train lines, record) -> panels.
    headline: Callable[[list[dict], dict], str] = reports.loss_headline
    panels: Callable[[list[dict], list[dict], dict], list[dict]] = reports.loss_panels
    module: str = ""  # the module holding `NAME(cfg)`; empty: jaxllm.stages.NAME

    def _module(self) -> ModuleType:
        return importlib.import_module(self.module or f"jaxllm.stages.{self.name}")

    def run(self, cfg: Any) -> Any:
        """Train this stage in `cfg.out_dir` (resuming); its module's `NAME(cfg)`."""
        return getattr(self._module(), self.name)(cfg)

    def config_problems(self, cfg: Any) -> list[str]:
        """One line per rule between this stage's section and the rest of `cfg` broken."""
        check = getattr(self._module(), "config_problems", None)
        return check(cfg) if check is not None else []

    def required_keys(self) -> tuple[str, ...]:
        """What it cannot start without once the pipeline has chained it."""
        start = (self.start_key,) if self.start_key and self.start_required else ()
        return (*start, *self.inputs, "data.path")


STAGES: dict[str, StageSpec] = {}


def register_stage(spec: StageSpec) -> StageSpec:
    """Make `spec` a stage of the CLI, config loading, the pipeline and its report."""
    if spec.name in STAGES:
        raise ValueError(f"a stage named {spec.name!r} is registered already")
    STAGES[spec.name] = spec
    return spec


def stage(name: str) -> StageSpec:
    """The registered stage `name`; ValueError listing the known ones otherwise."""
    if name not in STAGES:
        raise ValueError(f"unknown stage '{name}'; choose from {', '.join(STAGES)}")
    return STAGES[name]


register_stage(
    StageSpec(
        "pretrain",
        "pre-train a causal LM on a text corpus",
        headline=reports.pretrain_headline,
    )
)
register_stage(
    StageSpec(
        "sft",
        "fine-tune on conversations (assistant tokens only)",
        start_key="sft.init_from",
        section="sft",
        builtin_examples_key="sft.builtin_examples",
        headline=reports.sft_headline,
        panels=reports.sft_panels,
    )
)
register_stage(
    StageSpec(
        "reward",
        "train a reward model on comparisons (pairs or rankings)",
        start_key="reward.init_from",
        section="reward",
        policy=False,
        reads_comparisons=True,
        headline=reports.reward_headline,
        panels=reports.reward_panels,
    )
)
register_stage(
    StageSpec(
        "ppo",
        "RLHF: PPO against a reward model, with a value head or a separate critic",
        start_key="ppo.policy_from",
        section="ppo",
        start_required=True,
        inputs={"ppo.reward_from": "reward"},
        builtin_examples_key="ppo.builtin_prompts",
        headline=reports.ppo_headline,
        panels=reports.ppo_panels,
    )
)
register_stage(
    StageSpec(
        "grpo",
        "reasoning RL: GRPO, RLOO, REINFORCE++ with rule rewards, G replies per prompt",
        start_key="grpo.policy_from",
        section="grpo",
        start_required=True,
        builtin_examples_key="grpo.builtin_prompts",
        headline=reports.grpo_headline,
        panels=reports.grpo_panels,
    )
)
register_stage(
    StageSpec(
        "dpo",
        "learn from comparisons without a reward model (DPO, IPO, hinge, SimPO, ORPO)",
        start_key="dpo.policy_from",
        section="dpo",
        start_required=True,
        reads_comparisons=True,
        headline=reports.dpo_headline,
        panels=reports.dpo_panels,
    )
)
