"""`jaxllm pipeline`: a model's whole life, stage after stage, on the one TrainState.

    jaxllm pipeline --config FILE [key=value | STAGE.key=value ...]

The YAML lists `stages` in order (the registered stages, `jaxllm.stages.registry`, and
`label`) and holds one section per stage. A training stage's section is that stage's own
config (the keys `jaxllm STAGE --config` reads), optionally over a base file named by its
`config` key (relative to the pipeline file); the `label` section is a `LabelStageConfig`.
Each stage runs in `out_dir/STAGE` and starts from the ones before it unless its section
says otherwise, as its `StageSpec` says:

    its start key (sft.init_from, ppo.policy_from, ...)  <- the latest policy stage, or
                                                            the one its `from` key names
                                                            (a start key set on the
                                                            command line wins over both)
    its inputs (ppo.reward_from)                         <- the stage named (reward)
    data.path / data.eval_path of comparison readers     <- the label stage's files
    label samples from                                   <- the latest policy stage

Params are handed over through the checkpoint (params only, a fresh optimizer; new heads
start fresh), and each stage inherits the model and tokenizer of the run it starts from.
`out_dir/pipeline.json` records each finished stage (its wall time, and its greedy
answers to a few held-out prompts for the report), so running the same command again skips
finished stages, resumes the one that was cut off (from its newest checkpoint, reproducing
the uninterrupted run), and goes on. A finished training stage whose `train.steps` was
raised is run again (it resumes to the new count); one whose other settings changed is
kept, with a note naming them; to redo a stage from scratch, delete its folder.

The stages form a dependency graph through what each consumed: a training stage's
`inputs.json` (`jaxllm.run_inputs`: the runs it started from, at which step, and its
data files by content), the label stage's `inputs.json` (its settings and the policy run
it sampled). A stage whose inputs are no longer what they name now (an earlier stage
retrained or continued, its label files relabelled) is redone from scratch, with a line
naming each difference, and its old folder is kept as `STAGE.stale` (`.stale-2`, ...:
never over an earlier one); the stages after it then find their own inputs changed in
turn. Label files are replaced whole, never mixed across settings. A stage whose config
sets `resume.allow_changed_inputs` is not redone, and a file too large to hash that was
only copied again (same sizes) is not a change. Overrides address a stage by its name
(`ppo.train.steps=50`, `label.prompts=500`) or the pipeline (`out_dir=...`,
`stages=[pretrain]`).

Every stage's config is checked before the first stage starts, so a mistake in the last
section fails in seconds, not after the others have trained. On several hosts every host
runs the same command (the first training stage's `distributed` settings join them; the
out_dir must be on a filesystem they share, as for checkpoints), process 0 keeps the
record and the report, and the label stage, which samples on one device, is refused.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax
import yaml
from jax.experimental.multihost_utils import sync_global_devices
from omegaconf import OmegaConf

from jaxllm.checkpoint import Checkpointer
from jaxllm.config import (
    Config,
    config_differences,
    load_config,
    load_stage_config,
    merged_object,
    read_yaml,
)
from jaxllm.distributed import initialize
from jaxllm.errors import ConfigError, UserError
from jaxllm.pipeline_report import (
    LABEL,
    LABELS_EVAL,
    LABELS_TRAIN,
    policy_answers,
    report_examples,
    write_report,
)
from jaxllm.run_dir import exclusive_out_dir
from jaxllm.run_inputs import (
    RECORD_FILE,
    builtin_names,
    current_inputs,
    input_differences,
    only_touched,
    read_record,
    recorded_inputs,
    run_identity,
)
from jaxllm.stages.registry import STAGES

RECORD = "pipeline.json"


def _policy_stages() -> tuple[str, ...]:
    """Stages whose model is a policy (the ones a later stage starts from)."""
    return tuple(name for name, spec in STAGES.items() if spec.policy)


@dataclass
class LabelStageConfig:
    """Simulated people rank K replies the latest policy samples for built-in prompts
    (`jaxllm label`): training and held-out comparisons for the reward model and DPO."""

    prompts: int = 2000  # built-in training prompts
    eval_prompts: int = 500  # held-out prompts (none repeats a training one)
    replies: int = 4  # K replies sampled per prompt
    rule: str = "length"  # the labelers' gold rule (`jaxllm.rl.labelers.GOLD_RULES`)
    tau: float = 0.1  # labeler noise: P(a > b) = sigmoid((g_a - g_b) / tau)
    temperature: float = 1.0
    max_new_tokens: int = 48
    seed: int = 1


@dataclass
class PipelineConfig:
    out_dir: str = "runs/pipeline"
    stages: list[str] = field(default_factory=lambda: ["pretrain", "sft"])
    report_prompts: int = 7  # held-out built-in prompts each policy answers in the report
    # One seed for the whole life: every stage's train.seed and label.seed (a stage's own
    # override on the command line wins); null: each stage's own. Runs of several seeds
    # show how far a headline moves from seed to seed.
    seed: int | None = None
    label: LabelStageConfig = field(default_factory=LabelStageConfig)
    # and one section per registered stage (`jaxllm.stages.registry`), read by `read_plan`


@dataclass
class Plan:
    """A pipeline config, read and split: its own settings, and per training stage the base
    file, the section's values and the command line's overrides of that stage."""

    cfg: PipelineConfig
    base_files: dict[str, Path | None]
    sections: dict[str, dict[str, Any]]
    overrides: dict[str, list[str]]
    # A section's `from`: the earlier policy stage it starts from (not the latest one),
    # so two stages can branch from one (PPO and GRPO, each from SFT).
    starts_from: dict[str, str] = field(default_factory=dict)

    def stage_dir(self, stage: str) -> Path:
        return Path(self.cfg.out_dir) / stage


def read_plan(path: str | Path, overrides: list[str]) -> Plan:
    """The pipeline config of `path` with `overrides`; ConfigError on any mistake."""
    path = Path(path)
    values = read_yaml(path)
    own, per_stage = [], {stage: [] for stage in STAGES}
    section_keys: dict[str, dict[str, Any]] = {stage: {} for stage in STAGES}
    for override in overrides:
        key, equals, value = override.partition("=")
        if not equals:
            raise ConfigError(f"override '{override}' is not of the form dotted.key=value")
        stage, dot, rest = key.strip().partition(".")
        if stage in per_stage and rest in ("config", "out_dir", "from"):
            try:  # the section's own keys, read below
                section_keys[stage][rest] = yaml.safe_load(value)
            except yaml.YAMLError:
                raise ConfigError(f"override '{override}' is not a valid YAML value") from None
        elif stage in per_stage and dot:
            per_stage[stage].append(f"{rest}={value}")
        elif stage in per_stage:
            raise ConfigError(
                f"override '{override}': '{stage}' is a stage's section; set its keys "
                f"(e.g. {stage}.train.steps=10)"
            )
        else:
            own.append(override)
    stage_values = {stage: values.pop(stage, None) for stage in STAGES}
    for stage, keys in section_keys.items():
        if keys and isinstance(stage_values[stage] or {}, dict):
            stage_values[stage] = {**(stage_values[stage] or {}), **keys}
    try:
        cfg = merged_object(PipelineConfig, values, own)
    except ConfigError as error:
        raise ConfigError(f"pipeline config '{path}': {error}") from None
    known = (*STAGES, LABEL)
    unknown = [s for s in cfg.stages if s not in known]
    if unknown:
        raise ConfigError(
            f"stages: unknown stage(s) {', '.join(map(str, unknown))}; choose from "
            f"{', '.join(known)}"
        )
    if not cfg.stages or len(set(cfg.stages)) != len(cfg.stages):
        raise ConfigError(f"stages={cfg.stages} must name at least one stage, each once")
    if cfg.report_prompts < 0:
        raise ConfigError(f"report_prompts={cfg.report_prompts} must be >= 0")
    if cfg.seed is not None:
        if cfg.seed < 0:
            raise ConfigError(f"seed={cfg.seed} must be >= 0, or null (each stage's own)")
        for stage_overrides in per_stage.values():
            if not any(o.strip().startswith("train.seed=") for o in stage_overrides):
                stage_overrides.insert(0, f"train.seed={cfg.seed}")
        if not any(o.strip().startswith("label.seed=") for o in own):
            cfg.label.seed = cfg.seed
    base_files, sections, starts_from = {}, {}, {}
    for stage, section in stage_values.items():
        if section is not None and not isinstance(section, dict):
            raise ConfigError(
                f"pipeline config '{path}': '{stage}' is a stage's section, not a value; set "
                f"its keys instead (e.g. {stage}.train.steps)"
            )
        section = dict(section or {})
        base = section.pop("config", None)
        if base is not None and not isinstance(base, str):
            raise ConfigError(f"{stage}.config={base!r} must be a file name (a string)")
        if base is not None and not (path.parent / base).is_file():
            raise ConfigError(
                f"{stage}.config={base}: no such file next to {path}; name a stage config "
                "relative to the pipeline file"
            )
        if "out_dir" in section:
            raise ConfigError(
                f"{stage}.out_dir is set by the pipeline (out_dir/{stage}); set the "
                "pipeline's out_dir instead"
            )
        start = section.pop("from", None)
        start_key = STAGES[stage].start_key
        if "from" not in section_keys[stage] and any(
            o.strip().startswith(f"{start_key}=") for o in per_stage[stage]
        ):
            start = None  # the run the command line names wins over the file's `from`
        if start is not None and stage in cfg.stages:
            starts_from[stage] = _start_stage(cfg.stages, stage, start)
        base_files[stage] = path.parent / base if base is not None else None
        sections[stage] = section
    return Plan(cfg, base_files, sections, per_stage, starts_from)


def _start_stage(stages: list[str], stage: str, start: object) -> str:
    """The stage a section's `from` names, checked: a policy stage listed before `stage`,
    which has a start key to set."""
    if STAGES[stage].start_key is None:
        raise ConfigError(f"{stage}.from={start}: {stage} starts from no earlier stage; remove it")
    earlier = [s for s in stages[: stages.index(stage)] if s in _policy_stages()]
    if start not in earlier:
        raise ConfigError(
            f"{stage}.from={start}: name a policy stage that runs before {stage} "
            f"({', '.join(earlier) or 'there is none'}), or leave it out to start from the "
            "latest one"
        )
    return str(start)


def _previous(stages: list[str], index: int, kinds: tuple[str, ...]) -> str | None:
    """The latest stage before `index` of one of `kinds`."""
    return next((s for s in reversed(stages[:index]) if s in kinds), None)


def _chain(plan: Plan, stage: str) -> tuple[list[str], str | None]:
    """The settings that start `stage` from the stages before it, for those its section
    and overrides leave unset, and the pipeline stage its start key names (None when it
    names a run from outside the pipeline, or nothing). From its `StageSpec`: the start key
    <- the stage its section's `from` names, else the latest policy stage; each input key
    <- its providing stage; comparison data (data.path, data.eval_path) <- the label
    stage's files."""
    stages, spec = plan.cfg.stages, STAGES[stage]
    index = stages.index(stage)
    first_look = OmegaConf.structured(
        load_config(
            plan.base_files[stage], plan.overrides[stage], check=False, values=plan.sections[stage]
        )
    )

    def unset(key: str) -> bool:
        return OmegaConf.select(first_look, key) is None

    chained, source = {}, None
    key = spec.start_key
    named = OmegaConf.select(first_look, key) if key else None
    if named is not None and stage in plan.starts_from:
        raise ConfigError(
            f"{stage}: both {stage}.from={plan.starts_from[stage]} and {key}={named} name "
            f"where it starts; keep one ({stage}.from=null drops the first)"
        )
    if key is not None and named is None:
        source = plan.starts_from.get(stage) or _previous(stages, index, _policy_stages())
        if source is not None:
            chained[key] = plan.stage_dir(source)
    elif named is not None:  # an earlier stage of this pipeline, or a run of its own
        here = Path(named).resolve()
        source = next((s for s in stages[:index] if plan.stage_dir(s).resolve() == here), None)
    for input_key, provider in spec.inputs.items():
        if provider in stages[:index] and unset(input_key):
            chained[input_key] = plan.stage_dir(provider)
    if spec.reads_comparisons and LABEL in stages[:index] and unset("data.path"):
        chained["data.path"] = plan.stage_dir(LABEL) / LABELS_TRAIN
        if unset("data.eval_path"):
            chained["data.eval_path"] = plan.stage_dir(LABEL) / LABELS_EVAL
    # JSON strings are YAML strings: a path with ' #', ': ' or brackets stays one string.
    return [f"{k}={json.dumps(str(v))}" for k, v in chained.items()], source


def stage_config(
    plan: Plan, stage: str, start_values: dict[str, Any] | None = None
) -> tuple[Config, list[str]]:
    """`stage`'s resolved config (and the lines `load_stage_config` reports as inherited);
    `start_values`: the config of the run it starts from, when that run is not made yet."""
    chained, _ = _chain(plan, stage)
    out_dir = f"out_dir={json.dumps(str(plan.stage_dir(stage)))}"
    overrides = [out_dir, *chained, *plan.overrides[stage]]
    return load_stage_config(
        stage, plan.base_files[stage], overrides, plan.sections[stage], start_values
    )


def _stage_problems(stage: str, cfg: Config) -> list[str]:
    """What `check_plan` can see wrong in a resolved stage config beyond its own checks:
    keys it cannot start without (`StageSpec.required_keys`) still unset once chained."""
    structured, spec = OmegaConf.structured(cfg), STAGES[stage]
    problems = []
    for key in spec.required_keys():
        if OmegaConf.select(structured, key) is not None:
            continue
        provider = spec.inputs.get(key)
        if key == spec.start_key:
            provider = "a policy stage"
        elif key == "data.path" and spec.reads_comparisons:
            provider = LABEL
        where = f", or put {provider} before it" if provider else ""
        problems.append(f"{stage}.{key} is not set: set it in the {stage} section{where}")
    return problems


def _label_problems(plan: Plan) -> list[str]:
    from jaxllm.rl.labelers import GOLD_RULES

    label, problems = plan.cfg.label, []
    if label.rule not in GOLD_RULES:
        problems.append(f"label.rule={label.rule}: choose one of {', '.join(GOLD_RULES)}")
    if label.prompts < 1 or label.eval_prompts < 1 or label.replies < 2:
        problems.append("label.prompts and label.eval_prompts must be >= 1, label.replies >= 2")
    if not (0 <= label.tau < math.inf) or not (0 < label.temperature < math.inf):
        problems.append("label.tau must be >= 0 and label.temperature > 0 (both finite)")
    if label.max_new_tokens < 1:
        problems.append(f"label.max_new_tokens={label.max_new_tokens} must be >= 1")
    if _previous(plan.cfg.stages, plan.cfg.stages.index(LABEL), _policy_stages()) is None:
        problems.append("label needs a policy stage (pretrain, sft, ...) before it")
    return problems


def check_plan(plan: Plan) -> dict[str, Config]:
    """Resolve every stage's config before anything runs (keys, types and ranges, with the
    model each inherits from the stage it starts from; what each needs set), one line per
    mistake; returns the resolved configs."""
    problems, resolved = [], {}
    for stage in plan.cfg.stages:
        if stage == LABEL:
            problems += _label_problems(plan)
            continue
        try:
            chained, source = _chain(plan, stage)
            if source is not None and source not in resolved:
                continue  # the stage it starts from is wrong already
            first_look = load_config(
                plan.base_files[stage],
                [*chained, *plan.overrides[stage]],
                check=False,
                values=plan.sections[stage],
            )
            unset = _stage_problems(stage, first_look)
            if unset:  # without them the model (and so the checks) is not known yet
                problems += unset
                continue
            start = resolved[source] if source else None
            if start is not None:
                start = OmegaConf.to_container(OmegaConf.structured(start))
            resolved[stage] = stage_config(plan, stage, start)[0]
        except ConfigError as error:
            problems += [f"{stage}: {line}" for line in str(error).splitlines()]
    if problems:
        raise ConfigError("\n".join(problems))
    return resolved


def check_data_exists(plan: Plan, resolved: dict[str, Config]) -> None:
    """Every stage still to run has the data.path / data.eval_path it names, before the
    first stage runs (not the label stage's files, which the pipeline writes; a finished
    stage, which is skipped, needs none)."""
    labels = plan.stage_dir(LABEL)
    made_here = {labels / LABELS_TRAIN, labels / LABELS_EVAL}
    record = Record(Path(plan.cfg.out_dir))
    problems = []
    for stage, cfg in resolved.items():
        if record.finished(stage, cfg.train.steps, plan.stage_dir(stage)):
            continue
        for key, value in (("data.path", cfg.data.path), ("data.eval_path", cfg.data.eval_path)):
            if value is None or value in builtin_names(key) or value.startswith("hf:"):
                continue
            if Path(value) not in made_here and not Path(value).exists():
                problems.append(f"{stage}.{key} '{value}' does not exist")
    if problems:
        raise ConfigError("\n".join(problems))


def _as_plain(cfg: Any) -> dict[str, Any]:
    """A config (or one of its sections) as the JSON the record keeps (tuples as lists), to
    compare with it."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


class Record:
    """`out_dir/pipeline.json`: what each finished stage left, and the held-out prompts the
    report asks every policy (chosen once); written whole each time."""

    def __init__(self, out_dir: Path):
        self.path = out_dir / RECORD
        self.data: dict[str, Any] = {"stages": {}}
        if self.path.is_file():
            try:
                self.data = json.loads(self.path.read_text())
            except json.JSONDecodeError:
                self.data = None
            if not isinstance(self.data, dict) or not isinstance(self.data.get("stages"), dict):
                raise ConfigError(
                    f"{self.path} is not a pipeline record; move it away (finished stages "
                    "are then recognised again from their folders)"
                )

    def finished(self, stage: str, steps: int | None, folder: Path) -> bool:
        """Whether `stage` finished with these `steps` and its folder still holds it (a
        deleted folder, or one whose newest checkpoint is not at `steps`, runs again)."""
        entry = self.data["stages"].get(stage)
        if entry is None or entry.get("steps") != steps:
            return False
        if stage == LABEL:
            return all((folder / name).is_file() for name in (LABELS_TRAIN, LABELS_EVAL))
        if not (folder / "config.yaml").is_file() or not (folder / "checkpoints").is_dir():
            return False
        checkpointer = Checkpointer(folder / "checkpoints", read_only=True)
        try:
            return checkpointer.latest_step() == steps
        finally:
            checkpointer.close()

    def save(self, stage: str | None = None, entry: dict | None = None) -> None:
        if stage is not None:
            self.data["stages"][stage] = entry
        partial = self.path.with_name(f".{RECORD}.{os.getpid()}")
        partial.write_text(json.dumps(self.data, indent=1))
        os.replace(partial, self.path)


@dataclass
class PipelineResult:
    ran: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    stopped_by_signal: int | None = None
    report: Path | None = None
    summary: list[str] = field(default_factory=list)


def _label_inputs(plan: Plan) -> dict[str, Any]:
    """What the label stage consumes: its settings, and the policy run it samples."""
    policy = _previous(plan.cfg.stages, plan.cfg.stages.index(LABEL), _policy_stages())
    settings = _as_plain(plan.cfg.label)
    return {"label." + key: value for key, value in settings.items()} | {
        "label policy": [run_identity(str(plan.stage_dir(policy)))]
    }


def _stale_inputs(plan: Plan, stage: str, cfg: Config | None) -> list[str]:
    """One `key: before -> now` line per input of `stage` whose identity differs from what
    its folder's `inputs.json` recorded (none without a record, or when the stage's config
    accepts changed inputs: `resume.allow_changed_inputs`). A file too large to hash whose
    size is unchanged but modification time is not (copied again) is not a change here:
    redoing a stage from scratch on it would be a guess."""
    folder = plan.stage_dir(stage)
    recorded = recorded_inputs(read_record(folder / RECORD_FILE))
    if stage == LABEL:
        current = _label_inputs(plan)
        settings = [
            f"{key}: {recorded[key]} -> {value}"
            for key, value in current.items()
            if key in recorded and key != "label policy" and recorded[key] != value
        ]
        policy = {"label policy": current["label policy"]}
        return settings + list(input_differences(recorded, policy).values())
    if cfg.resume.allow_changed_inputs:
        return []
    current = current_inputs(cfg, stage)
    for key, identity in current.items():
        if only_touched(recorded.get(key), identity):
            current[key] = recorded[key]
    return list(input_differences(recorded, current).values())


def _set_aside(folder: Path) -> Path:
    """Move a stale stage's folder to `<folder>.stale` (or `.stale-2`, ... : never over an
    earlier one)."""
    aside = folder.with_name(folder.name + ".stale")
    number = 1
    while aside.exists():
        number += 1
        aside = folder.with_name(f"{folder.name}.stale-{number}")
    folder.rename(aside)
    return aside


def _run_label(plan: Plan) -> dict:
    """Sample and rank replies of the latest policy (training and held-out files)."""
    from jaxllm.data.prompts import builtin_split
    from jaxllm.label import label_agreement, sample_and_label
    from jaxllm.stages.common import load_run

    cfg = plan.cfg.label
    policy = _previous(plan.cfg.stages, plan.cfg.stages.index(LABEL), _policy_stages())
    run = load_run(plan.stage_dir(policy), "the label stage's policy")
    out = plan.stage_dir(LABEL)
    out.mkdir(parents=True, exist_ok=True)
    if not (out / RECORD_FILE).is_file():
        record = {"inputs": _label_inputs(plan)}
        (out / RECORD_FILE).write_text(json.dumps(record, indent=1) + "\n")
    train, held_out = builtin_split(cfg.prompts, cfg.eval_prompts, cfg.seed)
    reports = {}
    for name, prompts, seed in (
        (LABELS_TRAIN, train, cfg.seed),
        (LABELS_EVAL, held_out, cfg.seed + 1),
    ):
        if (out / name).is_file():  # written whole before the stage was cut off
            lines = len((out / name).read_text().splitlines())
            print(f"label: {out / name}: kept from the run that was cut off ({lines} lines)")
            reports[name] = {"written": lines}
            continue
        report = sample_and_label(
            run,
            prompts,
            out / name,
            replies=cfg.replies,
            rule=cfg.rule,
            tau=cfg.tau,
            temperature=cfg.temperature,
            max_new_tokens=cfg.max_new_tokens,
            seed=seed,
        )
        print(f"label: {out / name}: {report.summary()}")
        reports[name] = dataclasses.asdict(report)
    return {"reports": reports, "agreement": label_agreement(out / LABELS_EVAL, cfg.tau)}


@contextlib.contextmanager
def _naming_stage(stage: str) -> Iterator[None]:
    """A user error raised while `stage` runs says which stage it came from on each line."""
    try:
        yield
    except UserError as error:
        lines = str(error).splitlines() or [type(error).__name__]
        raise type(error)("\n".join(f"pipeline stage {stage}: {line}" for line in lines)) from None


def _run_training_stage(stage: str, cfg: Config):
    with exclusive_out_dir(cfg.out_dir) if jax.process_index() == 0 else contextlib.nullcontext():
        return STAGES[stage].run(cfg)


def _report_answers(plan: Plan, record: Record, stage: str) -> None:
    """Add `stage`'s greedy answers to the report's held-out prompts to the record (best
    effort: a policy that cannot answer here, e.g. one too large for one device, gets a
    note instead)."""
    if "report_examples" not in record.data:
        record.data["report_examples"] = report_examples(plan, plan.cfg.report_prompts)
    try:
        answers = policy_answers(plan.stage_dir(stage), record.data["report_examples"])
    except (UserError, RuntimeError, MemoryError) as error:
        print(f"note: the report has no answers of {stage}: {str(error).splitlines()[0]}")
        return
    record.data["stages"][stage]["answers"] = answers
    record.save()


def run_pipeline(config_path: str | Path, overrides: list[str]) -> PipelineResult:
    """Run (or continue) the pipeline of `config_path`; write the report at the end."""
    plan = read_plan(config_path, overrides)
    resolved = check_plan(plan)
    check_data_exists(plan, resolved)
    if resolved:
        initialize(next(iter(resolved.values())).distributed)
    several = jax.process_count() > 1
    if several and LABEL in plan.cfg.stages:
        raise ConfigError(
            "the label stage samples on one process; run it in a pipeline of one host, or "
            "give the reward stage comparisons of your own (reward.data.path)"
        )
    is_main = jax.process_index() == 0
    say = print if is_main else (lambda *args, **kwargs: None)
    out_dir = Path(plan.cfg.out_dir)
    result = PipelineResult()
    with exclusive_out_dir(out_dir) if is_main else contextlib.nullcontext():
        record = Record(out_dir)
        for stage in plan.cfg.stages:
            # Resolved again now that the run it starts from exists: a stage may add to the
            # model it writes (PPO's value head), which the check could not know.
            cfg, inherited = (None, []) if stage == LABEL else stage_config(plan, stage)
            steps = cfg.train.steps if cfg is not None else None
            folder = plan.stage_dir(stage)
            stale = _stale_inputs(plan, stage, cfg)
            if several:  # every process has read the records before any is moved
                sync_global_devices(f"pipeline {stage} inputs compared")
            if stale and is_main:
                aside = _set_aside(folder)
                record.data["stages"].pop(stage, None)
                record.save()
                say(
                    f"pipeline: {stage}: redone from scratch, what it was made from "
                    f"changed ({'; '.join(stale)}); the earlier run is kept in {aside}"
                )
            if several:
                sync_global_devices(f"pipeline {stage} set aside")
            if record.finished(stage, steps, folder):
                say(f"pipeline: {stage}: finished before, skipped ({folder})")
                recorded = record.data["stages"][stage].get("config")
                changed = (
                    []
                    if cfg is None or recorded is None
                    else config_differences(recorded, _as_plain(cfg))
                )
                if changed:
                    say(
                        f"note: {stage} finished with other settings than these ("
                        + "; ".join(changed[:5])
                        + ("; ..." if len(changed) > 5 else "")
                        + f"); it is kept as it is; delete {folder} (and the stages after it) "
                        "to redo it with them"
                    )
                result.skipped.append(stage)
                continue
            say(f"pipeline: {stage}: running in {plan.stage_dir(stage)}", flush=True)
            start = time.perf_counter()
            entry: dict[str, Any] = {"steps": steps}
            if cfg is not None:
                entry["config"] = _as_plain(cfg)  # as asked, before the stage adds to it
            if stage == LABEL:
                with _naming_stage(stage):
                    entry.update(_run_label(plan))
            else:
                if inherited:
                    say(f"{stage}: inherited from the run it starts from:", *inherited, sep="\n  ")
                with _naming_stage(stage):
                    outcome = _run_training_stage(stage, cfg)
                if outcome.stopped_by_signal is not None:
                    result.stopped_by_signal = outcome.stopped_by_signal
                    name = signal.Signals(outcome.stopped_by_signal).name
                    say(
                        f"pipeline: stopped by {name} in {stage} at step {outcome.final_step}; "
                        "run the same command to resume"
                    )
                    return result
            entry["wall_s"] = round(time.perf_counter() - start, 1)
            result.ran.append(stage)
            if not is_main:
                continue
            record.save(stage, entry)
            if stage in _policy_stages() and plan.cfg.report_prompts and not several:
                _report_answers(plan, record, stage)
        if is_main:
            result.report, result.summary = write_report(plan, record.data)
    return result
