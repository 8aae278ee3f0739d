"""The events source SIGKILLed at random points while a service writes events, restarted each
time: every event is in the examples topic exactly once.

``distill produce events`` runs as a real process against the broker over TCP. A writer thread
plays the service (JSON events keyed by user, at a steady rate); the source is killed at least
``KILLS`` times, then a last run reads to the end. The examples topic is read read_committed and
nothing is de-duplicated: each event id must appear once. On the embedded broker, which shows
aborted transactions, that rests on the recovery in ``producers.events``; on Apache Kafka on
the transactions alone.
"""

from __future__ import annotations

import random
import threading
import time

import numpy as np
import pytest
from confluent_kafka import TopicPartition

from distill.core.kafka import Clients, partition_count
from distill.core.wire import Codec
from tests.integration.producers.events_help import create_topic, events_config, json_events, write_events
from tests.integration.workers import read_all, write_config

CHUNK = 400
EVERY_S = 0.2  # the writer: 2,000 events/s until the kills are done
KILLS = 5


@pytest.mark.both_brokers
def test_sigkill_of_the_events_source_loses_and_repeats_nothing(make_config, unique_name, workers, tmp_path):
    topic = unique_name("events")
    # A short session: a restarted source gets the partitions of the killed one sooner.
    cfg = events_config(
        make_config,
        topic,
        topics={"partitions": 3},
        kafka={"session_timeout_ms": 2000},
        producer={"batch_size": 128, "linger_ms": 20},
    )
    create_topic(cfg, topic, 3)
    path = write_config(cfg, tmp_path / "config.yaml")
    args = ["produce", "events", "--config", str(path)]
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    log = tmp_path / "events.log"
    written = [0]
    done = threading.Event()

    def write() -> None:
        while not done.is_set():
            ids = range(written[0], written[0] + CHUNK)
            write_events(cfg, topic, json_events(ids), keys=[str(i % 97).encode() for i in ids])
            written[0] += CHUNK
            time.sleep(EVERY_S)

    writer = threading.Thread(target=write, daemon=True)
    writer.start()
    for kill in range(KILLS):
        source = workers(args, log)
        # Killed once it is reading (it has joined the group), at a random point after.
        source.wait(lambda s=source: s.metric("distill_events_consumed_total") > 0, "events read", timeout=60)
        time.sleep(rng.uniform(0.0, 0.5))
        assert source.alive(), f"seed {seed}: the source exited before kill {kill + 1}:\n{source.tail()}"
        source.proc.kill()
        source.proc.wait(10)
    done.set()
    writer.join(60)
    total = written[0]
    source = workers(args, log)
    source.wait_ready()  # a stop before its signal handlers are in would kill it (exit -15)
    _read_until(cfg, total, timeout=90)
    assert source.stop() == 0, source.tail()
    codec = Codec()
    batches = [codec.decode_examples(m.value(), m.headers()) for m in read_all(cfg, cfg.topics.examples)]
    ids = np.concatenate([b.example_ids for b in batches])
    counts = np.bincount(ids, minlength=total)
    repeated, missing = int((counts > 1).sum()), int((counts == 0).sum())
    assert (repeated, missing) == (0, 0), f"seed {seed}: {repeated} events repeated, {missing} missing"
    assert len({b.batch_id for b in batches}) == len(batches)
    # The kills cut into the stream: batches of several runs (each run's batch ids differ).
    assert len({b.batch_id.rsplit("-", 2)[-2] for b in batches}) >= 3, f"seed {seed}"


def _read_until(cfg, n: int, timeout: float) -> set[int]:
    """Example ids read_committed until ``n`` distinct are there (the last run has caught up)."""
    clients = Clients(cfg.kafka, "test-reader")
    consumer = clients.consumer(f"reader-{time.monotonic_ns()}")
    parts = partition_count(clients.admin(), cfg.topics.examples)
    consumer.assign([TopicPartition(cfg.topics.examples, p, 0) for p in range(parts)])
    codec, seen, deadline = Codec(), set(), time.monotonic() + timeout
    try:
        while len(seen) < n:
            assert time.monotonic() < deadline, f"{len(seen)} of {n} events within {timeout}s"
            for msg in consumer.consume(500, 0.2):
                if msg.error() is None:
                    seen.update(codec.decode_examples(msg.value(), msg.headers()).example_ids.tolist())
    finally:
        consumer.close()
    return seen
