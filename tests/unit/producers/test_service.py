"""The producer service's pure parts: partitioning, pacing, buffering, options, column checks."""

from __future__ import annotations

import numpy as np
import pytest

from distill.core.config import Config
from distill.core.exceptions import ConfigError
from producers.service import Pacer, ProducerService, _Buffer, producer_settings, user_partition
from producers.source import Chunk
from producers.synthetic import SyntheticSource


def chunk(n: int, start: int = 0, step_ms: int = 100) -> Chunk:
    pos = np.arange(start, start + n, dtype=np.int64)
    return Chunk(
        positions=pos,
        event_time_ms=pos * step_ms,
        example_ids=pos,
        users=pos % 7,
        categorical=np.zeros((n, 3), np.int64),
        dense=np.zeros((n, 8), np.float32),
        labels=np.zeros((n, 2), np.float32),
    )


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


def test_pacer():
    assert (Pacer(None, None).schedule(chunk(5), 10.0) == -np.inf).all()
    rate = Pacer(100.0, None)
    t = rate.schedule(chunk(50), 10.0)
    assert t[0] == 10.0 and t[-1] == pytest.approx(10.49)
    assert rate.schedule(chunk(10, 50), 10.2)[0] == pytest.approx(10.5)  # continues the schedule
    replay = Pacer(None, 10.0)
    t = replay.schedule(chunk(11, step_ms=1000), 5.0)  # 10 s of event time at 10x: 1 s
    assert t[0] == 5.0 and t[-1] == pytest.approx(6.0)
    both = Pacer(2.0, 10.0)
    assert both.schedule(chunk(3, step_ms=1000), 0.0).tolist() == pytest.approx([0.0, 0.5, 1.0])
    late = Pacer(10.0, None)
    late.schedule(chunk(10), 0.0)
    # Far behind schedule (a stalled broker): no burst of everything that was due.
    assert late.schedule(chunk(10, 10), 100.0)[0] == pytest.approx(99.0)


def test_buffer_takes_in_order():
    b = _Buffer()
    b.add(chunk(3), 1.0)
    b.add(chunk(4, 3), 2.0)
    assert b.rows == 7 and b.since == 1.0
    assert b.take(5).positions.tolist() == [0, 1, 2, 3, 4]
    assert b.rows == 2 and b.take(2).positions.tolist() == [5, 6] and b.rows == 0


def test_producer_settings():
    cfg = Config()
    p = producer_settings(cfg, rate=50, max_examples=None, batch_size=None)
    assert p.rate == 50 and p.max_examples is None and p.batch_size == cfg.producer.batch_size
    with pytest.raises(ConfigError, match=r"producer\.batch_size"):
        producer_settings(cfg, batch_size=0)
    with pytest.raises(ConfigError, match=r"unknown producer options \['speed'\]"):
        producer_settings(cfg, speed=2)


def test_config_must_match_the_source():
    movielens = pytest.importorskip("producers.movielens")
    try:
        source = movielens.MovieLensSource()
    except ConfigError as exc:
        pytest.skip(str(exc))
    with pytest.raises(ConfigError, match=r"does not match the movielens source.*preset"):
        ProducerService(Config(), source)
    ProducerService(Config(), SyntheticSource())  # the defaults are the synthetic layout
