"""What recovery reads of an example batch without decoding it: producer, sequence, positions."""

from __future__ import annotations

import numpy as np

from producers.recovery import batch_headers, read_batch_headers


def test_headers_round_trip_scattered_positions_compactly():
    rng = np.random.default_rng(0)
    positions = np.sort(rng.choice(10**9, size=256, replace=False)).astype(np.int64)
    headers = batch_headers("producer-0", 41, positions)
    pid, seq, back = read_batch_headers([("schema", b"x"), *headers])
    assert (pid, seq) == ("producer-0", 41) and np.array_equal(back, positions)
    run = batch_headers("p", 0, np.arange(5_000, 5_256))
    assert len(dict(run)["distill.positions"]) < 64  # consecutive positions: a few bytes


def test_batches_without_the_headers_are_not_ours():
    assert read_batch_headers(None) is None
    assert read_batch_headers([("distill.producer", b"p"), ("distill.seq", b"1")]) is None
