"""``kafka.extra`` against the built-in client settings: the user's value wins, the keys the
guarantees rest on are refused at start-up, the built-in fetch wait bounds how long a resumed
partition waits, and the embedded broker's tuning is a local profile that ``distill up``
applies (not a production default)."""

from __future__ import annotations

import statistics
import time

import pytest
import yaml
from confluent_kafka import Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from distill.core.config import load_config
from distill.core.exceptions import ConfigError
from distill.core.kafka import FETCH_WAIT_MS, LOCAL_PROFILE, RESERVED, Clients, client_config, local_profile
from distill.local.up import Pipeline


def kafka_config(**extra):
    return load_config(None, environ={}, kafka={"extra": extra}).kafka


def test_the_users_extra_wins_over_the_built_in_settings():
    clients = Clients(kafka_config(**{"fetch.wait.max.ms": 7, "linger.ms": 3, "max.partition.fetch.bytes": 1}), "t")
    consumer = clients.consumer_config("g")
    producer = clients.producer_config("tid")
    assert consumer["fetch.wait.max.ms"] == 7
    assert consumer["max.partition.fetch.bytes"] == 1  # a built-in value (256 KiB) before
    assert producer["linger.ms"] == 3  # a built-in value (20) before
    # What the call site sets for its guarantees is still there.
    assert consumer["isolation.level"] == "read_committed" and consumer["group.id"] == "g"
    assert producer["transactional.id"] == "tid" and producer["enable.idempotence"] is True
    # A property of one kind of client is not given to the other (librdkafka would warn).
    assert "linger.ms" not in consumer and "fetch.wait.max.ms" not in producer


def _median_resume_s(bootstrap: str, extra: dict, unique_name) -> float:
    """Median time from resuming a paused partition with records to its first record, each
    resume made while a fetch of the other, caught-up partition waits at the broker: what a
    student's join backpressure (pause, resume) meets at every resume."""
    admin = AdminClient({"bootstrap.servers": bootstrap})
    backlog, idle = unique_name("backlog"), unique_name("idle")
    for future in admin.create_topics([NewTopic(backlog, 1, 1), NewTopic(idle, 1, 1)]).values():
        future.result(30)
    producer = Producer({"bootstrap.servers": bootstrap})
    for _ in range(20):
        producer.produce(backlog, b"x", partition=0)
    assert producer.flush(30) == 0
    kafka = load_config(None, environ={}, kafka={"bootstrap_servers": bootstrap, "extra": extra}).kafka
    consumer = Clients(kafka, "resume").consumer(unique_name("group"))
    consumer.assign([TopicPartition(backlog, 0, 0), TopicPartition(idle, 0, 0)])
    try:
        deadline = time.monotonic() + 30
        while not consumer.consume(10, 0.2):  # assigned and fetching
            assert time.monotonic() < deadline, "no record of the backlog topic consumed"
        delays = []
        for i in range(12):
            paused = [TopicPartition(backlog, 0)]
            consumer.pause(paused)
            consumer.seek(TopicPartition(backlog, 0, i))
            consumer.consume(10, 0.2 + (i * 0.037) % 0.3)  # varied, so that no fetch cycle aliases
            consumer.resume(paused)
            resumed = time.monotonic()
            while not [r for r in consumer.consume(10, 0.01) if r.topic() == backlog]:
                assert time.monotonic() - resumed < 10, "the resumed partition was never fetched"
            delays.append(time.monotonic() - resumed)
        return statistics.median(delays)
    finally:
        consumer.close()


def test_a_resumed_partition_is_fetched_within_the_built_in_fetch_wait(apache_broker, unique_name):
    """librdkafka keeps one fetch in flight per broker: a partition resumed while a fetch of
    only caught-up partitions waits at the broker is read when that fetch returns. With
    librdkafka's 500 ms the first record came 0.2 s after the resume (median, measured); the
    built-in wait bounds it at 0.1 s. Apache Kafka: it answers a waiting fetch when data arrives,
    so only a resume meets the wait (the embedded broker has its own profile, below)."""
    built_in = Clients(kafka_config(), "t").consumer_config("g")["fetch.wait.max.ms"]
    assert built_in == FETCH_WAIT_MS
    ours = _median_resume_s(apache_broker.bootstrap, {}, unique_name)
    librdkafka = _median_resume_s(apache_broker.bootstrap, {"fetch.wait.max.ms": 500}, unique_name)
    assert ours < FETCH_WAIT_MS / 1000, f"built-in fetch wait: median {ours:.3f}s after a resume"
    assert librdkafka > ours + 0.05, f"librdkafka's 500 ms: median {librdkafka:.3f}s vs {ours:.3f}s"


@pytest.mark.parametrize("key", sorted(RESERVED))
def test_a_reserved_key_in_extra_is_a_start_up_error(key):
    kafka = kafka_config(**{key: "x"})
    with pytest.raises(ConfigError, match=f"kafka.extra must not set '{key}'") as err:
        Clients(kafka, "t")
    assert RESERVED[key] in str(err.value)  # says why


def test_a_key_with_its_own_field_is_refused_with_the_field_name():
    with pytest.raises(ConfigError, match=r"'bootstrap.servers'.*kafka.bootstrap_servers"):
        client_config(kafka_config(**{"bootstrap.servers": "elsewhere:9092"}))


def test_local_profile_lies_under_the_users_extra():
    assert local_profile({}) == LOCAL_PROFILE
    assert local_profile({"fetch.wait.max.ms": 100, "socket.keepalive.enable": True}) == {
        "fetch.wait.max.ms": 100,
        "socket.keepalive.enable": True,
    }


def _median_delivery_s(config, extra: dict, unique_name) -> float:
    """Median time from produce to consume for single messages, each sent while the consumer
    waits in a fetch: what fetch.wait.max.ms costs on the embedded broker."""
    config = config.model_copy(deep=True)
    config.kafka.extra = extra
    clients = Clients(config.kafka, "latency")
    topic = config.topics.examples
    producer = clients.producer()
    consumer = clients.consumer(unique_name("group"))
    consumer.assign([TopicPartition(topic, 0, 0)])
    try:
        producer.produce(topic, b"warm-up", partition=0)
        producer.flush(10)
        deadline = time.monotonic() + 15
        while consumer.poll(0.1) is None:
            assert time.monotonic() < deadline, "warm-up message not consumed"
        delays = []
        for i in range(12):
            time.sleep(0.05 + (i * 0.037) % 0.3)  # varied, so that no fetch cycle aliases with it
            sent = time.monotonic()
            producer.produce(topic, f"m{i}".encode(), partition=0)
            producer.flush(10)
            msg = None
            while msg is None:
                msg = consumer.poll(0.05)
                assert time.monotonic() - sent < 10, "message not consumed"
            delays.append(time.monotonic() - sent)
        return statistics.median(delays)
    finally:
        consumer.close()
        producer.flush(5)


def test_the_local_profile_reaches_the_real_consumer_on_the_embedded_broker(config_with_topics, unique_name):
    """On the embedded broker a consumer with librdkafka's fetch wait (500 ms) got a new
    message about 100 ms late (up to 200 ms, measured); through kafka.extra the local profile's
    value reaches the consumer and the delay goes."""
    librdkafka = _median_delivery_s(config_with_topics, {"fetch.wait.max.ms": 500}, unique_name)
    local = _median_delivery_s(config_with_topics, local_profile({}), unique_name)
    assert local < 0.03, f"local profile: median delivery {local:.3f}s"
    assert librdkafka > local + 0.03, f"librdkafka's fetch wait: median delivery {librdkafka:.3f}s vs {local:.3f}s"


def test_distill_up_applies_the_local_profile_when_it_runs_the_embedded_broker(tmp_path):
    config = load_config(
        None,
        environ={},
        state_dir=str(tmp_path / "state"),
        kafka={"extra": {"socket.keepalive.enable": True}},
        topics={"partitions": 1},
    )
    pipeline = Pipeline(config, "synthetic", None, None, tmp_path / "report", None, prometheus=False, live=False)
    try:
        config_path = pipeline._prepare()  # starts the embedded broker, writes the children's config
    finally:
        if pipeline.broker is not None:
            pipeline.broker.stop()
    extra = yaml.safe_load(config_path.read_text())["kafka"]["extra"]
    assert extra == {**LOCAL_PROFILE, "socket.keepalive.enable": True}
