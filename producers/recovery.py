"""Where a restarted producer resumes: its last record in the positions topic, plus what the
examples topic shows of it after that record.

Every transaction of the producer ends with one record in ``<examples>.positions`` (compacted,
keyed by producer id) that holds the replay's position after the transaction's batches
(``producers.transaction``). On Apache Kafka the last committed record is the whole truth.
The embedded broker also shows aborted transactions to read_committed readers, so the position
record of a transaction that a SIGKILL cut short may be visible, and some of its example batches
too. Two rules make recovery right there as well:

- the position record is produced only after every batch of its transaction was acknowledged,
  so a visible record implies its batches are visible (the state never claims too much);
- after the record, the examples topic is read on from the offsets it names, and every batch of
  this producer found there (its headers name the producer, sequence number and positions)
  counts as delivered: what any read_committed reader sees is then exactly what is not sent
  again. On Apache Kafka that read finds nothing (aborted batches are hidden).

Recovery runs after ``init_transactions``, which aborts the previous incarnation's open
transaction: reading before it would hide that transaction's batches until it is resolved.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
import zlib
from collections.abc import Iterator

import numpy as np
from confluent_kafka import IsolationLevel, KafkaError, KafkaException, Message, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic, OffsetSpec

from distill.core.exceptions import BrokerError, ConfigError
from distill.core.kafka import Clients, consume_available, partition_count
from producers.position import Position

log = logging.getLogger(__name__)

PRODUCER_HEADER = "distill.producer"
SEQ_HEADER = "distill.seq"
POSITIONS_HEADER = "distill.positions"
READ_TIMEOUT_S = 60.0


def positions_topic(examples_topic: str) -> str:
    return f"{examples_topic}.positions"


def ensure_positions_topic(admin: AdminClient, topic: str, replication_factor: int) -> None:
    """One partition (a handful of small records per producer), compacted: only the last
    record of each producer id matters. Hourly segments, because the active segment is never
    compacted (Kafka's default rolls it after a week: a week of records to read on start)."""
    if partition_count(admin, topic):
        return
    spec = NewTopic(topic, 1, replication_factor, config={"cleanup.policy": "compact", "segment.ms": "3600000"})
    for future in admin.create_topics([spec], operation_timeout=10).values():
        try:
            future.result()
        except KafkaException as exc:
            if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                raise


def batch_headers(producer_id: str, seq: int, positions: np.ndarray) -> list[tuple[str, bytes]]:
    """What recovery needs of an example batch, without decoding it. Positions are
    delta-encoded (ascending within a batch), so they compress to a few bytes per example."""
    deltas = np.diff(positions.astype(np.int64), prepend=np.int64(0)).astype("<i8")
    return [
        (PRODUCER_HEADER, producer_id.encode()),
        (SEQ_HEADER, str(seq).encode()),
        (POSITIONS_HEADER, zlib.compress(deltas.tobytes(), 1)),
    ]


def read_batch_headers(headers: list[tuple[str, bytes]] | None) -> tuple[str, int, np.ndarray] | None:
    """(producer id, seq, positions) of a batch written by a producer service; None otherwise."""
    found = {k: v for k, v in (headers or []) if k in (PRODUCER_HEADER, SEQ_HEADER, POSITIONS_HEADER)}
    if len(found) != 3:
        return None
    deltas = np.frombuffer(zlib.decompress(found[POSITIONS_HEADER]), dtype="<i8")
    return found[PRODUCER_HEADER].decode(), int(found[SEQ_HEADER]), np.cumsum(deltas)


def encode_record(pos: Position) -> tuple[bytes, bytes]:
    """(key, value) of the position record."""
    return pos.producer_id.encode(), json.dumps(pos.to_json()).encode()


def recover(clients: Clients, examples_topic: str, source: str, producer_id: str, fallback: Position) -> Position:
    """The position to resume from. ``fallback`` (the position file, or a fresh position) is
    used only when the positions topic has no record of this producer yet."""
    admin = clients.admin()
    topic = positions_topic(examples_topic)
    last = None
    for msg in read_to_end(clients, admin, topic, {}):
        if msg.key() == producer_id.encode():
            last = msg
    if last is None:
        pos, origin = fallback, "position file" if fallback.batches else "start"
    else:
        where = f"the last record of {producer_id!r} in {topic!r}"
        try:
            data = json.loads(last.value())
        except ValueError as exc:
            raise ConfigError(f"{where} is not JSON ({exc}); was it written by a producer service?") from None
        pos, origin = Position.from_json(data, where), topic
        if pos.source != source:
            raise ConfigError(
                f"{where} belongs to the {pos.source!r} source, not {source!r}; "
                "give each replay its own producer.producer_id"
            )
        pos.producer_id = producer_id
    found = 0
    for msg in read_to_end(clients, admin, examples_topic, pos.offsets):
        batch = read_batch_headers(msg.headers())
        if batch is None or batch[0] != producer_id:
            continue
        _, seq, positions = batch
        pos.delivered.add_new(positions)
        pos.next_seq = max(pos.next_seq, seq + 1)
        pos.offsets[msg.partition()] = msg.offset() + 1
        pos.examples += len(positions)
        pos.batches += 1
        found += 1
    log.info(
        "recovered the replay position",
        extra={"from": origin, "position": pos.delivered.watermark, "next_seq": pos.next_seq, "batches_after": found},
    )
    return pos


def read_to_end(clients: Clients, admin: AdminClient, topic: str, start: dict[int, int]) -> Iterator[Message]:
    """Every read_committed message of ``topic`` from ``start`` (offset per partition, 0 when
    absent) up to its end as it was when called.

    The end is the later of the log end (read uncommitted: on Apache Kafka another producer's
    open transaction holds the read_committed end back, and records of ours committed after it
    must still be read) and the end the fetches report (the embedded broker's ListOffsets
    answer is too low, see BROKER.md).
    """
    n = partition_count(admin, topic) or 0
    if not n:
        return
    parts = [TopicPartition(topic, p) for p in range(n)]
    ends = {
        tp.partition: f.result().offset
        for tp, f in admin.list_offsets(
            {tp: OffsetSpec.latest() for tp in parts}, isolation_level=IsolationLevel.READ_UNCOMMITTED
        ).items()
    }
    consumer = clients.consumer(f"recovery.{uuid.uuid4().hex[:12]}", **{"enable.partition.eof": True})
    try:
        consumer.assign([TopicPartition(topic, p, start.get(p, 0)) for p in range(n)])
        pending = set(range(n))
        deadline = time.monotonic() + READ_TIMEOUT_S
        while pending:
            if time.monotonic() > deadline:
                raise BrokerError(f"reading {topic!r} to its end took over {READ_TIMEOUT_S:.0f}s")
            for msg in consume_available(consumer, 500, 0.2):
                err = msg.error()
                if err is None:
                    yield msg
                elif err.code() == KafkaError._PARTITION_EOF:
                    if msg.offset() >= ends[msg.partition()]:
                        pending.discard(msg.partition())
                else:
                    log.warning("recovery read error", extra={"topic": topic, "error": err.str()})
    finally:
        consumer.close()
