"""The producers' delivery over the embedded broker: acknowledged example batches reported and
counted, the in-flight window held, and a failed delivery raised on the loop's thread."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from distill.core import metrics as m
from distill.core.config import Config
from distill.core.exceptions import DeliveryError
from distill.core.kafka import Clients
from distill.core.service import Service
from producers.delivery import COUNTS, Delivery
from producers.transaction import Sent


def sent(i: int, partition: int = 0, topic: str | None = None) -> Sent:
    return Sent(partition, f"b{i}".encode(), b"x" * 10, [], np.array([i], np.int64), 1000 * i, topic=topic)


def delivery(cfg: Config, counts: dict[str, int], max_in_flight: int, **kw: Any) -> Delivery:
    pid = cfg.producer.producer_id
    producer = Clients(cfg.kafka, pid).producer()
    return Delivery(
        producer,
        cfg.topics.examples,
        Service("producer", pid),
        (pid, "test"),
        counts,
        max_in_flight=max_in_flight,
        what="example batches",
        **kw,
    )


def metric(counter: Any, *labels: str) -> float:
    return float(counter.labels(*labels)._value.get())


def test_acknowledged_batches_are_reported_and_counted(config_with_topics: Config, unique_name: Callable):
    cfg = config_with_topics
    pid = cfg.producer.producer_id
    counts = dict(COUNTS)
    acked: list[Sent] = []
    d = delivery(cfg, counts, max_in_flight=1, on_acknowledged=acked.append)
    batches = [sent(i, partition=i % 2) for i in range(5)]
    letter = sent(9, topic=unique_name("letters"))  # not an example batch: neither reported nor counted
    for s in [*batches, letter]:
        d.produce(s)
        assert d.in_flight <= 1  # back-pressure: the next waits for the previous acknowledgement
    d.flush()
    assert acked == batches and d.in_flight == 0 and counts["max_in_flight"] == 1
    assert sorted((s.partition, s.offset) for s in batches) == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1)]
    assert letter.offset == 0
    d.count([*acked, letter])
    assert {k: counts[k] for k in ("examples", "batches", "bytes", "failed_batches")} == {
        "examples": 5,
        "batches": 5,
        "bytes": 50,
        "failed_batches": 0,
    }
    assert metric(m.PRODUCER_EXAMPLES, pid, "test") == 5 and metric(m.PRODUCER_BATCHES, pid, "test") == 5
    assert m.PRODUCER_EVENT_TIME.labels(pid)._value.get() == 4.0


def test_a_failed_delivery_is_raised_naming_the_topic(config_with_topics: Config):
    cfg = config_with_topics
    pid = cfg.producer.producer_id
    counts = dict(COUNTS)
    acked: list[Sent] = []
    d = delivery(cfg, counts, max_in_flight=8, on_acknowledged=acked.append)
    d.produce(sent(0, partition=7))  # the topic has 2 partitions: the delivery report says so
    with pytest.raises(DeliveryError, match=rf"1 example batches were not delivered to {cfg.topics.examples}; first: "):
        d.flush()
    assert acked == [] and counts["failed_batches"] == 1 and metric(m.PRODUCER_ERRORS, pid, "test") == 1
    d.raise_failures()  # raised once
    d.produce(sent(1))
    d.flush()
    assert acked[0].offset == 0
