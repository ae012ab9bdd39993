"""Compile time of the pre-training step against depth, with layers scanned or unrolled.

    python experiments/bench_compile.py [--layers 2 8 16] [--width 256]

With `jax.lax.scan` the step is traced and compiled once per layer body, so the time
should stay nearly flat as layers are added; unrolled, it grows with depth.
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np

from jaxllm.config import load_config
from jaxllm.losses import lm_batch_from_rows
from jaxllm.model import LanguageModel
from jaxllm.sharding import make_mesh
from jaxllm.state import create_train_state, learning_rate_schedule, make_optimizer
from jaxllm.steps import UpdateContext, causal_lm_loss, default_update, jit_update


def compile_seconds(num_layers: int, width: int, scan_layers: bool) -> float:
    cfg = load_config(
        None,
        [
            "preset=tiny",
            f"model.num_layers={num_layers}",
            f"model.embed_dim={width}",
            f"model.mlp_dim={3 * width}",
            "model.num_heads=4",
            "model.num_kv_heads=4",
            f"model.scan_layers={scan_layers}",
            "mesh.fsdp=1",
            "mesh.data=-1",
        ],
    )
    model = LanguageModel(cfg.model)
    mesh = make_mesh(cfg.mesh, jax.devices()[:1])
    tx = make_optimizer(cfg.optimizer, model, cfg.train.steps)
    state, shardings = create_train_state(model, tx, mesh, 0)
    schedule = learning_rate_schedule(cfg.optimizer, 10)
    step = jit_update(
        default_update(UpdateContext(model, tx, schedule, causal_lm_loss, 1)),
        mesh,
        shardings,
        model,
    )
    rows = np.zeros((8, cfg.train.seq_len + 1), np.int32)
    batch = lm_batch_from_rows(rows)
    start = time.perf_counter()
    with jax.set_mesh(mesh):
        step.lower(state, batch).compile()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[2, 8, 16])
    parser.add_argument("--width", type=int, default=256)
    args = parser.parse_args()
    print(
        f"device: {jax.devices()[0].device_kind}; width {args.width}; train step "
        "(forward + backward + AdamW), batch 8 x 64"
    )
    print(f"{'layers':>6} | {'scan compile s':>14} | {'unrolled compile s':>18}")
    for num_layers in args.layers:
        scanned = compile_seconds(num_layers, args.width, scan_layers=True)
        unrolled = compile_seconds(num_layers, args.width, scan_layers=False)
        print(f"{num_layers:>6} | {scanned:>14.2f} | {unrolled:>18.2f}", flush=True)


if __name__ == "__main__":
    main()
