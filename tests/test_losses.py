"""The masked causal-LM loss against a float64 NumPy reference, and the batch layout."""

import numpy as np
import pytest

from jaxllm.losses import lm_batch_from_rows, masked_causal_lm_loss, positions_from_segments


def test_positions_restart_per_segment():
    segments = np.array([[1, 1, 1, 2, 2, 0, 0], [3, 3, 3, 3, 3, 3, 3]])
    assert positions_from_segments(segments).tolist() == [
        [0, 1, 2, 0, 1, 0, 1],
        [0, 1, 2, 3, 4, 5, 6],
    ]


def test_targets_never_cross_documents_or_enter_padding():
    rows = np.array([[10, 11, 12, 20, 21, 0, 0]])
    segments = np.array([[1, 1, 1, 2, 2, 0, 0]])
    mask = np.array([[1, 1, 1, 1, 0, 1, 1]], np.float32)  # the caller masks token 21
    batch = lm_batch_from_rows(rows, segments, mask)
    assert batch["tokens"].tolist() == [[10, 11, 12, 20, 21, 0]]
    assert batch["targets"].tolist() == [[11, 12, 20, 21, 0, 0]]
    # 11, 12 trained; 12->20 crosses documents; 21 masked by the caller; padding never.
    assert batch["loss_mask"].tolist() == [[1, 1, 0, 0, 0, 0]]


def reference_loss(logits, rows, segments, mask):
    """Float64 NumPy: sum and count of NLL over positions whose target is trainable."""
    logits = logits.astype(np.float64)
    total, count = 0.0, 0
    batch, length = rows.shape[0], rows.shape[1] - 1
    for b in range(batch):
        for t in range(length):
            same_doc = segments[b, t] == segments[b, t + 1] and segments[b, t] != 0
            if same_doc and mask[b, t + 1]:
                row = logits[b, t]
                log_normaliser = row.max() + np.log(np.exp(row - row.max()).sum())
                total += log_normaliser - row[rows[b, t + 1]]
                count += 1
    return total, count


def test_masked_loss_equals_float64_numpy():
    rng = np.random.default_rng(0)
    batch, length, vocab = 3, 17, 50
    rows = rng.integers(0, vocab, (batch, length + 1))
    segments = np.sort(rng.integers(0, 4, (batch, length + 1)), axis=1)[:, ::-1].copy()
    mask = (rng.random((batch, length + 1)) > 0.3).astype(np.float32)
    logits = (rng.standard_normal((batch, length, vocab)) * 4).astype(np.float32)

    lm_batch = lm_batch_from_rows(rows, segments, mask)
    loss_sum, num_tokens = masked_causal_lm_loss(logits, lm_batch["targets"], lm_batch["loss_mask"])
    expected_sum, expected_count = reference_loss(logits, rows, segments, mask)
    assert expected_count > 10
    assert float(num_tokens) == expected_count
    assert float(loss_sum) == pytest.approx(expected_sum, rel=1e-6)


def test_bucket_widths_are_powers_of_two_or_four_per_octave():
    from jaxllm.losses import bucket_width

    lengths = (1, 9, 16, 17, 33, 65, 100, 129, 161, 257)
    assert [bucket_width(n, 1024) for n in lengths] == [8, 16, 16, 32, 64, 128, 128, 256, 256, 512]
    four = [bucket_width(n, 1024, per_octave=4) for n in lengths]
    assert four == [8, 10, 16, 20, 40, 80, 112, 160, 192, 320]
    assert all(n <= w < 1.25 * max(n, 8) for n, w in zip(lengths, four, strict=True))
    assert bucket_width(300, 256, per_octave=4) == 256  # never past the limit
