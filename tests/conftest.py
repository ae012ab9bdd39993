"""Test set-up: 8 CPU devices (set before JAX is imported) and shared helpers."""

import os
import shutil
import tempfile
import warnings

_RACY_READ = "Error reading persistent compilation cache entry"


def xla_flags(devices: int) -> str:
    """XLA flags of a test process with `devices` CPU devices:
    - LLVM's quickest code generation: the suite compiles far more than it runs (tiny
      models, a few steps each), and at optimisation level 0 it takes about a quarter less
      CPU time (tests/test_dpo.py: 3 min 49 s -> 2 min 54 s);
    - ten minutes, not XLA's default, before a collective whose device threads have not
      all arrived aborts the process: on 2 cores shared by two workers and their
      subprocesses, 8 device threads may fall that far apart (twice a worker aborted, with
      no message left, in DPO's eval loop, which queues a collective per batch)."""
    return (
        f"--xla_force_host_platform_device_count={devices} --xla_backend_optimization_level=0"
        " --xla_cpu_collective_call_terminate_timeout_seconds=600"
    )


os.environ.setdefault("XLA_FLAGS", xla_flags(8))
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One XLA compilation cache for the whole run, shared by the pytest workers (they inherit
# the environment of the process that starts them) and every CLI subprocess a test starts:
# many runs compile the same tiny programs (a resumed run compiles what its first half did).
# Removed when the run ends. JAX writes an entry in place, so a process may read one that
# another is still writing: JAX then warns and compiles (the warning is silenced here; a
# process that may die mid-write runs without the cache, `helpers.cpu_environment`).
# No size limit: with one, JAX reads every entry's access time at each write.
_OWN_CACHE = "JAX_COMPILATION_CACHE_DIR" not in os.environ
if _OWN_CACHE:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="jaxllm-tests-xla-cache-")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    os.environ["PYTHONWARNINGS"] = ",".join(
        filter(None, [os.environ.get("PYTHONWARNINGS"), f"ignore:{_RACY_READ}:UserWarning"])
    )
    warnings.filterwarnings("ignore", _RACY_READ, UserWarning)

from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import pytest  # noqa: E402

# A worker that dies mid-test gets its test rerun once and never stalls the run.
pytest_plugins = ["worker_crashes"]

SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"


def pytest_sessionfinish(session):
    if _OWN_CACHE and "PYTEST_XDIST_WORKER" not in os.environ:  # the process that made it
        shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)


def skip_if_not_enough_devices(n: int):
    return pytest.mark.skipif(jax.device_count() < n, reason=f"needs {n} devices")


@pytest.fixture
def shakespeare_text() -> str:
    if not SHAKESPEARE.is_file():
        pytest.skip(f"{SHAKESPEARE} is absent (the shared corpus lives beside the checkout)")
    return SHAKESPEARE.read_text()


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    """Python's own help pages, one JSONL document per topic (no download)."""
    import json
    from pydoc_data.topics import topics

    path = tmp_path_factory.mktemp("corpus") / "pydoc.jsonl"
    path.write_text("".join(json.dumps({"text": topics[k]}) + "\n" for k in sorted(topics)))
    return path
