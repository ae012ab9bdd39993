"""Comparisons as arrays and batches, for the stages that learn from rankings (reward, DPO).

Each comparison (a prompt and K >= 2 replies, see `jaxllm.data.preferences`) is one batch
element, one packed row (below), so micro-batches and devices never split a comparison
and a pair's loss does not depend on how the batch is cut.

A batch is packed: each comparison is one row holding its prompt once and then its
replies end to end, segment ids keeping the replies apart (each attends to the prompt and
to itself, its positions going on from the prompt's end), and the rows keep the columns
the longest needs (`losses.bucket_width`, four widths per octave: 64, 80, 96, 112, 128,
160, ..., at most K x `train.seq_len`). So a pair of short replies to a long prompt and a
ranking of long ones cost what their own tokens cost, and `padding_fraction`, the share
of a batch's positions that hold no token, stays small. K is the most replies
any comparison of the file has (pairs stay pairs whatever `max_replies` allows).
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from jaxllm.config import Config
from jaxllm.data.preferences import PreferenceReport, read_comparisons, render_comparison
from jaxllm.errors import DataError
from jaxllm.losses import bucket_width
from jaxllm.sharding import put_batch
from jaxllm.tokenizer import Tokenizer

PROMPT_SEGMENT = 1  # a packed row's shared prompt
FIRST_REPLY_SEGMENT = 2  # reply k of a packed row is segment FIRST_REPLY_SEGMENT + k


def shared_prompt_length(replies) -> int:
    """How many leading tokens all `replies` (`RenderedReply`) share and may hold once:
    their common prefix, cut before any reply's first reply-mask token and so that each
    keeps at least one token of its own."""
    limit = min(
        min(len(r.ids) - 1 for r in replies),
        min(r.reply_mask.index(1) if 1 in r.reply_mask else len(r.ids) for r in replies),
    )
    first = replies[0].ids
    for index in range(limit):
        if any(r.ids[index] != first[index] for r in replies[1:]):
            return index
    return max(limit, 0)


@dataclasses.dataclass
class ComparisonArrays:
    """N comparisons of up to K replies as rows of T tokens (right-padded); `take` packs a
    batch of them."""

    tokens_nkt: np.ndarray  # int32
    segment_ids_nkt: np.ndarray  # int32: 1 on a reply's prompt + reply, 0 on padding
    # (each reply rendered whole, with its prompt: `take` holds the shared prompt once)
    reply_mask_nkt: np.ndarray  # bool: the reply's tokens (contents and <|im_end|>)
    end_nk: np.ndarray  # int32: index of each reply's closing <|im_end|>
    ranks_nk: np.ndarray  # int32: 0 = best
    valid_nk: np.ndarray  # bool: a real reply (not padding of a shorter ranking)
    target_nkk: np.ndarray  # float32: P(reply i beats reply j)
    pair_nkk: np.ndarray  # bool: pairs i < j that the loss compares
    required_margin_nkk: np.ndarray  # float32: gap reply i should beat j by (`margin`; else 0)
    # int32: the leading tokens every reply of the comparison shares (its prompt and the
    # assistant header; never a reply-mask token, and each reply keeps one of its own)
    shared_prompt_n: np.ndarray

    def take(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        """The batch of comparisons `rows` (-1: an empty comparison that counts nothing),
        packed one per row: the prompt the replies share once (segment `PROMPT_SEGMENT`),
        then each reply's own tokens (segment `FIRST_REPLY_SEGMENT` + k), which attend to
        themselves and to the prompt (`prefix_segment_ids_nt`) and go on from its positions.
        Beside the tokens: `reply_mask_nt`, `source_nt` (the column whose hidden state
        predicts each token: the one before, or for a reply's first token the prompt's
        last), `end_nk` (reply k's closing token) and the comparison's `ranks_nk`,
        `valid_nk` and pair arrays. Rows are cut to the width the longest needs
        (`losses.bucket_width`, four per octave, at most K x T).

        `reply_columns_nr`: the columns of each row's reply tokens (after its prompt), in
        order, then -1. R is W minus the shortest shared prompt of all the comparisons
        (rounded up to 8, at most W): it holds any row of this width and depends on the
        width alone, so it adds no compiled shape."""
        rows = np.asarray(rows)
        source = np.maximum(rows, 0)
        t = self.tokens_nkt.shape[2]
        prompt_n = np.where(rows < 0, 0, self.shared_prompt_n[source])
        own_nkt = self._own_tokens(source)
        own_nkt[rows < 0] = False
        lengths_nk = own_nkt.sum(-1)
        starts_nk = prompt_n[:, None] + np.cumsum(lengths_nk, axis=1) - lengths_nk
        width = self.width(int((prompt_n + lengths_nk.sum(1)).max(initial=1)))
        n = len(rows)
        names = ("tokens_nt", "positions_nt", "segment_ids_nt", "prefix_segment_ids_nt")
        batch = {name: np.zeros((n, width), np.int32) for name in names}
        batch["source_nt"] = np.zeros((n, width), np.int32)
        batch["reply_mask_nt"] = np.zeros((n, width), bool)
        i, s = np.nonzero(np.arange(t) < prompt_n[:, None])  # the shared prompt
        batch["tokens_nt"][i, s] = self.tokens_nkt[source[i], 0, s]
        batch["positions_nt"][i, s] = s
        batch["segment_ids_nt"][i, s] = PROMPT_SEGMENT
        batch["source_nt"][i, s] = np.maximum(s - 1, 0)
        i, j, s = np.nonzero(own_nkt)  # each reply's own tokens
        column = starts_nk[i, j] + s - prompt_n[i]
        batch["tokens_nt"][i, column] = self.tokens_nkt[source[i], j, s]
        batch["positions_nt"][i, column] = s
        batch["segment_ids_nt"][i, column] = FIRST_REPLY_SEGMENT + j
        batch["prefix_segment_ids_nt"][i, column] = np.where(prompt_n[i] > 0, PROMPT_SEGMENT, 0)
        first = s == prompt_n[i]
        # A reply's first token is read from the prompt's last; a row's very first token
        # (no shared prompt) from nothing, so it never counts.
        batch["reply_mask_nt"][i, column] = self.reply_mask_nkt[source[i], j, s] & (
            (prompt_n[i] > 0) | ~first
        )
        batch["source_nt"][i, column] = np.where(
            first, np.where(prompt_n[i] > 0, prompt_n[i] - 1, column), column - 1
        )
        for name in ("ranks_nk", "valid_nk", "target_nkk", "pair_nkk", "required_margin_nkk"):
            batch[name] = getattr(self, name)[source].copy()
        for name in ("valid_nk", "pair_nkk"):
            batch[name][rows < 0] = False
        ends_nk = starts_nk + self.end_nk[source] - prompt_n[:, None]
        batch["end_nk"] = np.where(batch["valid_nk"], ends_nk, 0).astype(np.int32)
        r = self.reply_columns(width)
        own_n = lengths_nk.sum(1)
        offsets_r = np.arange(r)
        batch["reply_columns_nr"] = np.where(
            offsets_r < own_n[:, None], prompt_n[:, None] + offsets_r, -1
        ).astype(np.int32)
        return batch

    def _own_tokens(self, source: np.ndarray) -> np.ndarray:
        """(n, K, T) bool: the tokens of comparisons `source` past their shared prompt."""
        t = self.tokens_nkt.shape[2]
        own_nkt = self.segment_ids_nkt[source] > 0
        return own_nkt & (np.arange(t) >= self.shared_prompt_n[source][:, None, None])

    def width(self, longest: int) -> int:
        """The columns a batch whose longest packed row holds `longest` tokens keeps."""
        k, t = self.tokens_nkt.shape[1:]
        return bucket_width(longest, k * t, per_octave=4)

    def reply_columns(self, width: int) -> int:
        """R, the reply columns a batch of `width` columns reads: at most `width` minus the
        shortest shared prompt, rounded up to 8 (at most `width`)."""
        prompts = self.shared_prompt_n
        shortest_prompt = int(prompts.min()) if len(prompts) else 0
        return min(width, -(-(width - shortest_prompt) // 8) * 8)

    def row_lengths(self) -> np.ndarray:
        """(N,) the tokens of each comparison's packed row: its shared prompt and what each
        reply adds (a reply's length is its closing token's index + 1)."""
        lengths_nk = np.where(self.valid_nk, self.end_nk + 1, 0)
        own_nk = np.maximum(lengths_nk - self.shared_prompt_n[:, None], 0)
        return self.shared_prompt_n + own_nk.sum(1)

    def widest(self) -> int:
        """The columns of the widest batch these comparisons can give."""
        return self.width(int(self.row_lengths().max(initial=1)))


def comparison_arrays(
    comparisons,
    tokenizer: Tokenizer,
    seq_len: int,
    max_replies: int,
    report: PreferenceReport,
    max_replies_key: str,
) -> ComparisonArrays:
    """Render every (where, comparison); those with a reply longer than `seq_len` tokens
    are dropped (counted in `report.dropped_too_long`); more than `max_replies` replies is
    an error naming the setting `max_replies_key`. K is the most replies a kept comparison
    has."""
    kept = []
    for where, comparison in comparisons:
        if len(comparison.replies) > max_replies:
            raise DataError(
                f"{where}: {len(comparison.replies)} replies but {max_replies_key}="
                f"{max_replies}; raise {max_replies_key}"
            )
        rendered = render_comparison(tokenizer, comparison)
        if max(len(reply.ids) for reply in rendered) > seq_len:
            report.dropped_too_long += 1
            continue
        kept.append((comparison, rendered))
    n, k = len(kept), max((len(rendered) for _, rendered in kept), default=2)
    arrays = ComparisonArrays(
        tokens_nkt=np.full((n, k, seq_len), tokenizer.pad_id, np.int32),
        segment_ids_nkt=np.zeros((n, k, seq_len), np.int32),
        reply_mask_nkt=np.zeros((n, k, seq_len), bool),
        end_nk=np.zeros((n, k), np.int32),
        ranks_nk=np.zeros((n, k), np.int32),
        valid_nk=np.zeros((n, k), bool),
        target_nkk=np.full((n, k, k), 0.5, np.float32),
        pair_nkk=np.zeros((n, k, k), bool),
        required_margin_nkk=np.zeros((n, k, k), np.float32),
        shared_prompt_n=np.zeros(n, np.int32),
    )
    for row, (comparison, rendered) in enumerate(kept):
        for index, reply in enumerate(rendered):
            arrays.tokens_nkt[row, index, : len(reply.ids)] = reply.ids
            arrays.segment_ids_nkt[row, index, : len(reply.ids)] = 1
            arrays.reply_mask_nkt[row, index, : len(reply.ids)] = reply.reply_mask
            arrays.end_nk[row, index] = reply.end
            arrays.valid_nk[row, index] = True
        arrays.shared_prompt_n[row] = shared_prompt_length(rendered)
        arrays.ranks_nk[row, : len(rendered)] = comparison.ranks
        for i, j, probability in comparison.pairs():
            arrays.target_nkk[row, i, j], arrays.pair_nkk[row, i, j] = probability, True
        if comparison.margin is not None:
            arrays.required_margin_nkk[row, 0, 1] = comparison.margin
    return arrays


def comparison_splits(
    cfg: Config, tokenizer: Tokenizer, max_replies: int, max_replies_key: str
) -> tuple[ComparisonArrays, ComparisonArrays, PreferenceReport]:
    """(training, held-out, report) comparisons of `data.path`: held out are those of
    `data.eval_path`, else the last `data.val_fraction`. Refuses a split with fewer
    comparisons that fit `train.seq_len` than a batch (training) or one (held out)."""
    if not cfg.data.path:
        raise DataError("data.path is not set; pass a preference .jsonl file or folder")
    report = PreferenceReport()

    def read(path: str) -> list:
        found = list(read_comparisons(path, report))
        if not found:
            raise DataError(f"{path} holds no comparisons; add .jsonl lines (pairs or rankings)")
        return found

    comparisons = read(cfg.data.path)
    if cfg.data.eval_path:
        train_comparisons, held_out_comparisons = comparisons, read(cfg.data.eval_path)
    else:
        split = int(round(len(comparisons) * (1 - cfg.data.val_fraction)))
        train_comparisons, held_out_comparisons = comparisons[:split], comparisons[split:]
    seq_len = cfg.train.seq_len
    train, held_out = (
        comparison_arrays(part, tokenizer, seq_len, max_replies, report, max_replies_key)
        for part in (train_comparisons, held_out_comparisons)
    )
    split_fix = "" if cfg.data.eval_path else ", or change data.val_fraction"
    for name, arrays, needed, path in (
        ("training", train, cfg.train.batch_size, cfg.data.path),
        ("held-out", held_out, 1, cfg.data.eval_path or cfg.data.path),
    ):
        if len(arrays.end_nk) < needed:
            raise DataError(
                f"{path}: {len(arrays.end_nk)} {name} comparisons fit "
                f"train.seq_len={seq_len} but at least {needed} are needed; add comparisons"
                f" or raise train.seq_len{split_fix}"
            )
    return train, held_out, report


LENGTH_GROUP_BATCHES = 8  # batches whose comparisons are sorted by length together


class ComparisonBatches:
    """Global batches of `batch_size` comparisons by step: a fresh permutation of all
    comparisons each epoch (seeded by (seed, epoch)), so step s is the same batch after a
    resume. With `group_by_length` (as Hugging Face's `group_by_length`), each run of
    `LENGTH_GROUP_BATCHES` batches of the permutation is sorted by packed row length and
    its batches put in a random order: rows of like length share a batch, so a batch
    holds little padding, and every comparison still comes once an epoch. Every process
    builds the host batch and keeps its own rows."""

    def __init__(
        self,
        arrays: ComparisonArrays,
        batch_size: int,
        mesh,
        seed: int,
        group_by_length: bool = False,
    ):
        self.arrays, self.batch_size, self.seed = arrays, batch_size, seed
        self.group_by_length = group_by_length
        self.num = len(arrays.end_nk)
        self.lengths = arrays.row_lengths()
        self.orders: dict[int, np.ndarray] = {}  # by epoch, the last few
        self.mesh = mesh
        self.padding_fraction = 0.0  # of the last batch made

    def order(self, epoch: int) -> np.ndarray:
        """Epoch `epoch`'s order of the comparisons (see the class)."""
        if epoch not in self.orders:
            rng = np.random.default_rng([self.seed, epoch])
            order = rng.permutation(self.num)
            if self.group_by_length:
                span, b = LENGTH_GROUP_BATCHES * self.batch_size, self.batch_size
                for start in range(0, self.num, span):
                    run = order[start : start + span]
                    run = run[np.argsort(self.lengths[run], kind="stable")]
                    blocks = [run[i : i + b] for i in range(0, len(run), b)]
                    order[start : start + span] = np.concatenate(
                        [blocks[i] for i in rng.permutation(len(blocks))]
                    )
            self.orders = {e: o for e, o in self.orders.items() if e >= epoch - 1}
            self.orders[epoch] = order
        return self.orders[epoch]

    def rows(self, step: int) -> np.ndarray:
        positions = np.arange(step * self.batch_size, (step + 1) * self.batch_size)
        epochs = positions // self.num
        return np.array(
            [self.order(int(e))[p % self.num] for e, p in zip(epochs, positions, strict=True)]
        )

    def place(self, host: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        self.padding_fraction = float(1.0 - np.mean(host["segment_ids_nt"] > 0))
        return put_batch(host, self.mesh)

    def stage_fields(self) -> dict:
        """The `Stage` fields of a stage trained on these batches: each batch's row length
        (for tokens/s and MFU), the widest batch (the longest packed row of the data, for
        the memory check before the first step), and the last batch's
        `padding_fraction`."""
        width = self.arrays.widest()

        columns = {"_nt": width, "_nr": self.arrays.reply_columns(width)}

        def widest(batch):
            return {
                name: jax.ShapeDtypeStruct(
                    (x.shape[0], columns[name[-3:]]) if name[-3:] in columns else x.shape,
                    x.dtype,
                    sharding=x.sharding,
                )
                for name, x in batch.items()
            }

        return {
            "row_length": lambda batch: batch["tokens_nt"].shape[-1],
            "widest_batch": widest,
            "batch_metrics": lambda: {"padding_fraction": self.padding_fraction},
        }

    def __call__(self, step: int) -> dict[str, jax.Array]:
        return self.place(self.arrays.take(self.rows(step)))

    def in_order(self):
        """Every comparison once, in order, the last batch filled with empty ones."""
        count = -(-self.num // self.batch_size)
        order = np.full(count * self.batch_size, -1)
        order[: self.num] = np.arange(self.num)
        return lambda: (
            self.place(self.arrays.take(rows)) for rows in order.reshape(count, self.batch_size)
        )
