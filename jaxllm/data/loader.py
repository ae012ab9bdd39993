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
    """Global causal-LM batches of `batch_size` rows, sharded over `mesh`: the rows in a
    fresh shuffled order each epoch (`seed`), or in `order` when given (-1: a filler row)."""

    def __init__(
        self,
        source: RowSource,
        seq_len: int,
        batch_size: int,
        mesh: Mesh,
        *,
        seed: int = 0,
        split: str = "training",
        rules: ShardingRules = DEFAULT_RULES,
        order: Sequence[int] | None = None,
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
        if order is None:
            order = rows.seed(seed).shuffle().repeat(None)  # a new order each epoch
        self.order: Sequence[int] = order  # row ids; -1: a filler row that trains nothing
        self.sharding = batch_sharding(mesh, rules)

    def host_batch(self, first_row: int, count: int) -> dict:
        """The NumPy causal-LM batch of `count` rows starting at position `first_row`."""
        row_ids = np.array([self.order[first_row + j] for j in range(count)])
        filler = row_ids < 0
        batch = lm_batch_from_rows(*self.source.rows(np.maximum(row_ids, 0), self.seq_len))
        batch["loss_mask"][filler] = 0.0
        return batch

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
    """A fixed validation set that spans the whole split: every row when `num_batches`
    batches hold them all, else `num_batches * batch_size` rows evenly spaced over it (not
    the first rows, which may be an easy stretch). The last batch is topped up with filler
    rows that train nothing, so each row counts once."""
    num_rows = source.num_rows(seq_len)
    if num_rows < 1:
        raise DataError(
            f"the validation split gives no row of {seq_len + 1} tokens; use a longer corpus, "
            "a larger data.val_fraction or a shorter train.seq_len"
        )
    count = min(num_batches * batch_size, num_rows)
    row_ids = np.unique(np.linspace(0, num_rows - 1, count).round().astype(int)).tolist()
    num_steps = -(-len(row_ids) // batch_size)
    order = row_ids + [-1] * (num_steps * batch_size - len(row_ids))
    batches = LMBatches(
        source, seq_len, batch_size, mesh, split="validation", rules=rules, order=order
    )
    return lambda: (batches(step) for step in range(num_steps))
