"""Fixtures shared by every test folder (unit/, integration/, e2e/, faults/).

Layout: tests mirror the packages, ``tests/unit/<package>/test_<module>.py`` for code that runs
without Kafka and ``tests/integration/<package>/`` for code that talks to the real (embedded)
broker. Every test folder has an ``__init__.py`` so that two folders may hold test files of the
same name; add one when you add a folder. Fixtures that only one folder needs belong in that
folder's own ``conftest.py``.

The fixtures here:

``broker``
    One embedded broker (tansu, memory only) for the whole session, on a free loopback port.
    Tests never share topics (see ``make_config``), so they do not disturb each other; never
    stop or restart it in a test (start your own ``EmbeddedBroker`` for that, it takes ms).
``apache_broker``
    One Apache Kafka (KRaft, one combined node, tests/kafka/apache.py) for the session, started
    on first use. Skipped when Java or the jars (``make kafka-jars``) are missing, an error
    when ``CI=true``.
``kafka``, ``kafka_flavour``
    The broker a test runs on: ``broker`` unless the test is marked ``both_brokers``, which runs
    it twice, on ``embedded`` and on ``apache`` (test ids ``[embedded]``/``[apache]``; the apache
    runs also carry the ``apache`` marker, so ``-m apache`` selects them). Ask for
    ``kafka_flavour`` to assert what only Apache Kafka does right (see docs/kafka.md).
``make_config(**overrides)``
    A validated ``Config`` pointing at ``kafka`` with names unique to one call: topics,
    teacher group, client id, producer id. State (checkpoints, models) lives in ``tmp_path``.
    Overrides are nested dicts merged over that base, e.g.
    ``make_config(topics={"partitions": 1}, students=[{"name": "s1"}])``.
``config``
    ``make_config()`` with no overrides.
``config_with_topics``
    ``config`` whose examples, labels and DLQ topics have been created.
``make_batch(n, seq=0, ...)``
    An ``ExampleBatch`` of the default synthetic layout (``Config()``'s features and tasks),
    random but reproducible.
``make_consumer(config, topics)``
    A consumer (unique group id, read_committed) *assigned* to every partition of the given
    topics from offset 0: no group join, so no wait of half a session timeout. Closed after
    the test. Subscribe a consumer yourself where the group protocol is what you test.
``consume(consumer, n)``
    Polls until ``n`` messages arrived (``msg is not None``: a Message with an empty value is
    falsy) and returns them; fails the test with what it got after ``timeout`` seconds.
"""

from __future__ import annotations

import os
import re
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
from confluent_kafka import Consumer, Message, TopicPartition

from distill.core.config import Config, deep_merge, load_config
from distill.core.kafka import Clients, ensure_topics, local_profile, partition_count
from distill.core.wire import ExampleBatch
from distill.local.broker import EmbeddedBroker
from tests.kafka import apache

# Group joins on the embedded broker take about half of session.timeout.ms: keep it short.
TEST_SESSION_TIMEOUT_MS = 6000


def _slug(text: str, limit: int = 24) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text)[:limit].strip("-") or "t"


@pytest.fixture
def one_thread():
    """One torch thread: the same numbers on any machine whatever its core count, and tiny
    models train faster so than fighting over a busy machine's cores."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedBroker]:
    """The session's embedded broker. A missing binary fails with the install hint."""
    log_file = tmp_path_factory.mktemp("broker") / "broker.log"
    b = EmbeddedBroker(host="127.0.0.1", port=0, log_file=log_file)
    b.start()
    try:
        yield b
    finally:
        b.stop()


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "both_brokers: run on the embedded broker and on Apache Kafka")
    config.addinivalue_line("markers", "apache: runs on Apache Kafka (a both_brokers test's apache run)")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if metafunc.definition.get_closest_marker("both_brokers") and "kafka_flavour" in metafunc.fixturenames:
        metafunc.parametrize("kafka_flavour", ["embedded", pytest.param("apache", marks=pytest.mark.apache)])


@pytest.fixture(scope="session")
def apache_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[apache.ApacheKafka]:
    reason = apache.unavailable()
    if reason:
        if os.environ.get("CI") == "true":  # CI must run these, not skip them
            pytest.fail(f"CI=true and Apache Kafka cannot run: {reason}")
        pytest.skip(reason)
    kafka = apache.ApacheKafka(root=tmp_path_factory.mktemp("apache-kafka"))
    kafka.start()
    try:
        kafka.warm_up()
        yield kafka
    finally:
        kafka.stop()


@pytest.fixture
def kafka_flavour() -> str:
    return "embedded"  # both_brokers tests parametrise this (pytest_generate_tests)


@pytest.fixture
def kafka(kafka_flavour: str, request: pytest.FixtureRequest):
    """The broker of this test run: an ``EmbeddedBroker`` or an ``ApacheKafka``."""
    if kafka_flavour != "apache":
        return request.getfixturevalue("broker")
    return request.getfixturevalue("apache_broker")


@pytest.fixture
def unique_name(request: pytest.FixtureRequest) -> Callable[[str], str]:
    """``unique_name("examples")`` -> ``"examples-<test name>-<8 hex>"``, new on every call."""
    test = _slug(request.node.name)

    def make(prefix: str) -> str:
        return f"{prefix}-{test}-{uuid.uuid4().hex[:8]}"

    return make


@pytest.fixture
def make_config(kafka, tmp_path, unique_name) -> Callable[..., Config]:
    def make(**overrides: Any) -> Config:
        run = unique_name("t")
        base: dict[str, Any] = {
            "state_dir": str(tmp_path / "state"),
            "kafka": {
                "bootstrap_servers": kafka.bootstrap,
                "client_id": run,
                "session_timeout_ms": TEST_SESSION_TIMEOUT_MS,
                # the settings distill up gives the embedded broker (Apache Kafka needs none)
                "extra": local_profile({}) if isinstance(kafka, EmbeddedBroker) else {},
            },
            "topics": {
                "examples": f"examples.{run}",
                "labels": f"labels.{run}",
                "checkpoints": f"checkpoints.{run}",
                "partitions": 2,
            },
            "teacher": {"group_id": f"teacher.{run}", "pool": {"labeler_group_id": f"labelers.{run}"}},
            "producer": {"producer_id": f"producer.{run}"},
            "broker": {"log_file": str(tmp_path / "broker.log")},
        }
        return load_config(None, environ={}, **deep_merge(base, overrides))

    return make


@pytest.fixture
def config(make_config: Callable[..., Config]) -> Config:
    return make_config()


@pytest.fixture
def config_with_topics(config: Config) -> Config:
    ensure_topics(config, Clients(config.kafka, "test-admin").admin(), seconds=20)
    return config


@pytest.fixture
def make_batch() -> Callable[..., ExampleBatch]:
    defaults = Config()
    categorical = defaults.features.categorical_names
    dense = list(defaults.features.dense)
    tasks = [t.name for t in defaults.tasks]

    def make(
        n: int = 16, seq: int = 0, producer_id: str = "test-producer", truth: bool = True, seed: int | None = None
    ) -> ExampleBatch:
        rng = np.random.default_rng(seq if seed is None else seed)
        now_ms = 1_700_000_000_000 + seq * 1000
        probs = rng.random((n, len(tasks)), dtype=np.float32)
        return ExampleBatch(
            batch_id=f"{producer_id}-{seq}",
            producer_id=producer_id,
            seq=seq,
            event_time_ms=now_ms + np.arange(n, dtype=np.int64),
            example_ids=seq * 1_000_000 + np.arange(n, dtype=np.int64),
            categorical_names=list(categorical),
            categorical=rng.integers(0, 2**40, size=(n, len(categorical)), dtype=np.int64),
            dense_names=list(dense),
            dense=rng.standard_normal((n, len(dense)), dtype=np.float32),
            task_names=list(tasks),
            labels=(rng.random((n, len(tasks)), dtype=np.float32) < probs).astype(np.float32),
            truth=probs if truth else None,
        )

    return make


@pytest.fixture
def make_consumer(unique_name) -> Iterator[Callable[..., Consumer]]:
    made: list[Consumer] = []

    def make(config: Config, topics: list[str], **overrides: Any) -> Consumer:
        clients = Clients(config.kafka, "test-consumer")
        consumer = clients.consumer(unique_name("group"), **overrides)
        admin = clients.admin()
        assignment = []
        for topic in topics:
            count = partition_count(admin, topic)
            assert count, f"topic {topic!r} does not exist; create it first (config_with_topics)"
            assignment += [TopicPartition(topic, p, 0) for p in range(count)]
        consumer.assign(assignment)
        made.append(consumer)
        return consumer

    yield make
    for consumer in made:
        consumer.close()


@pytest.fixture
def consume() -> Callable[..., list[Message]]:
    def poll_until(consumer: Consumer, n: int, timeout: float = 15.0) -> list[Message]:
        got: list[Message] = []
        deadline = time.monotonic() + timeout
        while len(got) < n and time.monotonic() < deadline:
            msg = consumer.poll(0.2)
            if msg is None:  # never `if not msg`: a Message with an empty value is falsy
                continue
            if msg.error() is not None:
                pytest.fail(f"consumer error: {msg.error()}")
            got.append(msg)
        if len(got) < n:
            pytest.fail(f"got {len(got)} of {n} messages within {timeout}s")
        return got

    return poll_until
