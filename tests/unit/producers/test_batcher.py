"""Buffering accepted examples by partition and making them into encoded example batches."""

from __future__ import annotations

import numpy as np

from distill.core.wire import Codec
from producers.batcher import Batcher, Buffer, user_partition
from producers.recovery import read_batch_headers
from producers.synthetic import SyntheticSource
from tests.unit.producers.chunks import chunk


def test_user_partition_is_stable_and_even():
    users = np.arange(100_000, dtype=np.int64)
    p = user_partition(users, 4)
    assert np.array_equal(p, user_partition(users.copy(), 4))
    counts = np.bincount(p, minlength=4)
    assert counts.min() > 0.95 * counts.mean()
    # Pinned: a change here would move users to other partitions in a running deployment.
    ids = np.array([0, 1, 2, 3, 1000, 12345])
    assert user_partition(ids, 4).tolist() == [0, 0, 3, 2, 1, 1]
    assert user_partition(ids, 7).tolist() == [0, 0, 5, 2, 5, 1]


def test_buffer_takes_in_order():
    b = Buffer()
    b.add(chunk(3), 1.0)
    b.add(chunk(4, 3), 2.0)
    assert b.rows == 7 and b.since == 1.0
    assert b.take(5).positions.tolist() == [0, 1, 2, 3, 4]
    assert b.rows == 2 and b.take(2).positions.tolist() == [5, 6] and b.rows == 0


def batcher(by_user: bool, partitions: int) -> Batcher:
    b = Batcher("p1", SyntheticSource(), Codec(), by_user=by_user, size=4, linger_s=1.0)
    b.layout(partitions)
    return b


def test_round_robin_batches_full_then_lingered():
    b = batcher(by_user=False, partitions=3)
    b.next_seq = 7  # a resumed producer continues its sequence
    assert b.oldest() is None
    b.add(chunk(10), 5.0)
    assert b.rows == 10 and b.oldest() == 5.0
    full = list(b.ready(5.5))  # the 2 left over have not lingered yet
    assert [s.positions.tolist() for s in full] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert [s.partition for s in full] == [0, 1] and b.rows == 2
    assert list(b.ready(7.0, lingered=False)) == []  # the events source sends partials only with a commit
    (late,) = b.ready(6.0)
    assert late.positions.tolist() == [8, 9] and late.partition == 2 and b.rows == 0 and b.oldest() is None
    sent = [*full, late]
    assert [s.key.decode().rsplit("-", 1)[1] for s in sent] == ["7", "8", "9"] and b.next_seq == 10
    assert len({s.key.decode().split("-")[1] for s in sent}) == 1  # one run token
    for s, seq in zip(sent, (7, 8, 9), strict=True):
        pid, got_seq, places = read_batch_headers(s.headers)
        assert (pid, got_seq, places.tolist()) == ("p1", seq, s.positions.tolist())
        decoded = Codec().decode_examples(s.value, s.headers)
        assert decoded.seq == seq and decoded.example_ids.tolist() == s.positions.tolist()
        assert s.newest_ms == int(s.positions.max()) * 100 and s.topic is None


def test_by_user_keeps_each_user_on_its_partition_in_stream_order():
    b = batcher(by_user=True, partitions=4)
    b.add(chunk(30), 0.0)
    sent = list(b.ready(0.0, force=True))
    assert b.rows == 0 and sorted(p for s in sent for p in s.positions.tolist()) == list(range(30))
    for s in sent:
        assert (user_partition(s.positions % 7, 4) == s.partition).all()
        assert (np.diff(s.positions) > 0).all()
    b.add(chunk(3, 30), 1.0)
    b.clear()
    assert b.rows == 0 and list(b.ready(9.0, force=True)) == []
