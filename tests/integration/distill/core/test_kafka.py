"""Kafka plumbing against the embedded broker and Apache Kafka: topics, partition check, round
trips, transactions, lag."""

from __future__ import annotations

import time

import numpy as np
import pytest
from confluent_kafka import KafkaError, KafkaException, TopicPartition
from confluent_kafka.admin import NewTopic, OffsetSpec

from distill.core import metrics as m
from distill.core.config import load_config
from distill.core.exceptions import TopicMismatchError
from distill.core.kafka import (
    Clients,
    check_partitions,
    client_config,
    ensure_topics,
    export_lag,
    fatal_cause,
    fenced,
    lag,
    partition_count,
    redacted,
)
from distill.core.wire import Codec, LabelBatch, ids_checksum

pytestmark = pytest.mark.both_brokers  # the tests that use a broker run on both flavours


def create(admin, name: str, partitions: int) -> None:
    for future in admin.create_topics([NewTopic(name, num_partitions=partitions)]).values():
        future.result(10)


# -- client configuration (no broker needed, kept beside the clients it configures) ----------
def test_client_config_passes_security_and_extra_and_redacts_secrets():
    cfg = load_config(
        None,
        environ={},
        kafka={
            "security_protocol": "SASL_SSL",
            "sasl_mechanism": "SCRAM-SHA-512",
            "sasl_username": "u",
            "sasl_password": "hunter2",
            "ssl_ca_location": "/ca.pem",
            "extra": {"socket.keepalive.enable": True},
        },
    )
    conf = client_config(cfg.kafka)
    assert conf["security.protocol"] == "SASL_SSL"
    assert conf["sasl.password"] == "hunter2"
    assert conf["ssl.ca.location"] == "/ca.pem"
    assert conf["socket.keepalive.enable"] is True
    assert "ssl.key.location" not in conf  # unset options are not passed as None
    shown = redacted(conf)
    assert shown["sasl.password"] == "***" and "hunter2" not in repr(shown)
    assert shown["sasl.username"] == "u"


# -- topics ------------------------------------------------------------------------------------
def test_ensure_topics_creates_equal_partitions_and_dlqs(make_config):
    config = make_config(topics={"partitions": 3})
    admin = Clients(config.kafka, "admin").admin()
    ensure_topics(config, admin, seconds=20)
    t = config.topics
    assert partition_count(admin, t.examples) == 3
    assert partition_count(admin, t.labels) == 3
    assert partition_count(admin, t.dlq(t.examples)) == 1
    assert partition_count(admin, t.dlq(t.labels)) == 1
    assert check_partitions(config, admin) == 3
    ensure_topics(config, admin, seconds=20)  # idempotent: existing topics are fine


@pytest.mark.apache
def test_ensure_topics_sees_the_topics_it_created(apache_broker, tmp_path):
    for i in range(20):  # about 1 creation in 13 lost the race when measured
        name = f"fresh-{i}-{tmp_path.name}"
        config = load_config(
            None,
            environ={},
            state_dir=str(tmp_path),
            kafka={"bootstrap_servers": apache_broker.bootstrap},
            topics={"examples": f"examples.{name}", "labels": f"labels.{name}", "checkpoints": f"checkpoints.{name}"},
        )
        ensure_topics(config, Clients(config.kafka, "admin").admin(), seconds=20)


def test_partition_mismatch_is_a_clear_error(make_config):
    config = make_config(topics={"partitions": 2})
    admin = Clients(config.kafka, "admin").admin()
    create(admin, config.topics.examples, 2)
    create(admin, config.topics.labels, 3)
    with pytest.raises(TopicMismatchError) as err:
        ensure_topics(config, admin, seconds=20)
    msg = str(err.value)
    assert repr(config.topics.examples) in msg and "2 partitions" in msg
    assert repr(config.topics.labels) in msg and "has 3" in msg
    assert "must be equal" in msg and "Recreate" in msg


def test_missing_topic_is_reported_not_created(config):
    admin = Clients(config.kafka, "admin").admin()
    create(admin, config.topics.examples, 2)
    with pytest.raises(TopicMismatchError, match="does not exist"):
        check_partitions(config, admin)
    assert config.topics.labels not in admin.list_topics(timeout=5).topics
    assert partition_count(admin, "never-created-" + config.topics.labels) is None


# -- produce and consume -----------------------------------------------------------------------
def test_example_batches_round_trip_through_the_broker(config_with_topics, make_batch, make_consumer, consume):
    config = config_with_topics
    codec = Codec()
    clients = Clients(config.kafka, "test")
    producer = clients.producer()
    sent = {}
    for seq in range(6):
        batch = make_batch(n=64 if seq else 0, seq=seq, truth=seq % 2 == 0)
        value, headers = codec.encode_examples(batch)
        producer.produce(
            config.topics.examples,
            value=value,
            headers=headers,
            key=batch.batch_id.encode(),
            partition=seq % config.topics.partitions,
        )
        sent[batch.batch_id] = batch
    assert producer.flush(10) == 0

    messages = consume(make_consumer(config, [config.topics.examples]), len(sent))
    got = {}
    for msg in messages:
        batch = codec.decode_examples(msg.value(), msg.headers())
        assert msg.key() == batch.batch_id.encode()
        assert msg.partition() == batch.seq % config.topics.partitions
        got[batch.batch_id] = batch
    assert got.keys() == sent.keys()
    for batch_id, batch in sent.items():
        np.testing.assert_array_equal(got[batch_id].dense, batch.dense)
        np.testing.assert_array_equal(got[batch_id].categorical, batch.categorical)
        np.testing.assert_array_equal(got[batch_id].labels, batch.labels)
        assert (got[batch_id].truth is None) == (batch.truth is None)


def test_label_batch_round_trip_in_a_transaction(
    config_with_topics, make_consumer, consume, unique_name, kafka_flavour
):
    config = config_with_topics
    codec = Codec()
    producer = Clients(config.kafka, "test").producer(transactional_id=unique_name("txn"))
    producer.init_transactions(10)
    producer.begin_transaction()
    producer.produce(config.topics.labels, value=b"aborted", partition=1)
    producer.flush(10)  # abort purges unsent messages
    producer.abort_transaction(10)
    ids = np.arange(32, dtype=np.int64)
    labels = LabelBatch(
        batch_id="p-0",
        example_ids_checksum=ids_checksum(ids),
        source_partition=1,
        source_offset=0,
        teacher_version=1,
        watermark=0,
        task_names=["click", "watch"],
        logits=np.ones((32, 2), dtype=np.float32),
    )
    producer.begin_transaction()
    value, headers = codec.encode_labels(labels)
    producer.produce(config.topics.labels, value=value, headers=headers, partition=1)
    producer.commit_transaction(10)
    consumer = make_consumer(config, [config.topics.labels])
    if kafka_flavour == "apache":
        (msg,) = consume(consumer, 1)  # read_committed: the aborted message is never seen
        assert consumer.poll(1.0) is None
        # Each transaction ends with a control record: offsets 0 and 2 hold data, 3 is the end.
        assert msg.offset() == 2
        assert consumer.get_watermark_offsets(TopicPartition(config.topics.labels, 1), cached=False) == (0, 4)
        assert lag(consumer, [TopicPartition(config.topics.labels, 1)]) == {(config.topics.labels, 1): 0}
    else:
        aborted, msg = consume(consumer, 2)  # the embedded broker shows aborted messages (docs/kafka.md)
        assert aborted.value() == b"aborted"
    assert msg.partition() == 1
    decoded = codec.decode_labels(msg.value(), msg.headers())
    assert decoded.example_ids_checksum == labels.example_ids_checksum
    np.testing.assert_array_equal(decoded.logits, labels.logits)


def test_a_producer_fenced_in_the_background_is_told_apart_from_other_fatal_errors(config_with_topics, unique_name):
    # The newer producer fences the older one while its batch is added to the transaction in
    # the background: the older one's next produce says only "fatal error" (_FATAL).
    config = config_with_topics
    tid = unique_name("txn")
    older = Clients(config.kafka, "older").producer(transactional_id=tid)
    older.init_transactions(10)
    older.begin_transaction()
    older.produce(config.topics.labels, value=b"first", partition=0)
    older.flush(10)
    Clients(config.kafka, "newer").producer(transactional_id=tid).init_transactions(10)
    older.produce(config.topics.labels, value=b"to a new partition", partition=1)
    with pytest.raises(KafkaException) as raised:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:  # until the background request has been refused
            time.sleep(0.2)
            older.produce(config.topics.labels, value=b"more", partition=1)
    assert raised.value.args[0].code() == KafkaError._FATAL and not fenced(raised.value)
    assert fenced(fatal_cause(older, raised.value))


def test_empty_value_message_is_not_lost(config_with_topics, make_consumer, consume):
    """A Message with an empty value is falsy: consume() must test `is not None`."""
    config = config_with_topics
    producer = Clients(config.kafka, "test").producer()
    producer.produce(config.topics.examples, value=b"", partition=0)
    producer.produce(config.topics.examples, value=None, key=b"tombstone", partition=0)
    producer.flush(10)
    first, second = consume(make_consumer(config, [config.topics.examples]), 2)
    assert not first and first.value() == b""
    assert second.value() is None and second.key() == b"tombstone"


# -- lag ---------------------------------------------------------------------------------------
def test_lag_from_cached_watermarks(make_config, make_consumer, consume, kafka_flavour):
    config = make_config(topics={"partitions": 1})
    ensure_topics(config, Clients(config.kafka, "admin").admin(), seconds=20)
    topic = config.topics.examples
    producer = Clients(config.kafka, "test").producer()
    for i in range(10):
        producer.produce(topic, value=b"m%d" % i, partition=0)
    producer.flush(10)

    consumer = make_consumer(config, [topic])
    partition = [TopicPartition(topic, 0)]
    assert lag(consumer, []) == {}
    assert lag(consumer, partition) == {}  # nothing consumed yet: unknown, not 0
    consume(consumer, 4)
    # The fetch response cached the high watermark (10); the position is 4.
    assert lag(consumer, partition) == {(topic, 0): 6}
    consume(consumer, 6)
    assert lag(consumer, partition) == {(topic, 0): 0}
    if kafka_flavour == "apache":  # the embedded broker answers these wrong (docs/kafka.md)
        assert consumer.get_watermark_offsets(partition[0], cached=False) == (0, 10)
        admin = Clients(config.kafka, "admin").admin()
        latest = admin.list_offsets({partition[0]: OffsetSpec.latest()})[partition[0]].result(10)
        assert latest.offset == 10
    # A partition this consumer never fetched is left out rather than reported as 0.
    assert lag(consumer, [TopicPartition(config.topics.labels, 0)]) == {}


def test_export_lag_sets_the_gauge_of_every_assigned_partition(make_config, make_consumer, consume):
    config = make_config(topics={"partitions": 1})
    ensure_topics(config, Clients(config.kafka, "admin").admin(), seconds=20)
    topic = config.topics.examples
    producer = Clients(config.kafka, "test").producer()
    for i in range(10):
        producer.produce(topic, value=b"m%d" % i, partition=0)
    producer.flush(10)
    consumer = make_consumer(config, [topic])
    consume(consumer, 3)
    export_lag(consumer, "test", config.kafka.client_id)
    assert m.CONSUMER_LAG.labels("test", config.kafka.client_id, topic, "0")._value.get() == 7
