"""The training loop every stage shares.

A stage brings two functions, `batch(state, step) -> Batch` and an update
`(state, batch) -> (state, metrics)` (by default one optimizer step on its loss), plus an
optional fixed eval set and samples. Offline stages (pre-training, SFT) read their batch
by step and ignore the state; an RL stage rolls out with `state.params` and the key
`fold_in(state.rng, step)`, so a resumed run regenerates exactly the rollouts of the
uninterrupted one, and its update may apply several optimizer steps in one compiled call.

The loop does everything else, once:
- `start_state` creates the sharded TrainState (the stage's extra fields included), or
  restores the newest complete checkpoint straight onto its abstract layout;
- the update is compiled ahead of time (compile time and memory are logged);
- `StepLogger` logs every step to `metrics.jsonl` and TensorBoard one step late, so
  reading a step's metrics never stalls the device on the step being run, and stops on a
  NaN/Inf loss or gradient;
- each phase is timed: `batch_time_s` (data or rollout), `step_time_s` (the update),
  `eval_time_s`, `checkpoint_time_s`;
- evaluates and samples every `train.eval_every` steps and at the end;
- checkpoints every `checkpoint.every` steps, at the end, and on SIGTERM/SIGINT (on several
  processes all stop at the same step and save together); non-finite params are never
  saved;
- draws the loss curve into `out_dir/loss.png`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import signal
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from tqdm import tqdm

from jaxllm.checkpoint import Checkpointer
from jaxllm.config import Config, load_run_config, to_yaml
from jaxllm.errors import UserError
from jaxllm.metrics import MetricsWriter, peak_flops, plot_loss_curve, throughput
from jaxllm.model import LanguageModel
from jaxllm.run_dir import check_layout
from jaxllm.run_inputs import (
    RUN_FILE,
    changed_inputs,
    current_inputs,
    unfinished_runs,
    write_record,
)
from jaxllm.state import (
    TrainState,
    abstract_with_shardings,
    fresh_state,
    learning_rate_schedule,
    make_optimizer,
    state_shardings,
)
from jaxllm.steps import (
    LossAux,
    LossFn,
    UpdateContext,
    UpdateFn,
    causal_lm_loss,
    default_update,
    jit_eval_step,
    jit_update,
    normalised_metrics,
)

Batch = dict[str, jax.Array]


class TrainingDiverged(UserError):
    """The loss, the gradient norm or the params became NaN or infinite."""


@dataclasses.dataclass
class Stage:
    """What one training stage brings to the shared loop."""

    name: str
    model: LanguageModel
    batch: Callable[[TrainState, int], Batch]  # (state, step) -> global batch
    tokens_per_step: int
    loss_fn: LossFn = causal_lm_loss
    # (context) -> the pure update; default: one optimizer step on `loss_fn`
    update: Callable[[UpdateContext], UpdateFn] = default_update
    updates_per_step: int = 1  # optimizer updates in one `update` (the schedule's unit)
    # Adds the stage's parts to `state.extras` (ref_params, kl_coef); traced, so it also gives
    # the abstract state a checkpoint is restored onto. Runs after `initial_params`.
    extend_state: Callable[[TrainState], TrainState] | None = None
    eval_batches: Callable[[], Iterator[Batch]] | None = None
    sample: Callable[[Any, jax.Array], list[str]] | None = None  # (params, key) -> texts
    # (state, key) -> more eval metrics, e.g. the accuracy of generated answers
    extra_eval: Callable[[TrainState, jax.Array], dict[str, float]] | None = None
    # (fresh params, their shardings) -> the params a new run starts from
    initial_params: Callable[[Any, Any], Any] | None = None
    # (extended fresh state, its shardings) -> the state a new run starts from (frozen
    # params of other runs loaded in); a resumed run restores them from its checkpoint
    initial_state: Callable[[TrainState, TrainState], TrainState] | None = None
    # () -> host figures of the last batch (rollout tokens/s, completion width) for its log line
    batch_metrics: Callable[[], dict[str, float]] | None = None
    # The batch is a rollout of the params the last update makes, so nothing overlaps it:
    # each step is logged as soon as it ends, and batch_time_s / step_time_s time the
    # rollout and the update apart.
    rollouts: bool = False
    # Batches whose rows vary in length (RL rows keep the columns their longest reply
    # needs): (batch) -> its row length T, so tokens/s and MFU count the tokens trained on
    # (tokens_per_step x T / train.seq_len, FLOPs per token at T) ...
    row_length: Callable[[Batch], int] | None = None
    # ... and (batch) -> the widest batch the stage can give, abstract (ShapeDtypeStruct):
    # on a device that reports its memory, compiled before the first step so a step that
    # cannot fit is refused up front, not when the first long reply comes.
    widest_batch: Callable[[Batch], Any] | None = None
    # (step, that step's fetched metrics) -> None, on every step in step order, on every
    # process: what watches the run as it trains (PPO's collapse watch)
    watch_step: Callable[[int, dict[str, float]], None] | None = None


def by_step(batches: Callable[[int], Batch]) -> Callable[[TrainState, int], Batch]:
    """A Stage.batch for offline data: the batch depends on the step alone."""
    return lambda state, step: batches(step)


def batch_shape(batch: Batch) -> tuple:
    """A batch's structure with each array's shape and dtype: what its compiled update
    was compiled for."""
    leaves, structure = jax.tree.flatten(batch)
    return structure, tuple((leaf.shape, str(leaf.dtype)) for leaf in leaves)


def step_key(state: TrainState, step: int) -> jax.Array:
    """The random key of `step`: fold_in(state.rng, step), the same after a resume."""
    return jax.random.fold_in(jax.random.wrap_key_data(state.rng), step)


@dataclasses.dataclass
class RunResult:
    final_step: int
    stopped_by_signal: int | None = None
    already_finished: bool = False  # out_dir held a run at train.steps; nothing was changed


class _StopFlag:
    """Turns SIGTERM/SIGINT into a flag the loop checks between steps."""

    def __init__(self):
        self.signal_number: int | None = None
        self._previous = {}

    def __enter__(self):
        for number in (signal.SIGTERM, signal.SIGINT):
            self._previous[number] = signal.signal(number, self._handle)
        return self

    def _handle(self, number, frame):
        self.signal_number = number

    def __exit__(self, *exc):
        for number, handler in self._previous.items():
            signal.signal(number, handler)

    def agreed(self) -> int | None:
        """The signal any process received (the same answer on every process), or None.

        A collective on several processes, so all of them stop after the same step."""
        if jax.process_count() == 1:
            return self.signal_number
        numbers = multihost_utils.process_allgather(np.int32(self.signal_number or 0))
        return int(np.max(numbers)) or None


def start_state(
    cfg: Config, stage: Stage, mesh, tx, checkpointer: Checkpointer
) -> tuple[TrainState, TrainState]:
    """(state, shardings): the newest checkpoint restored onto the abstract state, or a
    fresh state created sharded, seeded by `stage.initial_params`, extended by the stage."""
    model = stage.model
    extend = stage.extend_state or (lambda state: state)

    def fresh() -> TrainState:
        return fresh_state(model, tx, cfg.train.seed)

    abstract = jax.eval_shape(lambda: extend(fresh()))
    shardings = state_shardings(model, tx, mesh, abstract)
    if checkpointer.latest_step() is not None:
        checkpointer.refuse_other_state_parts(abstract)
        state, _ = checkpointer.restore(abstract_with_shardings(abstract, shardings))
        checkpointer.set_aside_unreadable()
        return state, shardings
    base_shardings = state_shardings(model, tx, mesh, jax.eval_shape(fresh))
    with jax.set_mesh(mesh):
        state = jax.jit(fresh, out_shardings=base_shardings)()
        if stage.initial_params is not None:
            state = state.replace(params=stage.initial_params(state.params, shardings.params))
        if stage.extend_state is not None:
            state = jax.jit(extend, out_shardings=shardings)(state)
        if stage.initial_state is not None:
            state = stage.initial_state(state, shardings)
    return state, shardings


class StepLogger:
    """Logs train steps one step late: `record` hands over a step's (on-device) metrics and
    writes the previous step's, whose fetch waits only for that earlier step. Owns the
    throughput figures, the NaN/Inf stop and the progress bar."""

    def __init__(self, cfg: Config, stage: Stage, writer: MetricsWriter, progress, mesh):
        self.cfg, self.stage, self.writer, self.progress = cfg, stage, writer, progress
        self.peak = peak_flops(list(mesh.devices.flat))
        self.pending: tuple[int, dict, float, dict, int] | None = None
        self.last_completion = 0.0
        self.next_line_extra: dict[str, float] = {}
        self.latest_checkpoint: Callable[[], int | None] = lambda: None

    def record(
        self, step: int, metrics: dict, dispatched_at: float, times: dict, row_length: int
    ) -> None:
        """Queue step `step`'s metrics (its batch's rows `row_length` tokens long); write
        the previous step's (its fetch blocks)."""
        self.flush()
        self.pending = (step, metrics, dispatched_at, times, row_length)

    def add_to_next_line(self, values: dict[str, float]) -> None:
        """Values for the next line written: times (`*_s`) add up, sizes take the largest
        (two compilations before one line: both times, the larger memory)."""
        for name, value in values.items():
            before = self.next_line_extra.get(name)
            if before is not None:
                value = before + value if name.endswith("_s") else max(before, value)
            self.next_line_extra[name] = value

    def flush(self) -> None:
        """Fetch and log the pending step's metrics (waits for that step to finish)."""
        if self.pending is None:
            return
        step, metrics, dispatched_at, times, row_length = self.pending
        self.pending = None
        values = {k: float(v) for k, v in jax.device_get(metrics).items()}
        completed_at = time.perf_counter()
        step_time = completed_at - max(dispatched_at, self.last_completion)
        self.last_completion = completed_at
        if not (math.isfinite(values["loss"]) and math.isfinite(values["grad_norm"])):
            raise self.diverged(f"loss={values['loss']} grad_norm={values['grad_norm']}", step)
        if self.stage.watch_step is not None:
            self.stage.watch_step(step, values)
        if step % self.cfg.train.log_every == 0 or step == self.cfg.train.steps:
            tokens = self.stage.tokens_per_step * row_length / self.cfg.train.seq_len
            flops_per_token = self.stage.model.flops_per_token(row_length)
            line = {**values, **throughput(tokens, step_time, flops_per_token, self.peak)}
            self.writer.write(step, "train", {**line, **times, **self.next_line_extra})
            self.next_line_extra = {}
            self.progress.set_postfix(loss=f"{values['loss']:.4f}", refresh=False)
        self.progress.update(step - self.progress.n)

    def diverged(self, what: str, step: int) -> TrainingDiverged:
        latest = self.latest_checkpoint()
        return TrainingDiverged(
            f"{what} at step {step}: training stopped without saving; "
            + (f"the last good checkpoint (step {latest}) is intact; " if latest else "")
            + "lower optimizer.lr or check the data"
        )


@jax.jit
def _all_finite(tree: Any) -> jax.Array:
    return jnp.all(jnp.array([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


# Model keys that change the params pytree (compute dtype, attention backend, remat do not).
PARAM_SHAPE_KEYS = (
    "vocab_size",
    "num_layers",
    "num_heads",
    "num_kv_heads",
    "embed_dim",
    "head_dim",
    "mlp_dim",
    "tie_embeddings",
    "qkv_bias",
    "qk_norm",
    "sandwich_norms",
    "num_experts",
    "expert_mlp_dim",
    "scalar_heads",
)


# The adapters' shape and meaning: a run resumed with other values would restore adapters it
# cannot hold, or read the ones it holds at another scale.
LORA_KEYS = ("rank", "alpha", "rslora", "targets", "base_dtype", "train_embeddings")


def lora_summary(model: LanguageModel) -> str:
    """One line on a model's adapters: rank, scale, targets and the share that trains."""
    lora = model.lora
    trainable, _ = model.split_trainable(model.abstract_params)
    trained = sum(leaf.size for leaf in jax.tree.leaves(trainable))
    total = model.param_count()
    return (
        f"LoRA rank {lora.rank} (scale {lora.scale:g}) on {','.join(lora.targets)}: "
        f"{trained:,} of {total:,} params train ({100 * trained / total:.2f}%); the frozen "
        f"base is stored as {lora.base_dtype}"
    )


def _refuse_changed_structure(cfg: Config, saved_config: Path) -> None:
    """A run resumed with another model shape, adapters or optimizer structure cannot
    restore its checkpoint (or would misread it): say which keys differ, before anything is
    written."""
    if not saved_config.is_file():
        return
    saved = load_run_config(saved_config)
    differing = [
        f"model.{name}: {getattr(saved.model, name)!r} -> {getattr(cfg.model, name)!r}"
        for name in PARAM_SHAPE_KEYS
        if getattr(saved.model, name) != getattr(cfg.model, name)
    ]
    differing += [
        f"lora.{name}: {getattr(saved.lora, name)!r} -> {getattr(cfg.lora, name)!r}"
        for name in LORA_KEYS
        if getattr(saved.lora, name) != getattr(cfg.lora, name)
    ]
    if (saved.optimizer.grad_clip > 0) != (cfg.optimizer.grad_clip > 0):
        differing.append(
            f"optimizer.grad_clip: {saved.optimizer.grad_clip} -> {cfg.optimizer.grad_clip}"
        )
    if differing:
        raise UserError(
            f"{cfg.out_dir} holds a run with another model or optimizer ("
            + "; ".join(differing)
            + "); use a new out_dir, or the run's own settings to resume it"
        )


def refuse_another_stage(out_dir: Path, stage: str) -> None:
    """An out_dir holding another stage's run would be resumed as this stage's (or fail
    to restore, looking corrupt): refuse it before anything is written."""
    try:
        made_by = json.loads((out_dir / RUN_FILE).read_text()).get("stage")
    except (OSError, ValueError, AttributeError):
        return  # no record (a run of an older version, or none yet)
    if made_by is not None and made_by != stage:
        raise UserError(
            f"out_dir={out_dir} holds a {made_by} run; give the {stage} stage a new out_dir "
            f"(it starts from that run through its *_from / init_from key)"
        )


def device_memory_limit() -> int | None:
    """Bytes one local device can hold, where it says (GPUs, TPUs; None on the CPU)."""
    stats = jax.local_devices()[0].memory_stats() or {}
    return stats.get("bytes_limit")


def check_step_fits_memory(memory: Any, bytes_limit: int | None, cfg: Config) -> None:
    """Refuse, before the first step runs, a compiled step whose buffers (XLA's
    `memory_analysis`: arguments + outputs - aliased + temporaries + code) exceed one
    device's memory, `bytes_limit` (None: unknown, as on CPU)."""
    needed = (
        memory.argument_size_in_bytes
        + memory.output_size_in_bytes
        - memory.alias_size_in_bytes
        + memory.temp_size_in_bytes
        + memory.generated_code_size_in_bytes
    )
    if bytes_limit is not None and needed > bytes_limit:
        raise UserError(
            f"the train step needs about {needed / 2**30:.3g} GiB per device at "
            f"train.seq_len={cfg.train.seq_len}, train.batch_size={cfg.train.batch_size} but a "
            f"device has {bytes_limit / 2**30:.3g} GiB; lower train.seq_len or "
            "train.batch_size, raise train.grad_accum or mesh.fsdp, or set model.remat=full"
        )


class _Loop:
    """One run of a stage in three phases: `setup` (the state to start from; a refused start
    writes nothing), `begin` (the run's config and logs), `train` (the steps). `run` runs
    them and closes the checkpointer on every path."""

    def __init__(self, cfg: Config, stage: Stage, mesh):
        self.cfg, self.stage, self.mesh = cfg, stage, mesh
        self.out_dir = Path(cfg.out_dir)
        self.is_main = jax.process_index() == 0
        steps, updates = cfg.train.steps, stage.updates_per_step
        self.tx = make_optimizer(cfg.optimizer, stage.model, steps, updates)
        self.schedule = learning_rate_schedule(cfg.optimizer, steps, updates)
        self.eval_step = jit_eval_step(stage.model, mesh, loss_fn=stage.loss_fn)
        # Made by a later phase, None before it:
        self.checkpointer: Checkpointer | None = None  # setup: opens only a checked out_dir
        self.shardings: TrainState | None = None  # setup: those of the state it starts from
        self.start_step: int | None = None  # setup: that state's step
        self.inputs: dict | None = None  # setup: what the run reads (`jaxllm.run_inputs`)
        # setup, for a resumed run: how its inputs differ from its record (where allowed)
        self.changed_inputs: dict | None = None
        self.writer: MetricsWriter | None = None  # begin: opening it writes the logs
        self.logger: StepLogger | None = None  # train: it drives train's progress bar

    def setup(self) -> TrainState:
        """The state to start from; refuses (changing nothing) a run it cannot continue."""
        cfg = self.cfg
        check_layout(self.out_dir)
        refuse_another_stage(self.out_dir, self.stage.name)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.checkpointer = Checkpointer(
            self.out_dir / "checkpoints", cfg.checkpoint.keep, cfg.checkpoint.async_save
        )
        try:
            latest = self.checkpointer.latest_step()
            self.inputs = current_inputs(cfg, self.stage.name)
            if latest is not None:
                _refuse_changed_structure(cfg, self.out_dir / "config.yaml")
                self.changed_inputs = changed_inputs(cfg, self.inputs)
                if latest > cfg.train.steps:
                    raise UserError(
                        f"the run in {self.out_dir} is already at step {latest}, past "
                        f"train.steps={cfg.train.steps}; raise train.steps to continue it, or "
                        "choose another out_dir"
                    )
            elif self.is_main:
                for line in unfinished_runs(self.inputs):
                    print(line, file=sys.stderr, flush=True)
            state, self.shardings = start_state(
                cfg, self.stage, self.mesh, self.tx, self.checkpointer
            )
        except BaseException:
            self.checkpointer.close()
            raise
        self.start_step = int(jax.device_get(state.step))
        return state

    def begin(self) -> None:
        """Write the run's config and its inputs' record and open its logs (only once the
        state is in hand: a refused or failed start changes nothing)."""
        self.writer = MetricsWriter(self.out_dir, self.start_step, enabled=self.is_main)
        if self.is_main and self.stage.model.lora is not None:
            print(f"{self.stage.name}: {lora_summary(self.stage.model)}", flush=True)
        if self.is_main:
            (self.out_dir / "config.yaml").write_text(to_yaml(self.cfg))
            (self.out_dir / RUN_FILE).write_text(json.dumps({"stage": self.stage.name}) + "\n")
            write_record(self.out_dir, self.inputs, self.start_step, self.changed_inputs)
            _trim_samples(self.out_dir / "samples.txt", self.start_step)
            _trim_jsonl(self.out_dir / "samples.jsonl", self.start_step)

    def compile(self, state: TrainState, first_batch: Batch):
        cfg, stage = self.cfg, self.stage
        context = UpdateContext(
            stage.model, self.tx, self.schedule, stage.loss_fn, cfg.train.grad_accum
        )
        update = jit_update(stage.update(context), self.mesh, self.shardings, stage.model)
        start = time.perf_counter()
        with jax.set_mesh(self.mesh):
            executable = update.lower(state, first_batch).compile()
        extra = {"compile_time_s": time.perf_counter() - start}
        memory = executable.memory_analysis()
        if memory is not None:
            extra["compiled_temp_bytes"] = memory.temp_size_in_bytes
            check_step_fits_memory(memory, device_memory_limit(), cfg)
        self.logger.add_to_next_line(extra)
        return executable

    def evaluate(self, state: TrainState, step: int) -> None:
        start = time.perf_counter()
        key = step_key(state, step)
        values: dict[str, float] = {}
        if self.stage.eval_batches is not None:
            total: tuple[jax.Array, LossAux] | None = None
            for batch in self.stage.eval_batches():
                result = self.eval_step(state.params, batch)
                total = result if total is None else jax.tree.map(jnp.add, total, result)
            if total is not None:
                loss_sum, aux = total
                metrics = normalised_metrics(loss_sum, aux)
                values.update({k: float(v) for k, v in jax.device_get(metrics).items()})
        if self.stage.extra_eval is not None:
            values.update(self.stage.extra_eval(state, key))
        if values:
            values["eval_time_s"] = time.perf_counter() - start
            self.writer.write(step, "eval", values)
            tqdm.write(f"step {step}: eval " + ", ".join(f"{k} {v:.4f}" for k, v in values.items()))
        if self.stage.sample is not None:
            texts = self.stage.sample(state.params, key)
            if self.is_main:
                with open(self.out_dir / "samples.txt", "a") as file:
                    for text in texts:
                        file.write(f"--- step {step}\n{text}\n")
                        tqdm.write(f"--- sample at step {step}:\n{text}")

    def save(self, state: TrainState) -> None:
        step = int(jax.device_get(state.step))
        if step in self.checkpointer.all_steps():
            return
        if not bool(_all_finite(state.params)):
            raise self.logger.diverged("the params became non-finite", step)
        start = time.perf_counter()
        self.checkpointer.save(state, {"step": step})
        self.logger.add_to_next_line({"checkpoint_time_s": time.perf_counter() - start})

    def run(self) -> RunResult:
        state = self.setup()
        try:
            if self.start_step == self.cfg.train.steps:
                return RunResult(self.start_step, already_finished=True)
            self.begin()
            return self.train(state)
        finally:
            self.checkpointer.close()

    def train(self, state: TrainState) -> RunResult:
        cfg, stage = self.cfg, self.stage
        total = cfg.train.steps
        progress = tqdm(
            total=total,
            initial=self.start_step,
            disable=not self.is_main,
            desc=stage.name,
            dynamic_ncols=True,
            mininterval=1.0,
        )
        self.logger = StepLogger(cfg, stage, self.writer, progress, self.mesh)
        self.logger.latest_checkpoint = self.checkpointer.latest_step
        stop = _StopFlag()
        stopped_by = None
        try:
            with stop:
                step = self.start_step
                if cfg.train.eval_at_start and step == 0:
                    self.evaluate(state, 0)
                executables = {}  # one per batch shape (RL batches trim empty columns)
                while step < total:
                    stopped_by = stop.agreed()
                    if stopped_by is not None:
                        break
                    batch_start = time.perf_counter()
                    batch = stage.batch(state, step)
                    times = {"batch_time_s": time.perf_counter() - batch_start}
                    if stage.batch_metrics is not None:
                        times.update(stage.batch_metrics())
                    if not executables and stage.widest_batch and device_memory_limit():
                        widest = stage.widest_batch(batch)
                        executables[batch_shape(widest)] = self.compile(state, widest)
                    shape = batch_shape(batch)
                    if shape not in executables:
                        # The step before finishes before the compile starts, so that its
                        # time does not take the compile's in.
                        self.logger.flush()
                        executables[shape] = self.compile(state, batch)
                    executable = executables[shape]
                    dispatched_at = time.perf_counter()
                    state, metrics = executable(state, batch)
                    step += 1
                    row_length = stage.row_length(batch) if stage.row_length else cfg.train.seq_len
                    self.logger.record(step, metrics, dispatched_at, times, row_length)
                    if stage.rollouts:
                        self.logger.flush()
                    if step % cfg.train.eval_every == 0 or step == total:
                        self.logger.flush()
                        self.evaluate(state, step)
                    if step % cfg.checkpoint.every == 0 or step == total:
                        self.logger.flush()
                        self.save(state)
                self.logger.flush()
                if stopped_by is not None:  # stopped before train.steps: save where it stands
                    self.save(state)
                self.checkpointer.wait()  # a signal during the last save stays a flag
        finally:
            progress.close()
            self.writer.close()
        if self.is_main and (self.out_dir / "metrics.jsonl").exists():
            plot_loss_curve(self.out_dir / "metrics.jsonl", self.out_dir / "loss.png")
        return RunResult(int(jax.device_get(state.step)), stopped_by)


def _trim_samples(path: Path, step: int) -> None:
    """Drop the samples a killed run wrote past the checkpoint it resumes from (each entry
    starts with a `--- step N` line)."""
    if not path.exists():
        return
    kept, entry_step = [], 0
    for line in path.read_text().splitlines(keepends=True):
        if line.startswith("--- step ") and line[9:].strip().isdigit():
            entry_step = int(line[9:])
        if entry_step <= step:
            kept.append(line)
    path.write_text("".join(kept))


def _trim_jsonl(path: Path, step: int) -> None:
    """Drop the lines (JSON with a `step`) a killed run wrote past the step it resumes from,
    and a last line it left half-written."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines(keepends=True):
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line)
        except (json.JSONDecodeError, KeyError, TypeError):
            continue
    path.write_text("".join(kept))


def run_training(cfg: Config, stage: Stage, mesh) -> RunResult:
    """Train `stage` to `cfg.train.steps`, resuming from `cfg.out_dir` if it holds a run."""
    return _Loop(cfg, stage, mesh).run()
