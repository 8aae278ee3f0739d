"""The events source: a topic of per-event records in, example batches on the examples topic out,
exactly once (consume-transform-produce).

One loop (``step``):
1. read up to ``events.max_poll_records`` events (the consumer group ``events.group_id``);
2. decode each (JSON, or Avro through the Schema Registry) and map it with the ``[events]``
   column mapping (``producers.records``); a bad event goes to ``<events topic>.dlq`` with its
   reason, in the same transaction, and the source goes on;
3. put the rows in per-partition buffers by user, as the producer service does (a user's events
   stay on one partition), or one buffer sent round robin; a full buffer (``batch_size``) is
   sent as one batch;
4. every ``linger_ms`` (or 128 batches) every buffer is sent and the transaction commits: the
   batches, the dead letters, a position record and the consumed input offsets
   (``send_offsets_to_transaction``) together. A batch therefore waits at most ``linger_ms``,
   and a crash at any point leaves either all of a transaction or none of it.

Back-pressure: at most ``max_in_flight_batches`` unacknowledged batches (the loop waits on the
acknowledgements and reads nothing meanwhile); buffers hold at most one transaction of events.

Recovery: Apache Kafka hides aborted transactions and resumes the group at its committed
offsets, which is the whole story there. The embedded broker shows aborted transactions to
read_committed readers and may not keep their offsets, so, as for the replay producers
(``producers.recovery``): each transaction's position record names the examples topic's offsets
after it, the next input offsets (a partition the run has not read keeps the one recovered for
it) and the places still to skip; on start, every batch of this source visible after those
offsets counts as delivered (its headers list the events' places), those events and the
record's places are skipped, and each input partition resumes at the later of the group's
offset and the record's.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from typing import Any

import numpy as np
from confluent_kafka import KafkaException, TopicPartition
from confluent_kafka.admin import AdminClient

from distill.core import metrics as m
from distill.core.config import Config, ProducerConfig
from distill.core.dead_letters import DeadLetters
from distill.core.exceptions import ConfigError, DecodeError
from distill.core.kafka import (
    Clients,
    consume_available,
    ensure_topics,
    export_lag,
    partition_count,
    retrying,
    without_errors,
)
from distill.core.layout import layout_problems
from distill.core.service import Service
from distill.core.wire import Codec
from producers import recovery
from producers.batcher import Batcher
from producers.delivery import COUNTS, Delivery
from producers.records import Mapper, Row, check_registry, make_decoder, place, to_chunk
from producers.running import Worker, closing_figures, producer_settings, run_service
from producers.source import Source
from producers.transaction import Sent, Transactions, transactional_producer

log = logging.getLogger(__name__)

SOURCE = "events"
LAG_EVERY_S = 2.0
POLL_S = 0.1
REGISTRY_WAIT_S = 60.0  # then start-up fails: the registry stays unreachable
PROGRESS_EVERY_S = 10.0


class _Columns(Source):
    """The names the batches carry: the config's, which the mapping must match."""

    name = SOURCE

    def __init__(self, config: Config):
        self.categorical_names = list(config.features.categorical_names)
        self.dense_names = list(config.features.dense)
        self.task_names = [t.name for t in config.tasks]


def check_mapping(config: Config) -> None:
    """The ``[events]`` mapping must produce exactly the configured columns, in order."""
    ecfg = config.events
    # The tasks are checked by the Mapper (labels is a table: its order does not matter).
    tasks = [t.name for t in config.tasks]
    problems = layout_problems(config, ecfg.categorical, ecfg.dense, tasks, "events")
    if problems:
        raise ConfigError(
            "the [events] mapping does not match the config: "
            + "; ".join(p.replace("events has", "the mapping gives") for p in problems)
            + "; list the fields in [events] categorical/dense/labels in the order of [features] and [tasks]"
        )


class _Record:
    """The position record of one transaction (key ``events.<producer id>``)."""

    def __init__(
        self,
        producer_id: str,
        next_seq: int,
        offsets: dict[int, int],
        inputs: dict[int, int],
        skip: list[int] | None = None,
    ):
        self.producer_id = producer_id
        self.next_seq = next_seq
        self.offsets = offsets  # examples topic: partition -> offset after this source's last batch
        self.inputs = inputs  # events topic: partition -> next offset to read
        # places an aborted-but-visible transaction delivered that no run has read past yet: they
        # lie before ``offsets``, where the next recovery's scan does not look
        self.skip = skip or []

    def encode(self) -> tuple[bytes, bytes]:
        value = {
            "source": SOURCE,
            "producer_id": self.producer_id,
            "next_seq": self.next_seq,
            "offsets": {str(p): o for p, o in sorted(self.offsets.items())},
            "inputs": {str(p): o for p, o in sorted(self.inputs.items())},
            "skip": self.skip,
            "written_at": time.time(),
        }
        return record_key(self.producer_id), json.dumps(value).encode()


def record_key(producer_id: str) -> bytes:
    return f"{SOURCE}.{producer_id}".encode()


class _TransactionalDeadLetters:
    """What ``DeadLetters`` produces goes into the open transaction (a dead letter is written
    exactly once, with the offsets of the event it replaces)."""

    def __init__(self, add: Any):
        self.add = add

    def produce(self, topic: str, value: bytes, key: bytes | None = None, headers: Any = None) -> None:
        self.add(Sent(-1, key or b"", value, list(headers or []), np.zeros(0, np.int64), 0, topic=topic))


class EventsService(Worker):
    """Runs the events source. Build it, then ``run()``; see ``run_events``."""

    def __init__(self, config: Config, *, producer: ProducerConfig | None = None, service: Service | None = None):
        self.config = config
        self.ecfg = config.events
        self.pcfg = pcfg = producer or config.producer
        check_mapping(config)
        if self.ecfg.topic in (config.topics.examples, config.topics.labels, config.topics.checkpoints):
            raise ConfigError(
                f"events.topic {self.ecfg.topic!r} is one of the pipeline's own topics; "
                "name the topic your services write"
            )
        self.columns = _Columns(config)
        self.mapper = Mapper(self.ecfg, self.columns.task_names, config.wire.non_finite)
        self.decode = make_decoder(self.ecfg)
        self.topic = config.topics.examples
        self.service = service or Service("producer", pcfg.producer_id, port=pcfg.metrics_port)
        self.codec = Codec(config.wire.non_finite)
        self.clients = Clients(config.kafka, f"events.{pcfg.producer_id}")
        self.pid = pcfg.producer_id
        self.producer: Any = None
        self.consumer: Any = None
        self.txn: Transactions | None = None
        self.delivery: Delivery | None = None
        self.dead: DeadLetters | None = None
        self.partitions = 0
        # A batch waits at most linger_ms: then the transaction commits with every buffer sent.
        self.batcher = Batcher(
            self.pid,
            self.columns,
            self.codec,
            by_user=pcfg.partitioner == "user",
            size=pcfg.batch_size,
            linger_s=pcfg.linger_ms / 1000.0,
        )
        self.record = _Record(self.pid, 0, {}, {})
        self.consumed: dict[int, int] = {}  # input partition -> next offset, in the open transaction or before
        self.skip: set[int] = set()  # places delivered by an aborted-but-visible transaction (embedded broker)
        self.resume: dict[int, int] = {}  # input partition -> the record's next offset
        self._failed = False
        self._last_lag = 0.0
        self._last_progress = time.monotonic()
        self._started = 0.0
        self.counts = {"events": 0, "rejected": 0, "skipped": 0, **COUNTS}

    @property
    def next_seq(self) -> int:
        return self.batcher.next_seq

    # -- set-up ------------------------------------------------------------------------------
    def start(self) -> None:
        admin = self.clients.admin()
        ensure_topics(self.config, admin)
        if not partition_count(admin, self.ecfg.topic):
            raise ConfigError(
                f"events topic {self.ecfg.topic!r} (events.topic) does not exist; create it, or point events.topic "
                "at the topic your services write"
            )
        self._ensure_dlq(admin)
        if self.ecfg.format == "avro":
            for attempt in retrying("reaching the schema registry", REGISTRY_WAIT_S):
                with attempt:
                    check_registry(self.ecfg)
        self.partitions = partition_count(admin, self.topic) or self.config.topics.partitions
        self._started = time.monotonic()
        positions_topic = recovery.positions_topic(self.topic)
        recovery.ensure_positions_topic(admin, positions_topic, self.config.topics.replication_factor)
        tid = f"{SOURCE}.{self.pid}"
        self.producer = transactional_producer(self.clients, tid)
        self.delivery = Delivery(
            self.producer,
            self.topic,
            self.service,
            (self.pid, SOURCE),
            self.counts,
            max_in_flight=self.pcfg.max_in_flight_batches,
            what="messages",
        )
        self.txn = Transactions(
            self.producer,
            positions_topic,
            tid,
            self.delivery.produce,
            self.service.heartbeat,
            max_s=self.pcfg.linger_ms / 1000.0,
            encode=_Record.encode,
            before_commit=self._send_offsets,
        )
        self._recover(admin, positions_topic)
        # DeadLetters only calls produce(): its records join the open transaction.
        shim: Any = _TransactionalDeadLetters(self._add)
        self.dead = DeadLetters(shim, self.codec, "events", self.pid)
        self.batcher.layout(self.partitions)
        self.consumer = self.clients.consumer(self.ecfg.group_id)
        self.consumer.subscribe(
            [self.ecfg.topic], on_assign=self._on_assign, on_revoke=self._on_revoke, on_lost=self._on_lost
        )
        self.service.set_ready(True, f"reading {self.ecfg.topic}, producing to {self.topic}")
        log.info(
            "events source started",
            extra={"events_topic": self.ecfg.topic, "format": self.ecfg.format, "topic": self.topic},
        )

    def _ensure_dlq(self, admin: AdminClient) -> None:
        from confluent_kafka.admin import NewTopic

        dlq = self.config.topics.dlq(self.ecfg.topic)
        if partition_count(admin, dlq):
            return
        spec = NewTopic(dlq, 1, self.config.topics.replication_factor)
        for future in admin.create_topics([spec], operation_timeout=10).values():
            try:
                future.result()
            except KafkaException as exc:
                if "already exists" not in str(exc).lower():
                    raise

    def _recover(self, admin: AdminClient, positions_topic: str) -> None:
        key = record_key(self.pid)
        last = None
        for msg in recovery.read_to_end(self.clients, admin, positions_topic, {}):
            if msg.key() == key:
                last = msg
        if last is None:
            # A first record before any batch: recovery never reads the examples topic from 0.
            ends = self._examples_ends(admin)
            self.record = _Record(self.pid, 0, ends, {})
            self._call_txn_alone()
        else:
            try:
                data = json.loads(last.value() or b"")
                self.record = _Record(
                    self.pid,
                    int(data["next_seq"]),
                    {int(p): int(o) for p, o in data["offsets"].items()},
                    {int(p): int(o) for p, o in data["inputs"].items()},
                    [int(w) for w in data.get("skip", [])],
                )
            except (ValueError, KeyError, TypeError) as exc:
                raise ConfigError(
                    f"the last record of {key.decode()!r} in {positions_topic!r} is not readable ({exc}); "
                    "give this source another producer.producer_id"
                ) from None
        self.batcher.next_seq = self.record.next_seq
        self.resume = dict(self.record.inputs)
        self.skip.update(self.record.skip)
        found = 0
        for msg in recovery.read_to_end(self.clients, admin, self.topic, self.record.offsets):
            headers: Any = msg.headers()
            batch = recovery.read_batch_headers(headers)
            if batch is None or batch[0] != self.pid:
                continue
            _, seq, places = batch
            self.skip.update(places.tolist())
            self.batcher.next_seq = max(self.batcher.next_seq, seq + 1)
            self.record.offsets[int(msg.partition() or 0)] = int(msg.offset() or 0) + 1
            found += 1
        log.info(
            "recovered the events position",
            extra={"next_seq": self.next_seq, "inputs": self.resume, "batches_after": found, "skip": len(self.skip)},
        )

    def _examples_ends(self, admin: AdminClient) -> dict[int, int]:
        from confluent_kafka import IsolationLevel
        from confluent_kafka.admin import OffsetSpec

        parts = [TopicPartition(self.topic, p) for p in range(self.partitions)]
        answers = admin.list_offsets(
            {tp: OffsetSpec.latest() for tp in parts}, isolation_level=IsolationLevel.READ_UNCOMMITTED
        )
        return {tp.partition: f.result().offset for tp, f in answers.items()}

    def _call_txn_alone(self) -> None:
        """Commit the first position record in a transaction of its own."""
        key, value = self.record.encode()
        self.producer.begin_transaction()
        self.producer.produce(recovery.positions_topic(self.topic), key=key, value=value, partition=0)
        self.producer.commit_transaction(30)

    # -- rebalances --------------------------------------------------------------------------
    def _on_assign(self, consumer: Any, partitions: list[TopicPartition]) -> None:
        # The group's committed offset, unless the position record is further on (the embedded
        # broker can show a transaction whose offsets it did not keep).
        committed = consumer.committed(partitions, timeout=10)
        for tp in committed:
            ahead = self.resume.get(tp.partition)
            if ahead is not None and ahead > tp.offset:
                tp.offset = ahead
                log.info("resuming after the group offset", extra={"partition": tp.partition, "offset": ahead})
        consumer.incremental_assign(committed)  # the workers' consumers are cooperative-sticky

    def _on_revoke(self, consumer: Any, partitions: list[TopicPartition]) -> None:
        # Their events must be in a committed transaction before another member reads on.
        if self.txn is not None and not self._failed:
            self._commit()
        for tp in partitions:
            self.consumed.pop(tp.partition, None)
            self.resume.pop(tp.partition, None)

    def _on_lost(self, consumer: Any, partitions: list[TopicPartition]) -> None:
        # Another member may already read them: what is open cannot commit.
        log.warning("partitions lost; aborting the open transaction", extra={"partitions": len(partitions)})
        if self.txn is not None:
            self.txn.abandon()
        self.batcher.clear()
        self.consumed.clear()
        self.skip.clear()

    # -- the loop ----------------------------------------------------------------------------
    def step(self) -> bool:
        assert self.delivery is not None
        try:
            self.producer.poll(0)
            self.delivery.raise_failures()
            # While a partial batch waits, wait for events no longer than its linger.
            wait = min(POLL_S, self.batcher.linger_s) if self.batcher.rows else POLL_S
            msgs = consume_available(self.consumer, self.ecfg.max_poll_records, wait)
            rows = self._map(without_errors(msgs, self._not_ready))
            if rows:
                cols = self.columns
                chunk = to_chunk(rows, len(cols.categorical_names), len(cols.dense_names), len(cols.task_names))
                self.batcher.add(chunk, time.monotonic())
            self._send(force=False)
            now = time.monotonic()
            if self._due(now):
                self._commit()
            self._observe(now)
            return True
        except BaseException:
            self._failed = True
            raise

    def _due(self, now: float) -> bool:
        """The open transaction is old or full, or a partial batch has lingered long enough."""
        if self.txn is not None and self.txn.due(now):
            return True
        oldest = self.batcher.oldest()
        return oldest is not None and now - oldest >= self.batcher.linger_s

    def _map(self, msgs: list[Any]) -> list[Row]:
        rows = []
        for msg in msgs:
            p, o = msg.partition(), msg.offset()
            self.consumed[p] = o + 1
            self.counts["events"] += 1
            where = place(p, o)
            if self.skip and where in self.skip:
                self.skip.discard(where)
                self.counts["skipped"] += 1
                continue
            try:
                rows.append(self.mapper.row(self.decode(msg.value()), where))
            except DecodeError as exc:
                self.counts["rejected"] += 1
                m.EVENTS_REJECTED.labels(self.pid, exc.reason).inc()
                assert self.dead is not None
                self.dead.send(msg, exc)
        m.EVENTS_CONSUMED.labels(self.pid).inc(len(msgs))
        return rows

    def _send(self, force: bool) -> None:
        """The full buffers as batches (``force``: every buffer), into the open transaction."""
        for sent in self.batcher.ready(time.monotonic(), lingered=False, force=force):
            self._add(sent)
        m.EVENTS_BUFFERED.labels(self.pid).set(self.batcher.rows)

    def _add(self, sent: Sent) -> None:
        assert self.txn is not None
        self.txn.add(sent)

    def _not_ready(self, why: str) -> None:
        self.service.set_ready(False, why)

    def _commit(self) -> None:
        assert self.txn is not None and self.delivery is not None
        self._send(force=True)  # every consumed event is in this transaction: its offsets can commit
        if not self.txn.batches:
            return
        self.record, done = self.txn.commit(self._next_record, self.delivery.flush)
        self.delivery.count(done)
        self.resume.clear()

    def _next_record(self, batches: list[Sent]) -> _Record:
        offsets = dict(self.record.offsets)
        for sent in batches:
            if sent.topic is None:
                offsets[sent.partition] = max(offsets.get(sent.partition, 0), sent.offset + 1)
        # A partition this run has not read yet (not assigned yet, or nothing new) keeps the
        # position recovered for it, and the places still to skip go on: a run killed before
        # reading it must leave the next one both, or that one reads those events again.
        inputs = {**{p: o for p, o in self.record.inputs.items() if p not in self.consumed}, **self.consumed}
        return _Record(self.pid, self.next_seq, offsets, inputs, sorted(self.skip))

    def _send_offsets(self) -> None:
        offsets = [TopicPartition(self.ecfg.topic, p, o) for p, o in sorted(self.consumed.items())]
        if offsets:
            self.producer.send_offsets_to_transaction(offsets, self.consumer.consumer_group_metadata(), 30)

    def _observe(self, now: float) -> None:
        if now - self._last_lag >= LAG_EVERY_S:
            self._last_lag = now
            export_lag(self.consumer, "events", self.pid)
        if now - self._last_progress >= PROGRESS_EVERY_S:
            self._last_progress = now
            log.info("progress", extra={k: self.counts[k] for k in ("events", "rejected", "examples", "batches")})

    # -- stop --------------------------------------------------------------------------------
    def close(self) -> None:
        if self.delivery is None:
            return
        try:
            if not self._failed and self.txn is not None:
                self._commit()
            elif self.txn is not None:
                self.txn.abandon()
            self.delivery.drain()
        finally:
            if self.consumer is not None:
                self.consumer.close()

    def result(self) -> dict[str, Any]:
        return {
            "source": SOURCE,
            "producer_id": self.pid,
            "events_topic": self.ecfg.topic,
            "topic": self.topic,
            "partitions": self.partitions,
            "stopped": "signal",
            **self.counts,
            "next_seq": self.next_seq,
            **closing_figures(self._started, self.counts["examples"], self.txn),
        }


def run_events(
    config: Config,
    *,
    handle_signals: bool = True,
    serve_http: bool = True,
    stop: threading.Event | None = None,
    **producer_overrides: Any,
) -> dict[str, Any]:
    """Run the events source until SIGTERM/SIGINT (or ``stop`` is set); returns the counts:
    ``events`` (read), ``rejected`` (sent to the DLQ), ``skipped`` (delivered by a previous run,
    embedded broker only), ``examples``/``batches``/``bytes`` (committed), ``transactions``...
    ``producer_overrides`` replace fields of ``config.producer`` (None keeps the config's)."""
    pcfg = producer_settings(config, **producer_overrides)
    return run_service(
        pcfg,
        lambda service: EventsService(config, producer=pcfg, service=service),
        handle_signals=handle_signals,
        serve_http=serve_http,
        stop=stop,
        finished="events source stopped",
    )
