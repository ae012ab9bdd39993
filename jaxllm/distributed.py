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

XLA's client aborts the whole process (a C++ fatal error, no Python exception) when the
job does not assemble in time, so before `jax.distributed.initialize` the processes meet
on the coordinator's port themselves (`_gather_processes` / `_join`): process 0 listens
there until every other process has said hello, then tells them to go on and hands the
port to JAX. A process that never starts, or a coordinator that never answers, is then
one `error:` line within `distributed.timeout_s`.
"""

from __future__ import annotations

import contextlib
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
    host, port = _host_port(address)
    if process_id == 0:
        _gather_processes(port, num_processes, cfg.timeout_s)
    else:
        _join(host, port, process_id, cfg.timeout_s)
    jax.config.update("jax_cpu_collectives_implementation", cfg.cpu_collectives)
    jax.distributed.initialize(
        coordinator_address=address,
        num_processes=num_processes,
        process_id=process_id,
        initialization_timeout=cfg.timeout_s,
    )
    return True


HELLO = "jaxllm process"  # what a process sends to process 0 before JAX starts: HELLO ID
GO = b"go\n"  # process 0's answer once every process has said hello


def _host_port(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"distributed.coordinator_address={address} is not HOST:PORT")
    return host.strip("[]"), int(port)


def _gather_processes(port: int, num_processes: int, timeout_s: float) -> None:
    """Process 0: wait on `port` until processes 1 .. N-1 have each said hello, then let
    them all go on (and close: JAX's coordinator binds the port next)."""
    try:
        if socket.has_dualstack_ipv6():  # IPv6 coordinators and IPv4 ones alike
            listener = socket.create_server(("", port), family=socket.AF_INET6, dualstack_ipv6=True)
        else:
            listener = socket.create_server(("", port))
    except OSError as error:
        raise ConfigError(
            f"process 0 cannot listen on port {port} (distributed.coordinator_address): "
            f"{error.strerror}; choose a free port"
        ) from None
    joined: dict[int, socket.socket] = {}
    deadline = time.monotonic() + timeout_s
    with listener:
        while len(joined) < num_processes - 1:
            left = deadline - time.monotonic()
            if left <= 0:
                for connection in joined.values():
                    connection.close()
                missing = [str(i) for i in range(1, num_processes) if i not in joined]
                raise ConfigError(
                    f"process 0 waited {timeout_s} s on port {port} for process(es) "
                    f"{', '.join(missing)} of {num_processes}, which never started: run the "
                    "same command on every host with its distributed.process_id (or raise "
                    "distributed.timeout_s)"
                )
            listener.settimeout(min(left, 1.0))
            try:
                connection, _ = listener.accept()
            except TimeoutError:
                continue
            process_id = _hello(connection, num_processes)
            if process_id is None:
                connection.close()  # not one of ours: ignored
                continue
            if process_id in joined:  # that process started again: its new connection
                joined[process_id].close()
            joined[process_id] = connection
        for connection in joined.values():
            with connection, contextlib.suppress(OSError):
                connection.sendall(GO)
                connection.settimeout(5.0)
                connection.recv(1)  # its close first: the port is left free of TIME_WAIT


def _hello(connection: socket.socket, num_processes: int) -> int | None:
    """The process id a newly connected process says hello with (None: no valid hello)."""
    connection.settimeout(5.0)
    try:
        words = connection.recv(64).decode("ascii", "replace").split()
    except OSError:
        return None
    if len(words) != 3 or " ".join(words[:2]) != HELLO or not words[2].isdigit():
        return None
    process_id = int(words[2])
    return process_id if 0 < process_id < num_processes else None


def _join(host: str, port: int, process_id: int, timeout_s: float) -> None:
    """Process `process_id` > 0: say hello to process 0 and wait until the whole job has."""
    deadline = time.monotonic() + timeout_s
    address = f"{host}:{port}"
    while True:
        try:
            connection = socket.create_connection((host, port), timeout=1.0)
            break
        except OSError:
            if time.monotonic() >= deadline:
                raise ConfigError(
                    f"process {process_id} could not join the job at {address} within "
                    f"{timeout_s} s: nothing answers there; check distributed.coordinator_address "
                    "and that process 0 is running"
                ) from None
            time.sleep(0.5)
    with connection:
        connection.sendall(f"{HELLO} {process_id}\n".encode())
        connection.settimeout(max(deadline - time.monotonic(), 1.0))
        try:
            answer = connection.recv(len(GO))
        except OSError:  # a timeout, or process 0 gone
            answer = b""
        if answer != GO:
            raise ConfigError(
                f"process {process_id} reached process 0 at {address}, but the job did not "
                f"assemble within {timeout_s} s: start every process (distributed.process_id "
                "0 to num_processes - 1) with the same command"
            )
