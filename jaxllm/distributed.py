"""Multi-process start-up: `jax.distributed.initialize` from the config or the environment.

One process runs per host (per GPU node, per TPU VM worker), all with the same command.
Each sees every device of the job in `jax.devices()` and only its own in
`jax.local_devices()`; meshes span all of them, each process loads only its rows of a
batch, process 0 writes the logs, and every process writes its shards of a checkpoint.

Where it starts:
- `distributed.coordinator_address` (and `num_processes`, `process_id`) in the config, or
  JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID in the environment;
- on a multi-host Cloud TPU slice (TPU_WORKER_HOSTNAMES lists several hosts), with no
  arguments: JAX reads the topology from the TPU metadata;
- otherwise it is a single process and nothing is initialised.
CPU processes exchange data through gloo collectives (`distributed.cpu_collectives`).
"""

from __future__ import annotations

import os
import socket
import time

import jax

from jaxllm.config import DistributedConfig
from jaxllm.errors import ConfigError


def _setting(value, variable: str, cast=str):
    if value is not None:
        return value
    raw = os.environ.get(variable)
    return cast(raw) if raw not in (None, "") else None


def initialize(cfg: DistributedConfig) -> bool:
    """Join the job if this is one process of several; returns whether it did.

    Must run before anything touches a JAX backend.

    Raises:
        ConfigError: incomplete settings, or the coordinator could not be reached in time.
    """
    address = _setting(cfg.coordinator_address, "JAX_COORDINATOR_ADDRESS")
    num_processes = _setting(cfg.num_processes, "JAX_NUM_PROCESSES", int)
    process_id = _setting(cfg.process_id, "JAX_PROCESS_ID", int)
    tpu_hosts = [h for h in os.environ.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]
    if address is None and len(tpu_hosts) > 1:
        jax.distributed.initialize(initialization_timeout=cfg.timeout_s)
        return True
    if address is None:
        if num_processes not in (None, 1):
            raise ConfigError(
                f"distributed.num_processes={num_processes} needs "
                "distributed.coordinator_address=HOST:PORT (process 0's)"
            )
        return False
    if num_processes is None or process_id is None:
        raise ConfigError(
            "distributed.coordinator_address is set; also set "
            "distributed.num_processes and distributed.process_id"
        )
    if process_id != 0:
        _wait_for_coordinator(address, process_id, cfg.timeout_s)
    jax.config.update("jax_cpu_collectives_implementation", cfg.cpu_collectives)
    jax.distributed.initialize(
        coordinator_address=address,
        num_processes=num_processes,
        process_id=process_id,
        initialization_timeout=cfg.timeout_s,
    )
    return True


def _wait_for_coordinator(address: str, process_id: int, timeout_s: float) -> None:
    """Wait until process 0's coordinator accepts connections.

    XLA's client aborts the whole process when registration times out, so an unreachable
    coordinator is detected here first, where it can still be reported as one line."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"distributed.coordinator_address={address} is not HOST:PORT")
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((host, int(port)), timeout=1.0):
                return
        except OSError:
            if time.monotonic() >= deadline:
                raise ConfigError(
                    f"process {process_id} could not join the job at {address} within "
                    f"{timeout_s} s: nothing answers there; check distributed.coordinator_address "
                    "and that process 0 is running"
                ) from None
            time.sleep(0.5)
