"""Host memory kept for reuse on the CPU (`jaxllm.host_memory`). The settings must come
before JAX starts its threads, so the cases that measure them run in a fresh process."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from jaxllm.host_memory import cpu_only

glibc_only = pytest.mark.skipif(
    platform.libc_ver()[0] != "glibc", reason="glibc's mallopt is what is set"
)
THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")

# A step with a 64 MB temporary, tanh(x @ w): page faults per call once warm (the heap of a
# kept process stops growing after a few dozen calls), as in a training loop.
FAULTS_PER_CALL = """
import resource, sys
from jaxllm.host_memory import keep_freed_host_memory
if sys.argv[1] == "keep":
    assert keep_freed_host_memory()
import jax, jax.numpy as jnp
step = jax.jit(lambda x, w: jnp.tanh(x @ w) @ w.T)
x, w = jnp.ones((16384, 64)), jnp.full((64, 1024), 0.01)
for _ in range(60):
    step(x, w).block_until_ready()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    step(x, w).block_until_ready()
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 10)
"""

# How much the heap grows for a 64 MB allocation after `jaxllm` ran (a command that fails
# at once): most of it where the CLI kept freed memory, none where glibc maps it apart.
HEAP_GROWTH_AFTER_CLI = """
import ctypes, numpy
from jaxllm.cli import main
assert main(["watch", "/nonexistent/run"]) == 2
libc = ctypes.CDLL("libc.so.6")
libc.sbrk.restype = ctypes.c_void_p
start = libc.sbrk(0)
block = numpy.ones(64 << 18, numpy.float32)
print((libc.sbrk(0) - start) >> 20)
"""


def run_python(code: str, *args: str, env: dict | None = None) -> float:
    result = subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, check=True
    )
    return float(result.stdout.split()[-1])


@glibc_only
@pytest.mark.skipif(
    THP.exists() and "[always]" in THP.read_text(),
    reason="huge pages for every mapping fault 512 times less by default",
)
def test_kept_memory_spares_each_step_its_page_faults():
    default = run_python(FAULTS_PER_CALL, "default")
    kept = run_python(FAULTS_PER_CALL, "keep")
    assert default > 10_000  # the 64 MB temporary faulted in afresh each call
    assert kept < default / 100


@glibc_only
@pytest.mark.parametrize("platforms, kept", [("cpu", True), ("cuda", False)])
def test_the_cli_keeps_freed_memory_on_the_cpu_only(platforms, kept):
    env = {**os.environ, "JAX_PLATFORMS": platforms}
    growth_mb = run_python(HEAP_GROWTH_AFTER_CLI, env=env)
    assert (growth_mb >= 32) == kept


@pytest.mark.parametrize(
    "platforms, expected", [("cpu", True), ("cuda", False), ("cpu,cuda", False), ("tpu", False)]
)
def test_cpu_only_reads_jax_platforms(platforms, expected, monkeypatch):
    monkeypatch.setenv("JAX_PLATFORMS", platforms)
    assert cpu_only() is expected


def test_cpu_only_without_jax_platforms_looks_for_accelerator_plugins(tmp_path, monkeypatch):
    monkeypatch.delenv("JAX_PLATFORMS", raising=False)
    for name in ("TPU_LIBRARY_PATH", "PJRT_NAMES_AND_LIBRARY_PATHS"):
        monkeypatch.delenv(name, raising=False)
    assert cpu_only()  # this install has JAX's CPU backend only
    monkeypatch.setenv("TPU_LIBRARY_PATH", "/opt/libtpu.so")
    assert not cpu_only()
    monkeypatch.delenv("TPU_LIBRARY_PATH")
    (tmp_path / "jax_plugins" / "xla_example").mkdir(parents=True)  # a namespace plugin
    (tmp_path / "jax_plugins" / "xla_example" / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert not cpu_only()
