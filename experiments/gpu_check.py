"""GPU correctness before GPU timings: the GPU agrees with the CPU, cuDNN attention with XLA's.

    python experiments/gpu_check.py

Checks (each prints PASS or FAIL with the numbers; the exit status is the number of FAILs):
1. one forward loss of the tiny model, GPU float32 vs CPU float32 (TF32 matmuls: rel 1e-3);
2. five AdamW steps of the tiny model, GPU bfloat16 compute vs CPU float32 (rel 2e-2);
3. cuDNN vs XLA attention in bfloat16 on packed rows with grouped kv heads: relative
   Frobenius error of outputs < 1e-2 and of q/k/v gradients < 2e-2 (bf16 epsilon is 7.8e-3).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.attention import dot_product_attention, segment_mask
from jaxllm.config import MeshConfig, load_config
from jaxllm.losses import lm_batch_from_rows
from jaxllm.model import LanguageModel
from jaxllm.sharding import make_mesh
from jaxllm.state import create_train_state, learning_rate_schedule, make_optimizer
from jaxllm.steps import causal_lm_loss, jit_train_step

FAILURES = []


def report(name: str, ok: bool, detail: str) -> None:
    print(f"{'PASS' if ok else 'FAIL'} {name}: {detail}", flush=True)
    if not ok:
        FAILURES.append(name)


def train_losses(device: jax.Device, dtype: str, batches) -> list[float]:
    cfg = load_config(None, ["preset=tiny", f"model.dtype={dtype}", "optimizer.warmup_steps=2"])
    model = LanguageModel(cfg.model)
    mesh = make_mesh(MeshConfig(1, 1, 1), [device])
    tx = make_optimizer(cfg.optimizer, model, 5)
    state, shardings = create_train_state(model, tx, mesh, seed=0)
    step = jit_train_step(model, tx, learning_rate_schedule(cfg.optimizer, 5), mesh, shardings)
    losses = []
    for batch in batches:
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    return losses


def main() -> int:
    gpu, cpu = jax.devices()[0], jax.devices("cpu")[0]
    print(f"# {gpu.device_kind} vs {cpu.device_kind}; jax {jax.__version__}")
    batches = [
        lm_batch_from_rows(np.random.default_rng(i).integers(0, 264, (8, 65))) for i in range(5)
    ]

    model = LanguageModel(load_config(None, ["preset=tiny"]).model)
    params = model.init(jax.random.key(0))

    def forward_loss(device):
        on_device = jax.device_put((params, batches[0]), device)
        loss_fn = jax.jit(lambda p, b: causal_lm_loss(model, p, b)[0] / b["loss_mask"].sum())
        return float(loss_fn(*on_device))

    gpu_loss, cpu_loss = forward_loss(gpu), forward_loss(cpu)
    relative = abs(gpu_loss - cpu_loss) / cpu_loss
    report(
        "forward loss float32",
        relative < 1e-3,
        f"gpu {gpu_loss:.6f} cpu {cpu_loss:.6f} rel {relative:.1e}",
    )

    gpu_losses = np.array(train_losses(gpu, "bfloat16", batches))
    cpu_losses = np.array(train_losses(cpu, "float32", batches))
    relative = float(np.max(np.abs(gpu_losses - cpu_losses) / cpu_losses))
    report(
        "5 train steps, gpu bf16 vs cpu f32",
        relative < 2e-2,
        f"gpu {np.round(gpu_losses, 4).tolist()} cpu {np.round(cpu_losses, 4).tolist()} "
        f"max rel {relative:.1e}",
    )

    rng = np.random.default_rng(1)
    q, k, v = (
        jnp.asarray(rng.standard_normal(shape), jnp.bfloat16)
        for shape in ((2, 256, 8, 64), (2, 256, 2, 64), (2, 256, 2, 64))
    )
    segments = jnp.asarray(np.repeat([[1, 2, 3, 4], [1, 1, 2, 2]], 64, axis=1))
    mask = segment_mask(segments, segments)
    outputs, grads = {}, {}
    for backend in ("xla", "cudnn"):

        def attention(q, k, v, backend=backend):
            return dot_product_attention(q, k, v, mask, backend=backend)

        try:
            outputs[backend] = np.asarray(jax.jit(attention)(q, k, v), np.float32)
            grads[backend] = [
                np.asarray(g, np.float32)
                for g in jax.jit(
                    jax.grad(
                        lambda q, k, v, f=attention: f(q, k, v).astype(jnp.float32).sum(),
                        argnums=(0, 1, 2),
                    )
                )(q, k, v)
            ]
        except Exception as error:
            report(f"attention backend {backend}", False, str(error).splitlines()[0])
            return len(FAILURES)

    def relative_error(actual, expected):
        return float(np.linalg.norm(actual - expected) / np.linalg.norm(expected))

    out_error = relative_error(outputs["cudnn"], outputs["xla"])
    grad_error = max(
        relative_error(a, b) for a, b in zip(grads["cudnn"], grads["xla"], strict=True)
    )
    report(
        "cudnn vs xla attention (packed, GQA, bf16)",
        out_error < 1e-2 and grad_error < 2e-2,
        f"relative error: outputs {out_error:.1e}, gradients {grad_error:.1e}",
    )
    return len(FAILURES)


if __name__ == "__main__":
    raise SystemExit(main())
