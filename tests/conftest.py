"""Test set-up: 8 CPU devices (set before JAX is imported) and shared helpers."""

import os
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One XLA compilation cache for the whole run, shared by both pytest workers and every CLI
# subprocess a test starts: the same tiny programs are compiled by many runs (a resumed run
# compiles what its first half did). Locked writes (max size set), every entry kept.
_RUN = os.environ.get("PYTEST_XDIST_TESTRUNUID") or str(os.getpid())
os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR",
    os.path.join(tempfile.gettempdir(), f"jaxllm-tests-xla-cache-{_RUN}"),
)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(8 << 30))

from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import pytest  # noqa: E402

SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"


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
