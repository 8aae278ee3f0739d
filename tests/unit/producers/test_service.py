"""The producer service's pure parts: pacing, options, column checks."""

from __future__ import annotations

import numpy as np
import pytest

from distill.core.config import Config
from distill.core.exceptions import ConfigError
from producers.service import Pacer, ProducerService, producer_settings
from producers.synthetic import SyntheticSource
from tests.unit.producers.chunks import chunk


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
