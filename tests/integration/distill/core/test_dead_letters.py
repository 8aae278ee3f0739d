"""The dead-letter path: a message that cannot be processed lands in <topic>.dlq, whole."""

from __future__ import annotations

import pytest
from prometheus_client import REGISTRY

from distill.core.dead_letters import DeadLetters
from distill.core.exceptions import DecodeError
from distill.core.kafka import Clients
from distill.core.wire import SCHEMA_HEADER, Codec


def dead_letter_count(worker: str, topic: str, reason: str) -> float:
    value = REGISTRY.get_sample_value(
        "distill_dead_letters_total",
        {"role": "test", "worker": worker, "topic": topic, "reason": reason},
    )
    return value or 0.0


@pytest.fixture
def producer(config_with_topics):
    return Clients(config_with_topics.kafka, "test").producer()


def send_and_fetch(config, producer, make_consumer, consume, *, value, headers, key, error=None, worker="w0"):
    """Produce one message, consume it, fail to decode it, dead-letter it, read the DLQ."""
    topic = config.topics.examples
    producer.produce(topic, value=value, headers=headers, key=key, partition=1)
    assert producer.flush(10) == 0
    (msg,) = consume(make_consumer(config, [topic]), 1)
    codec = Codec()
    if error is None:
        with pytest.raises(DecodeError) as caught:
            codec.decode_examples(msg.value(), msg.headers())
        error = caught.value
    DeadLetters(producer, codec, role="test", worker=worker).send(msg, error)
    assert producer.flush(10) == 0
    (dead,) = consume(make_consumer(config, [config.topics.dlq(topic)]), 1)
    return msg, error, dead


def test_bad_message_goes_to_dlq_whole(config_with_topics, producer, make_consumer, consume, make_batch):
    config = config_with_topics
    topic = config.topics.examples
    good_value, good_headers = Codec().encode_examples(make_batch(n=4))
    garbled = good_value[: len(good_value) // 2]  # truncated on the way
    headers = [*good_headers, ("trace", b"abc"), ("empty", None)]
    before = dead_letter_count("w0", topic, "undecodable")

    msg, error, dead = send_and_fetch(
        config, producer, make_consumer, consume, value=garbled, headers=headers, key=b"k1"
    )

    assert dead.topic() == f"{topic}.dlq"
    assert dead.key() == b"k1"
    plain = dict(dead.headers())
    assert plain["distill.dlq.reason"] == error.reason.encode() == b"undecodable"
    assert plain["distill.dlq.source"] == f"{topic}/1/{msg.offset()}".encode()
    assert plain["distill.dlq.error"].decode() == error.detail[:500]
    assert SCHEMA_HEADER in plain  # the DLQ record itself is self-describing

    record = Codec().decode_dead_letter(dead.value(), dead.headers())
    assert record["payload"] == garbled  # byte for byte
    assert record["reason"] == "undecodable"
    assert record["error"] == error.detail
    assert (record["source_topic"], record["source_partition"], record["source_offset"]) == (topic, 1, msg.offset())
    assert record["worker"] == "test/w0"
    assert record["failed_at_ms"] > 1_600_000_000_000
    assert [(h["key"], h["value"]) for h in record["original_headers"]] == headers
    assert dead_letter_count("w0", topic, "undecodable") == before + 1


def test_message_without_schema_header(config_with_topics, producer, make_consumer, consume):
    msg, error, dead = send_and_fetch(
        config_with_topics,
        producer,
        make_consumer,
        consume,
        value=b"\x00\x01not avro",
        headers=None,
        key=None,
        worker="w1",
    )
    assert error.reason == "missing_schema"
    assert dict(dead.headers())["distill.dlq.reason"] == b"missing_schema"
    record = Codec().decode_dead_letter(dead.value(), dead.headers())
    assert record["payload"] == b"\x00\x01not avro"
    assert record["original_headers"] == []
    assert dead.key() is None


def test_tombstone_keeps_a_null_payload(config_with_topics, producer, make_consumer, consume):
    _, error, dead = send_and_fetch(
        config_with_topics,
        producer,
        make_consumer,
        consume,
        value=None,
        headers=[(SCHEMA_HEADER, b"00")],
        key=b"gone",
        worker="w2",
    )
    assert error.reason == "empty"
    record = Codec().decode_dead_letter(dead.value(), dead.headers())
    assert record["payload"] is None
    assert record["reason"] == "empty"


def test_any_exception_is_a_processing_error(config_with_topics, producer, make_consumer, consume, make_batch):
    value, headers = Codec().encode_examples(make_batch(n=2))
    topic = config_with_topics.topics.examples
    before = dead_letter_count("w3", topic, "processing_error")
    _, _, dead = send_and_fetch(
        config_with_topics,
        producer,
        make_consumer,
        consume,
        value=value,
        headers=headers,
        key=None,
        worker="w3",
        error=ValueError("id mismatch in join"),
    )
    plain = dict(dead.headers())
    assert plain["distill.dlq.reason"] == b"processing_error"
    assert plain["distill.dlq.error"] == b"ValueError: id mismatch in join"
    record = Codec().decode_dead_letter(dead.value(), dead.headers())
    assert record["payload"] == value
    assert dead_letter_count("w3", topic, "processing_error") == before + 1
