"""Helpers shared by the teacher and student integration tests: produce a stream, run workers
in-process or as real processes, read topics back."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml
from confluent_kafka import TopicPartition

from distill.core.config import Config
from distill.core.kafka import Clients, partition_count
from distill.core.wire import Codec, LabelBatch
from producers.service import run_producer


def produce_synthetic(config: Config, examples: int, batch_size: int = 256) -> dict:
    return run_producer(
        config,
        "synthetic",
        handle_signals=False,
        serve_http=False,
        max_examples=examples,
        batch_size=batch_size,
        linger_ms=5,
    )


def read_all(config: Config, topic: str, timeout: float = 10.0, idle: float = 1.5, committed: bool = True) -> list:
    """Every committed message of ``topic`` (all partitions), read until quiet for ``idle`` s;
    ``committed=False``: every message, aborted transactions' too."""
    clients = Clients(config.kafka, "test-reader")
    isolation = {} if committed else {"isolation.level": "read_uncommitted"}
    consumer = clients.consumer(f"reader-{time.monotonic_ns()}", **isolation)
    n = partition_count(clients.admin(), topic)
    consumer.assign([TopicPartition(topic, p, 0) for p in range(n)])
    out, deadline, last = [], time.monotonic() + timeout, time.monotonic()
    try:
        while time.monotonic() < deadline and time.monotonic() - last < idle:
            for msg in consumer.consume(500, 0.2):
                if msg.error() is None:
                    out.append(msg)
                    last = time.monotonic()
    finally:
        consumer.close()
    return out


def read_labels(config: Config) -> list[tuple[int, int, LabelBatch]]:
    codec = Codec()
    return [
        (m.partition(), m.offset(), codec.decode_labels(m.value(), m.headers()))
        for m in read_all(config, config.topics.labels)
    ]


def example_batch_ids(config: Config) -> dict[str, tuple[int, int]]:
    codec = Codec()
    out = {}
    for m in read_all(config, config.topics.examples):
        out[codec.decode_examples(m.value(), m.headers()).batch_id] = (m.partition(), m.offset())
    return out


def run_until(predicate, steps, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for step in steps:
            step()
        if predicate():
            return
    raise AssertionError(f"condition not reached within {timeout}s")


def write_config(config: Config, path: Path) -> Path:
    path.write_text(yaml.safe_dump(config.model_dump(mode="json")))
    return path


def spawn(args: list[str], log: Path) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.Popen(
        [sys.executable, "-m", "distill", *args], stdout=open(log, "ab"), stderr=subprocess.STDOUT, env=env
    )


def kill9(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)


def stop(proc: subprocess.Popen, timeout: float = 60) -> int:
    proc.send_signal(signal.SIGTERM)
    return proc.wait(timeout)
