"""The training loop every stage shares.

A stage supplies its loss, its batches by step, an optional fixed eval set and prompts for
samples; the loop does the rest:

- creates the sharded TrainState, or resumes the newest complete checkpoint in
  `out_dir/checkpoints` (state, RNG and data position: the step indexes the batches);
- compiles the step ahead of time and reports compile time;
- logs every step to `metrics.jsonl` and TensorBoard one step late, so reading a step's
  metrics never stalls the device on the step being run;
- evaluates and samples every `train.eval_every` steps and at the end;
- checkpoints every `checkpoint.every` steps, at the end, and on SIGTERM/SIGINT;
- stops on a NaN/Inf loss or gradient without saving, so the last good checkpoint stays
  the newest;
- draws the loss curve into `out_dir/loss.png`.
"""

from __future__ import annotations

import dataclasses
import math
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jax
import numpy as np
from tqdm import tqdm

from jaxllm.checkpoint import Checkpointer
from jaxllm.config import Config, to_yaml
from jaxllm.errors import UserError
from jaxllm.generate import Generator
from jaxllm.metrics import MetricsWriter, peak_flops, plot_loss_curve, throughput
from jaxllm.model import LanguageModel
from jaxllm.state import (
    TrainState,
    abstract_with_shardings,
    create_train_state,
    learning_rate_schedule,
    make_optimizer,
)
from jaxllm.steps import LossFn, causal_lm_loss, jit_eval_step, jit_train_step

Batch = dict[str, jax.Array]


class TrainingDiverged(UserError):
    """The loss or the gradient norm became NaN or infinite."""


@dataclasses.dataclass
class Stage:
    """What one training stage brings to the shared loop."""

    name: str
    model: LanguageModel
    train_batches: Callable[[int], Batch]  # step -> global batch
    tokens_per_step: int
    loss_fn: LossFn = causal_lm_loss
    eval_batches: Callable[[], Iterator[Batch]] | None = None
    sample: Callable[[Any, jax.Array], list[str]] | None = None  # (params, key) -> texts
    # (params, key) -> more eval metrics, e.g. the accuracy of generated answers
    extra_eval: Callable[[Any, jax.Array], dict[str, float]] | None = None
    # (fresh params, their shardings) -> the params a new run starts from
    initial_params: Callable[[Any, Any], Any] | None = None


@dataclasses.dataclass
class RunResult:
    final_step: int
    stopped_by_signal: int | None = None


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


def make_text_sampler(model: LanguageModel, tokenizer, num_samples: int, num_tokens: int):
    """A Stage.sample that continues `<|start|>` `num_samples` times (temperature 0.8), by
    at most `num_tokens` tokens and never past the context."""
    if num_samples == 0:
        return None
    num_tokens = min(num_tokens, model.cfg.max_seq_len - 1)
    generator = Generator(model, tokenizer.vocab_size, tokenizer.pad_id, num_tokens)

    def sample(params, key):
        completion = generator(
            params,
            [[tokenizer.start_id]] * num_samples,
            key,
            temperature=0.8,
            stop_ids=[tokenizer.end_id],
        )
        return [
            tokenizer.decode(t for t in completion.row(i) if t != tokenizer.end_id)
            for i in range(num_samples)
        ]

    return sample


class _Loop:
    def __init__(self, cfg: Config, stage: Stage, mesh):
        self.cfg, self.stage, self.mesh = cfg, stage, mesh
        self.out_dir = Path(cfg.out_dir)
        self.is_main = jax.process_index() == 0
        self.pending: tuple[int, dict, float] | None = None
        self.last_completion = 0.0
        self.first_line_extra: dict[str, float] = {}

    def setup(self) -> TrainState:
        cfg, model = self.cfg, self.stage.model
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if self.is_main:
            (self.out_dir / "config.yaml").write_text(to_yaml(cfg))
        self.tx = make_optimizer(cfg.optimizer, model, cfg.train.steps)
        self.schedule = learning_rate_schedule(cfg.optimizer, cfg.train.steps)
        state, self.shardings = create_train_state(model, self.tx, self.mesh, cfg.train.seed)
        self.checkpointer = Checkpointer(
            self.out_dir / "checkpoints", cfg.checkpoint.keep, cfg.checkpoint.async_save
        )
        if self.checkpointer.latest_step() is not None:
            abstract = abstract_with_shardings(jax.eval_shape(lambda: state), self.shardings)
            state, _ = self.checkpointer.restore(abstract)
        elif self.stage.initial_params is not None:
            state = state.replace(
                params=self.stage.initial_params(state.params, self.shardings.params)
            )
        self.start_step = int(jax.device_get(state.step))
        self.writer = MetricsWriter(self.out_dir, self.start_step, enabled=self.is_main)
        self.flops_per_token = model.flops_per_token(cfg.train.seq_len)
        self.peak = peak_flops(list(self.mesh.devices.flat))
        return state

    def compile(self, state: TrainState):
        step = jit_train_step(
            self.stage.model,
            self.tx,
            self.schedule,
            self.mesh,
            self.shardings,
            loss_fn=self.stage.loss_fn,
            grad_accum=self.cfg.train.grad_accum,
        )
        start = time.perf_counter()
        with jax.set_mesh(self.mesh):
            executable = step.compiled.lower(
                state, self.stage.train_batches(self.start_step)
            ).compile()
        self.first_line_extra["compile_time_s"] = time.perf_counter() - start
        memory = executable.memory_analysis()
        if memory is not None:
            self.first_line_extra["compiled_temp_bytes"] = memory.temp_size_in_bytes
        self.eval_step = jit_eval_step(
            self.stage.model, self.mesh, self.shardings.params, loss_fn=self.stage.loss_fn
        )
        return executable

    def flush(self) -> None:
        """Fetch and log the pending step's metrics (waits for that step to finish)."""
        if self.pending is None:
            return
        step, metrics, dispatched_at = self.pending
        self.pending = None
        values = {k: float(v) for k, v in jax.device_get(metrics).items()}
        completed_at = time.perf_counter()
        step_time = completed_at - max(dispatched_at, self.last_completion)
        self.last_completion = completed_at
        if not (math.isfinite(values["loss"]) and math.isfinite(values["grad_norm"])):
            latest = self.checkpointer.latest_step()
            raise TrainingDiverged(
                f"loss={values['loss']} grad_norm={values['grad_norm']} at step {step}: "
                "training stopped without saving; "
                + (f"the last good checkpoint (step {latest}) is intact; " if latest else "")
                + "lower optimizer.lr or check the data"
            )
        if step % self.cfg.train.log_every == 0 or step == self.cfg.train.steps:
            tokens = self.stage.tokens_per_step
            line = {**values, **throughput(tokens, step_time, self.flops_per_token, self.peak)}
            self.writer.write(step, "train", {**line, **self.first_line_extra})
            self.first_line_extra = {}
            self.progress.set_postfix(loss=f"{values['loss']:.4f}", refresh=False)
        self.progress.update(step - self.progress.n)

    def evaluate(self, state: TrainState, step: int) -> None:
        key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), step)
        values: dict[str, float] = {}
        if self.stage.eval_batches is not None:
            loss_sum = num_tokens = 0.0
            for batch in self.stage.eval_batches():
                result = jax.device_get(self.eval_step(state.params, batch))
                loss_sum += float(result["loss_sum"])
                num_tokens += float(result["num_tokens"])
            values["loss"] = loss_sum / max(num_tokens, 1.0)
        if self.stage.extra_eval is not None:
            values.update(self.stage.extra_eval(state.params, key))
        if values:
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
        if step not in self.checkpointer.all_steps():
            self.checkpointer.save(state, {"step": step, "data_position": step})

    def run(self) -> RunResult:
        state = self.setup()
        cfg = self.cfg
        total = cfg.train.steps
        if self.start_step >= total:
            self.checkpointer.close()
            self.writer.close()
            return RunResult(self.start_step)
        executable = self.compile(state)
        self.progress = tqdm(
            total=total,
            initial=self.start_step,
            disable=not self.is_main,
            desc=self.stage.name,
            dynamic_ncols=True,
            mininterval=1.0,
        )
        stop = _StopFlag()
        try:
            with stop:
                step = self.start_step
                if cfg.train.eval_at_start and step == 0:
                    self.evaluate(state, 0)
                while step < total and stop.signal_number is None:
                    batch = self.stage.train_batches(step)
                    dispatched_at = time.perf_counter()
                    state, metrics = executable(state, batch)
                    self.flush()  # the previous step's metrics; this step runs meanwhile
                    step += 1
                    self.pending = (step, metrics, dispatched_at)
                    if step % cfg.train.eval_every == 0 or step == total:
                        self.flush()
                        self.evaluate(state, step)
                    if step % cfg.checkpoint.every == 0 or step == total:
                        self.flush()
                        self.save(state)
                self.flush()
                if stop.signal_number is not None:
                    self.save(state)
        finally:
            self.progress.close()
            self.checkpointer.close()
            self.writer.close()
        if self.is_main and (self.out_dir / "metrics.jsonl").exists():
            plot_loss_curve(self.out_dir / "metrics.jsonl", self.out_dir / "loss.png")
        return RunResult(int(jax.device_get(state.step)), stop.signal_number)


def run_training(cfg: Config, stage: Stage, mesh) -> RunResult:
    """Train `stage` to `cfg.train.steps`, resuming from `cfg.out_dir` if it holds a run."""
    return _Loop(cfg, stage, mesh).run()


def final_metrics(out_dir: str | Path) -> dict[str, float]:
    """The last train and eval lines of a run (for benchmarks and tests)."""
    from jaxllm.metrics import read_metrics

    records = read_metrics(Path(out_dir) / "metrics.jsonl")
    train = [r for r in records if r["split"] == "train"]
    evals = [r for r in records if r["split"] == "eval"]
    return {
        "final_step": train[-1]["step"] if train else 0,
        "train_loss": train[-1]["loss"] if train else float("nan"),
        "eval_loss": evals[-1]["loss"] if evals else float("nan"),
        "median_step_time_s": float(np.median([r["step_time_s"] for r in train[1:]]))
        if len(train) > 1
        else float("nan"),
    }
