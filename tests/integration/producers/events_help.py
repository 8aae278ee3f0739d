"""Helpers of the events-source tests: a small event layout, an events topic, events written as
a service would write them (plain confluent-kafka producers), and the examples read back."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
from confluent_kafka import KafkaError, KafkaException, Producer
from confluent_kafka.admin import NewTopic

from distill.core.config import Config
from distill.core.kafka import Clients
from distill.core.wire import Codec, ExampleBatch
from tests.integration.workers import read_all

# An impression/click event of a recommender: nested context, text item ids, a dwell time.
LAYOUT: dict[str, Any] = {
    "features": {
        "categorical": [{"name": "user_id"}, {"name": "item"}, {"name": "context.device"}],
        "dense": ["price"],
    },
    "tasks": [{"name": "clicked"}, {"name": "dwell_s", "type": "regression"}],
}
MAPPING: dict[str, Any] = {
    "example_id": "event_id",
    "event_time": "ts",
    "user": "user_id",
    "categorical": ["user_id", "item", "context.device"],
    "dense": ["price"],
    "labels": {"clicked": "clicked", "dwell_s": "dwell_s"},
}


def event(i: int) -> dict[str, Any]:
    """The i-th good event: user i % 50 (so a user has several events), times in ms."""
    return {
        "event_id": i,
        "ts": 1_750_000_000_000 + i * 10,
        "user_id": i % 50,
        "item": f"sku-{i % 37}",
        "context": {"device": ["ios", "android", "web"][i % 3]},
        "price": float(i % 100) / 10.0,
        "clicked": i % 2 == 0,
        "dwell_s": float(i % 7),
    }


def events_config(make_config: Callable[..., Config], events_topic: str, **overrides: Any) -> Config:
    events = {"topic": events_topic, "group_id": f"group.{events_topic}", **MAPPING, **overrides.pop("events", {})}
    producer = {"batch_size": 64, "linger_ms": 50, **overrides.pop("producer", {})}
    layout = {"features": overrides.pop("features", LAYOUT["features"]), "tasks": LAYOUT["tasks"]}
    return make_config(**layout, events=events, producer=producer, **overrides)


def create_topic(config: Config, topic: str, partitions: int) -> None:
    admin = Clients(config.kafka, "test-admin").admin()
    for future in admin.create_topics([NewTopic(topic, partitions, 1)], operation_timeout=10).values():
        try:
            future.result()
        except KafkaException as exc:
            if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                raise


def write_events(config: Config, topic: str, values: Iterable[bytes], keys: Iterable[bytes] | None = None) -> int:
    """Each value as one event, keyed (the service's own partitioning) when keys are given."""
    producer = Producer({"bootstrap.servers": config.kafka.bootstrap_servers, "linger.ms": 5})
    n = 0
    for value, key in zip(values, keys if keys is not None else iter(lambda: None, 0), strict=False):
        producer.produce(topic, value=value, key=key)
        n += 1
        if n % 1000 == 0:
            producer.poll(0)
    assert producer.flush(30) == 0
    return n


def json_events(ids: Iterable[int]) -> list[bytes]:
    return [json.dumps(event(i)).encode() for i in ids]


def examples(config: Config, idle: float = 1.5) -> list[tuple[int, ExampleBatch]]:
    codec = Codec()
    return [
        (m.partition(), codec.decode_examples(m.value(), m.headers()))
        for m in read_all(config, config.topics.examples, idle=idle)
    ]


def example_ids(batches: list[tuple[int, ExampleBatch]]) -> np.ndarray:
    return np.concatenate([b.example_ids for _, b in batches]) if batches else np.zeros(0, np.int64)
