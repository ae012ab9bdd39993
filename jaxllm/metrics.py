"""Throughput and MFU, and the writers of a run's metrics (JSONL, TensorBoard, a PNG).

MFU = (training FLOPs per token x tokens per second) / peak FLOP/s of the devices used,
with FLOPs per token = 6N + 12·L·H·Q·T (PaLM, appendix B; `LanguageModel.flops_per_token`).
Peaks are the vendors' dense bf16 figures; on CPU, a measured float32 matmul rate, so that
a CPU MFU says how close the step comes to what this machine's matmuls can do.
"""

from __future__ import annotations

import functools
import json
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.data.jsonl import json_lines, read_utf8
from jaxllm.errors import DataError

# Dense bf16 peak FLOP/s per chip, by a substring of `device.device_kind`.
PEAK_BF16_FLOPS = {
    "H200": 989e12,
    "H100": 989e12,
    "A100": 312e12,
    "TPU v6": 918e12,  # v6e (Trillium)
    "TPU v5p": 459e12,
    "TPU v5 lite": 197e12,  # v5e
    "TPU v5": 459e12,
    "TPU v4": 275e12,
}


def _best_seconds_on_cpu(function, array: jax.Array, repeats: int) -> float:
    """Fastest of `repeats` timed runs of jitted `function(array)` on the first CPU device."""
    compiled = jax.jit(function)
    array = jax.device_put(array, jax.devices("cpu")[0])
    compiled(array).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        compiled(array).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return best


@functools.cache
def measured_cpu_matmul_flops(size: int = 1024, repeats: int = 10) -> float:
    """Best float32 matmul rate of one CPU device (XLA uses every core for it)."""
    square = jnp.ones((size, size), jnp.float32)
    return 2 * size**3 / _best_seconds_on_cpu(lambda x: x @ x, square, repeats)


# Peak HBM bandwidth per chip, bytes/s, by a substring of `device.device_kind`.
PEAK_MEMORY_BANDWIDTH = {
    "H200": 4.8e12,
    "H100": 3.35e12,
    "A100": 2.0e12,
    "TPU v6": 1.64e12,
    "TPU v5p": 2.76e12,
    "TPU v5 lite": 0.82e12,
    "TPU v5": 2.76e12,
    "TPU v4": 1.2e12,
}


@functools.cache
def measured_cpu_memory_bandwidth(megabytes: int = 256, repeats: int = 5) -> float:
    """Best read + write rate of a large elementwise op on one CPU device, bytes/s."""
    vector = jnp.ones((megabytes << 18,), jnp.float32)
    return 2 * vector.nbytes / _best_seconds_on_cpu(lambda x: x * 1.5, vector, repeats)


def memory_bandwidth(device: jax.Device) -> float:
    """Bytes/s one device can read (CPU: measured; accelerators: datasheet)."""
    if device.platform == "cpu":
        return measured_cpu_memory_bandwidth()
    for name, bandwidth in PEAK_MEMORY_BANDWIDTH.items():
        if name.lower() in device.device_kind.lower():
            return bandwidth
    return float("nan")


def peak_flops(devices: list[jax.Device]) -> float:
    """Peak FLOP/s of these devices together (CPU: the host's measured matmul rate)."""
    kind = devices[0].device_kind
    if devices[0].platform == "cpu":
        return measured_cpu_matmul_flops()  # virtual CPU devices share the same cores
    for name, flops in PEAK_BF16_FLOPS.items():
        if name.lower() in kind.lower():
            return flops * len(devices)
    return float("nan")


def decode_bound_tokens_per_sec(model, batch: int, slots: int, bandwidth: float) -> float:
    """The memory-bandwidth bound on decoding, tokens/s: every step reads the params and
    the whole KV cache of `slots` slots once, at the model's dtype,
    batch / ((params + 2 L B S K H) x itemsize / bandwidth)."""
    cfg, itemsize = model.cfg, np.dtype(model.dtype).itemsize
    cache = 2 * cfg.num_layers * batch * slots * cfg.num_kv_heads * cfg.resolved_head_dim
    return batch * bandwidth / ((model.param_count() + cache) * itemsize)


def throughput(
    tokens_per_step: int, step_time_s: float, flops_per_token: float, peak: float
) -> dict[str, float]:
    tokens_per_sec = tokens_per_step / step_time_s
    return {
        "tokens_per_sec": tokens_per_sec,
        "step_time_s": step_time_s,
        "mfu": flops_per_token * tokens_per_sec / peak,
    }


class MetricsWriter:
    """Appends metric lines to `metrics.jsonl` and TensorBoard (process 0 only)."""

    def __init__(self, out_dir: Path, resume_step: int, enabled: bool = True):
        self.enabled = enabled
        self.path = out_dir / "metrics.jsonl"
        if not enabled:
            return
        self._truncate_after(resume_step)
        self.tensorboard = _summary_writer_class()(
            str(out_dir / "tensorboard"), purge_step=resume_step + 1 if resume_step else None
        )

    def _truncate_after(self, step: int) -> None:
        """Drop lines a killed run wrote past the checkpoint it resumes from; from step 0
        (killed before its first checkpoint) every line, since the run writes them all
        again (its step-0 eval included), as an uninterrupted run would have."""
        if not self.path.exists():
            return
        kept = [
            line
            for line_number, line in enumerate(self.path.read_text().splitlines(), start=1)
            if line.strip() and step > 0 and _line_step(line, f"{self.path}:{line_number}") <= step
        ]
        self.path.write_text("".join(line + "\n" for line in kept))

    def write(self, step: int, split: str, values: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"step": step, "split": split, **{k: _plain(v) for k, v in values.items()}}
        with open(self.path, "a") as file:
            file.write(json.dumps(record) + "\n")
        for name, value in record.items():
            if isinstance(value, (int, float)) and name != "step":
                self.tensorboard.add_scalar(f"{split}/{name}", value, step)

    def close(self) -> None:
        if self.enabled:
            self.tensorboard.close()


def _summary_writer_class() -> type:
    """tensorboardX's `SummaryWriter`, imported without torch. tensorboardX imports torch,
    where it is installed, only to accept torch tensors, and that import takes about 1.5 s
    of every run's start; we log Python floats."""
    import sys

    if "torch" in sys.modules:
        from tensorboardX import SummaryWriter

        return SummaryWriter
    sys.modules["torch"] = None  # `import torch` raises ImportError while this is set
    try:
        from tensorboardX import SummaryWriter
    finally:
        del sys.modules["torch"]
    return SummaryWriter


def _line_step(line: str, where: str) -> int:
    """The step of one metrics.jsonl line; a line that is not a metrics record is an error."""
    try:
        record = json.loads(line)
        return int(record["step"])
    except (ValueError, TypeError, KeyError):
        raise DataError(
            f"{where}: not a metrics line (JSON with a 'step'); delete or mend that line, "
            "then run again to resume"
        ) from None


def _plain(value: Any) -> Any:
    if isinstance(value, (np.generic, np.ndarray, jax.Array)):
        return np.asarray(value).item()
    return value


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of a `metrics.jsonl`. A last line without its newline is one a live run
    is still writing and is left out; any other line that is not a JSON object is an
    error naming the file and line."""
    text = read_utf8(Path(path))
    records = []
    for where, record in json_lines(path, text[: text.rfind("\n") + 1]):
        if not isinstance(record, dict):
            raise DataError(f"{where}: a metrics line must be a JSON object")
        records.append(record)
    return records


def plot_loss_curve(metrics_path: Path, png_path: Path) -> None:
    """Train and eval loss against step, saved as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(metrics_path)
    figure, axes = plt.subplots(figsize=(7, 4))
    for split, style in (("train", "-"), ("eval", "o-")):
        points = [(r["step"], r["loss"]) for r in records if r["split"] == split and "loss" in r]
        if points:
            steps, losses = zip(*points, strict=True)
            axes.plot(steps, losses, style, label=split, linewidth=1)
    axes.set_xlabel("step")
    axes.set_ylabel("loss (nats per token)")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(png_path, dpi=120)
    plt.close(figure)
