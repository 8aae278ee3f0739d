"""Shared set-up of the worker benchmarks: a broker, a produced synthetic stream, timing."""

from __future__ import annotations

import logging
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from distill.core.config import Config, load_config
from distill.core.kafka import Clients, partition_count
from distill.core.wire import Codec, ExampleBatch
from distill.local.broker import EmbeddedBroker
from producers.service import run_producer


@contextmanager
def stream(examples: int, partitions: int = 4, **overrides):
    """A broker with ``examples`` synthetic examples produced; yields the config."""
    for name in ("distill", "producers", "teacher_worker", "student_worker"):
        logging.getLogger(name).setLevel(logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp, EmbeddedBroker(log_file=Path(tmp) / "broker.log") as broker:
        cfg = load_config(
            None,
            environ={},
            state_dir=tmp,
            kafka={"bootstrap_servers": broker.bootstrap},
            topics={"partitions": partitions},
            synthetic={"examples": examples},
            **overrides,
        )
        run_producer(cfg, "synthetic", handle_signals=False, serve_http=False, max_examples=examples)
        yield cfg


@contextmanager
def one_thread():
    """Torch on one thread, as in the worker processes (``distill up`` starts them with
    OMP_NUM_THREADS=1): both sides of a ratio then run as in production, and a second thread
    does not wait on a core that a Kafka client thread or another process holds."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def read_batches(cfg: Config) -> list[ExampleBatch]:
    from confluent_kafka import TopicPartition

    clients = Clients(cfg.kafka, "bench-reader")
    consumer = clients.consumer(f"bench-{time.monotonic_ns()}")
    n = partition_count(clients.admin(), cfg.topics.examples)
    consumer.assign([TopicPartition(cfg.topics.examples, p, 0) for p in range(n)])
    codec, out, quiet = Codec(), [], time.monotonic()
    while time.monotonic() - quiet < 1.0:
        for msg in consumer.consume(1000, 0.2):
            if msg.error() is None:
                out.append(codec.decode_examples(msg.value(), msg.headers()))
                quiet = time.monotonic()
    consumer.close()
    return out


def timed_steps(step, done) -> float:
    """Seconds from the first step that did work to ``done()``: the group join is not counted."""
    started = None
    while not done():
        before = time.perf_counter()
        did = step()
        if started is None and did:
            started = before
    return time.perf_counter() - (started or time.perf_counter())
