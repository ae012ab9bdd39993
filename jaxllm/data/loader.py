"""Deterministic, resumable causal-LM batches, indexed by step.

Rows of `seq_len + 1` tokens come from a `RowSource`: a token stream cut at stride
`seq_len` (pre-training) or packed conversations with loss masks (SFT). Training rows
are visited in a Grain-shuffled order that is reshuffled every epoch; the batch of step `s`
is rows `s * B ... s * B + B - 1` of that order, so the data position is the step itself
and a resumed run reads exactly the batches the uninterrupted run would have. Each process
loads only the rows that its own devices hold and assembles the global array with the
batch sharding (`jax.make_array_from_callback`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Protocol

import grain
import jax
import numpy as np
from jax.sharding import Mesh

from jaxllm.errors import DataError
from jaxllm.losses import LM_BATCH_KEYS, lm_batch_from_rows
from jaxllm.sharding import DEFAULT_RULES, ShardingRules, batch_sharding

Batch = dict[str, jax.Array]


class RowSource(Protocol):
    """Rows of seq_len + 1 tokens: ids, segment ids and (optionally) a loss mask."""

    def num_rows(self, seq_len: int) -> int: ...

    def rows(
        self, row_ids: Iterable[int], seq_len: int
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]: ...


class LMBatches:
    """Global causal-LM batches of `batch_size` rows, sharded over `mesh`."""

    def __init__(
        self,
        source: RowSource,
        seq_len: int,
        batch_size: int,
        mesh: Mesh,
        *,
        seed: int = 0,
        shuffle: bool = True,
        split: str = "training",
        rules: ShardingRules = DEFAULT_RULES,
    ):
        self.source, self.seq_len, self.batch_size = source, seq_len, batch_size
        self.num_rows = source.num_rows(seq_len)
        if self.num_rows < batch_size:
            raise DataError(
                f"the {split} split gives {self.num_rows} rows of {seq_len + 1} tokens but one "
                f"batch needs {batch_size}; use a longer corpus or lower train.batch_size or "
                "train.seq_len"
            )
        rows = grain.MapDataset.range(self.num_rows)
        self.order: Sequence[int] = rows.seed(seed).shuffle().repeat(None) if shuffle else rows
        self.sharding = batch_sharding(mesh, rules)

    def host_batch(self, first_row: int, count: int) -> dict:
        """The NumPy causal-LM batch of `count` rows starting at position `first_row`."""
        row_ids = [self.order[first_row + j] for j in range(count)]
        return lm_batch_from_rows(*self.source.rows(row_ids, self.seq_len))

    def __call__(self, step: int) -> Batch:
        """The global batch of `step`; this process reads only its devices' rows."""
        base = step * self.batch_size
        cache: dict[tuple[int, int], dict] = {}

        def local_slice(index: tuple[slice, ...]) -> dict:
            start, stop, _ = index[0].indices(self.batch_size)
            if (start, stop) not in cache:
                cache[(start, stop)] = self.host_batch(base + start, stop - start)
            return cache[(start, stop)]

        shape = (self.batch_size, self.seq_len)
        return {
            key: jax.make_array_from_callback(
                shape, self.sharding, lambda index, key=key: local_slice(index)[key][:, index[1]]
            )
            for key in LM_BATCH_KEYS
        }


def eval_batches(
    source: RowSource,
    seq_len: int,
    batch_size: int,
    num_batches: int,
    mesh: Mesh,
    rules: ShardingRules = DEFAULT_RULES,
) -> Callable[[], Iterator[Batch]]:
    """A fixed validation set: the first `num_batches` batches of rows, in order."""
    batches = LMBatches(
        source, seq_len, batch_size, mesh, shuffle=False, split="validation", rules=rules
    )
    count = min(num_batches, batches.num_rows // batch_size)
    return lambda: (batches(step) for step in range(count))
