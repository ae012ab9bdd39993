"""Host memory that XLA:CPU's steps reuse instead of faulting in afresh.

XLA:CPU takes each execution's temporaries from `malloc` and frees them when it ends.
glibc serves a request over its mmap threshold (at most 32 MB) with fresh pages from
`mmap` and unmaps them on `free`, and returns the top of a heap to the system once more
than `M_TRIM_THRESHOLD` of it is free: so each step touches its temporaries as new pages,
one page fault per 4 KiB. A reward-model gradient at the benchmark's shape on the 2-core
CPU of docs/benchmarks.md faults 15,500 times (some 60 MB) and spends 30-38 ms in the
kernel: the call takes 47 ms, against 31-36 ms with this module's setting
(`experiments/profile_reward_step.py [--default-malloc]`).

`keep_freed_host_memory` has glibc serve every size from its heap, keep what is freed
there for the next request and use one arena for all threads (an allocation of another
thread's arena would otherwise be trimmed there); a process then keeps its peak heap until
it exits, and its threads share one malloc lock (measured on 2 cores only).
"""

from __future__ import annotations

import ctypes
import importlib.metadata
import importlib.util
import os

# mallopt's parameters (glibc malloc.h)
M_TRIM_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -4, -8


def cpu_only() -> bool:
    """Whether JAX will run on the CPU: `JAX_PLATFORMS` names only cpu, or it is unset and
    no accelerator plugin (CUDA, ROCm, TPU) is installed. Decided without starting JAX
    (which would start its threads)."""
    platforms = [p for p in os.environ.get("JAX_PLATFORMS", "").split(",") if p]
    if platforms:
        return set(platforms) == {"cpu"}
    if any(os.environ.get(name) for name in ("TPU_LIBRARY_PATH", "PJRT_NAMES_AND_LIBRARY_PATHS")):
        return False  # a PJRT library JAX loads by path
    # JAX's accelerator plugins: entry points, modules of the `jax_plugins` namespace, libtpu
    plugins = importlib.metadata.entry_points(group="jax_plugins")
    return not plugins and not any(
        importlib.util.find_spec(name) for name in ("jax_plugins", "libtpu")
    )


def keep_freed_host_memory() -> bool:
    """Make glibc keep freed memory for reuse (above; no `mmap` per allocation, no trim,
    one arena). Call it before JAX starts its threads: an arena made before stays. True if
    applied; False where the C library is not glibc."""
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the C library the process runs on
    except (OSError, AttributeError, TypeError):
        return False
    settings = ((M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, 2**31 - 1), (M_ARENA_MAX, 1))
    return all(mallopt(parameter, value) == 1 for parameter, value in settings)
