"""The producer service: a source's chunks in, ExampleBatch messages on the examples topic out.

One loop (``step``), top to bottom:
1. serve delivery reports (``poll``) and surface any failure;
2. *accept* examples from the source as the pacing allows (rate in examples/s and, for
   replays, event time divided by the speed-up), skipping positions a previous run delivered;
3. put them in per-partition buffers: by user (a stable hash of the user id, so a user's events
   stay on one partition in event-time order) or one buffer sent round robin;
4. send a buffer as one batch when it holds ``batch_size`` examples or its oldest example has
   waited ``linger_ms``; never more than ``max_in_flight_batches`` unacknowledged (the loop
   waits on ``poll`` instead: memory stays bounded whatever the broker does);
5. with a position file (a resumable replay), commit the batches in transactions together with
   the position they bring the replay to (``producers.transaction``); a restart resumes from
   the last committed position (``producers.recovery``), so after any number of SIGKILLs each
   position is in the topic once. The file is only a cache of that position, written every
   second. Without a position file, batches count as delivered when acknowledged.

Stop order on SIGTERM: the loop finishes its step, then everything accepted is sent, the client
is flushed (every delivery report served), the last transaction committed, and the position
file written last.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import ValidationError

from distill.core import metrics as m
from distill.core.config import Config, ProducerConfig
from distill.core.exceptions import ConfigError, DeliveryError
from distill.core.kafka import Clients, ensure_topics, partition_count, retrying
from distill.core.service import Service
from distill.core.wire import Codec
from producers import position as positions
from producers import recovery
from producers.source import Chunk, Source
from producers.sources import check_columns, make_source
from producers.transaction import TXN_TIMEOUT_MS, Sent, Transactions

log = logging.getLogger(__name__)

SAVE_EVERY_S = 1.0
PROGRESS_EVERY_S = 10.0
MAX_LAG_S = 1.0  # a paced producer that fell behind catches up at most this much in a burst
NOT_READY_AFTER_S = 10.0  # waiting this long for acknowledgements means the broker is in trouble
FLUSH_TIMEOUT_S = 30.0


def user_partition(users: np.ndarray, partitions: int) -> np.ndarray:
    """Stable partition of each user: a 64-bit mix (murmur3 finaliser) then modulo.

    The same user id lands on the same partition in every process and run (Python's ``hash``
    would not), and consecutive ids spread evenly.
    """
    x = users.astype(np.uint64)
    x ^= x >> np.uint64(33)
    x *= np.uint64(0xFF51AFD7ED558CCD)
    x ^= x >> np.uint64(33)
    x *= np.uint64(0xC4CEB9FE1A85EC53)
    x ^= x >> np.uint64(33)
    return (x % np.uint64(partitions)).astype(np.int64)


class Pacer:
    """Release time (monotonic seconds) of each accepted example: the later of the rate limit
    and the event-time schedule. Without either, everything is released at once."""

    def __init__(self, rate: float | None, speedup: float | None):
        self.rate, self.speedup = rate, speedup
        self.t0: float | None = None
        self.first_event_ms: int | None = None
        self.scheduled = 0

    @property
    def paced(self) -> bool:
        return self.rate is not None or self.speedup is not None

    def schedule(self, chunk: Chunk, now: float) -> np.ndarray:
        n = len(chunk)
        if not self.paced:
            self.scheduled += n
            return np.full(n, -np.inf)
        if self.t0 is None:
            self.t0 = now
            self.first_event_ms = int(chunk.event_time_ms[0])
        times = np.full(n, -np.inf)
        if self.rate is not None:
            times = np.maximum(times, self.t0 + (self.scheduled + np.arange(n)) / self.rate)
        if self.speedup is not None:
            since = (chunk.event_time_ms - self.first_event_ms) / 1000.0 / self.speedup
            times = np.maximum(times, self.t0 + since)
        self.scheduled += n
        behind = now - MAX_LAG_S - times[0]
        if behind > 0:
            # A stalled broker must not be followed by a burst of everything that was due.
            self.t0 += behind
            times = times + behind
        return times


class _Buffer:
    """Accepted examples waiting to become one batch."""

    def __init__(self) -> None:
        self.pieces: list[Chunk] = []
        self.rows = 0
        self.since = 0.0  # when its oldest example was accepted

    def add(self, piece: Chunk, now: float) -> None:
        if not self.rows:
            self.since = now
        self.pieces.append(piece)
        self.rows += len(piece)

    def take(self, n: int) -> Chunk:
        whole = Chunk.concat(self.pieces)
        head, rest = whole.take(slice(0, n)), whole.take(slice(n, None))
        self.pieces = [rest] if len(rest) else []
        self.rows = len(rest)
        return head


class ProducerService:
    """Runs one source into the examples topic. Build it, then ``run()``; see ``run_producer``."""

    def __init__(
        self,
        config: Config,
        source: Source,
        *,
        producer: ProducerConfig | None = None,
        service: Service | None = None,
    ):
        self.config = config
        self.pcfg = pcfg = producer or config.producer
        self.source = source
        check_columns(config, source)
        self.topic = config.topics.examples
        self.service = service or Service("producer", pcfg.producer_id, port=pcfg.metrics_port)
        self.codec = Codec(config.wire.non_finite)
        self.clients = Clients(config.kafka, f"producer.{pcfg.producer_id}")
        self.labels = (pcfg.producer_id, source.name)

        self.position_file = Path(pcfg.position_file) if pcfg.position_file else None
        # A position file makes the replay resumable, and resumable means exactly-once:
        # transactions, and the position recovered from Kafka on start (the file is the fallback).
        self.exactly_once = self.position_file is not None
        self.position = (
            positions.load(self.position_file, source.name, pcfg.producer_id)
            if self.position_file
            else positions.Position(source.name, pcfg.producer_id)
        )
        self.next_seq = self.position.next_seq
        self.txn: Transactions | None = None
        self.pacer = Pacer(pcfg.rate, pcfg.speedup)

        self.partitions = 0
        self.producer: Any = None
        self.buffers: list[_Buffer] = []
        self._rr_next = 0
        self._chunks: Any = None
        self._staged: Chunk | None = None
        self._release = np.zeros(0)
        self._cursor = 0
        self.exhausted = False
        self.stop_reason = ""
        self._failed = False
        self._failures: list[str] = []
        self._dirty = False
        self._last_save = 0.0
        self._last_ack = time.monotonic()
        self._stalled = False
        self._last_progress = time.monotonic()
        self.in_flight = 0
        self._newest_ms = -(2**62)
        self.counts = {
            "accepted": 0,
            "skipped": 0,
            "examples": 0,
            "batches": 0,
            "bytes": 0,
            "failed_batches": 0,
            "max_in_flight": 0,
        }
        self._started = 0.0
        # Batch ids must never repeat across runs (readers de-duplicate by them): each run
        # of the producer gets its own token; a resumed replay continues its sequence too.
        self.run_token = uuid.uuid4().hex[:8]
        self._buffer_limit = 0  # set by start(), from the partition count
        self._resuming = False

    @property
    def delivered(self) -> positions.Delivered:
        return self.position.delivered

    # -- set-up ------------------------------------------------------------------------------
    def start(self) -> None:
        admin = self.clients.admin()
        ensure_topics(self.config, admin)
        self.partitions = partition_count(admin, self.topic) or self.config.topics.partitions
        self._started = time.monotonic()  # the run's seconds include the recovery
        if self.exactly_once:
            self._start_transactions(admin)
        else:
            self.producer = self.clients.producer()
        user = self.pcfg.partitioner == "user"
        self.buffers = [_Buffer() for _ in range(self.partitions if user else 1)]
        # Large enough for a full batch per partition from one chunk, small enough to bound memory.
        chunk_rows = self.pcfg.batch_size * (self.partitions if user else 1)
        self._buffer_limit = chunk_rows + self.pcfg.batch_size
        start = self.delivered.watermark
        self._resuming = self.delivered.above().any()
        self._chunks = iter(self.source.chunks(start=start, size=chunk_rows))
        m.PRODUCER_QUEUE.labels(self.pcfg.producer_id).set(0)
        self.service.set_ready(True, f"producing to {self.topic} ({self.partitions} partitions)")
        log.info(
            "producing",
            extra={
                "source": self.source.name,
                "topic": self.topic,
                "partitions": self.partitions,
                "start_position": start,
                "partitioner": self.pcfg.partitioner,
            },
        )

    def _start_transactions(self, admin: Any) -> None:
        pid = self.pcfg.producer_id
        topic = recovery.positions_topic(self.topic)
        recovery.ensure_positions_topic(admin, topic, self.config.topics.replication_factor)
        tid = f"producer.{pid}"
        self.producer = self.clients.producer(transactional_id=tid, **{"transaction.timeout.ms": TXN_TIMEOUT_MS})
        # First: this aborts the open transaction of a killed predecessor (and fences it).
        for attempt in retrying("initialising transactions", 60.0):
            with attempt:
                self.producer.init_transactions(10)
        self.position = recovery.recover(self.clients, self.topic, self.source.name, pid, self.position)
        self.next_seq = self.position.next_seq
        self.txn = Transactions(self.producer, topic, tid, self._produce, self.service.heartbeat)

    # -- the loop ----------------------------------------------------------------------------
    def step(self) -> bool:
        try:
            self.producer.poll(0)
            self._raise_failures()
            now = time.monotonic()
            self._accept(now)
            self._flush(now, force=self.exhausted)
            if self.txn is not None and (self.txn.due(now) or (self.exhausted and not self._buffered())):
                self._commit()
            self._maybe_save(now)
            self._progress(now)
            if self.exhausted and not self._buffered():
                return False
            self._idle(time.monotonic())
            return True
        except BaseException:
            self._failed = True
            raise

    def _buffered(self) -> int:
        return sum(b.rows for b in self.buffers)

    def _accept(self, now: float) -> None:
        """Move examples that are due from the source into the partition buffers."""
        max_examples = self.pcfg.max_examples
        while self._buffered() < self._buffer_limit:
            if self._staged is None or self._cursor >= len(self._staged):
                self._staged = None
                if self.exhausted:
                    return
                if max_examples is not None and self.counts["accepted"] >= max_examples:
                    self._end("max_examples")
                    return
                chunk = next(self._chunks, None)
                if chunk is None:
                    self._end("end_of_data")
                    return
                if self._resuming:
                    # Positions a previous run delivered after its watermark are not sent again.
                    done = self.delivered.contains(chunk.positions)
                    if done.any():
                        self.counts["skipped"] += int(done.sum())
                        chunk = chunk.take(~done)
                if max_examples is not None:
                    chunk = chunk.take(slice(0, max_examples - self.counts["accepted"]))
                if not len(chunk):
                    continue
                self._staged, self._cursor = chunk, 0
                self._release = self.pacer.schedule(chunk, now)
            due = int(np.searchsorted(self._release, now, side="right"))
            if due <= self._cursor:
                return  # the next example is not due yet
            part = self._staged.take(slice(self._cursor, due))
            self._cursor = due
            self.counts["accepted"] += len(part)
            self._distribute(part, now)

    def _end(self, reason: str) -> None:
        self.exhausted = True
        self.stop_reason = self.stop_reason or reason

    def _distribute(self, part: Chunk, now: float) -> None:
        if len(self.buffers) == 1:
            self.buffers[0].add(part, now)
            return
        which = user_partition(part.users, self.partitions)
        # A stable sort keeps stream (event-time) order inside each partition.
        # (int16 keys: numpy's stable sort is then a radix sort.)
        order = np.argsort(which.astype(np.int16 if self.partitions < 2**15 else np.int64), kind="stable")
        bounds = np.cumsum(np.bincount(which, minlength=self.partitions))
        lo = 0
        for p, hi in enumerate(bounds):
            if hi > lo:
                self.buffers[p].add(part.take(order[lo:hi]), now)
            lo = int(hi)

    def _flush(self, now: float, force: bool) -> None:
        linger = self.pcfg.linger_ms / 1000.0
        size = self.pcfg.batch_size
        for p, buf in enumerate(self.buffers):
            while buf.rows >= size:
                self._send(buf.take(size), p)
            if buf.rows and (force or now - buf.since >= linger):
                self._send(buf.take(buf.rows), p)

    def _send(self, chunk: Chunk, buffer_index: int) -> None:
        if len(self.buffers) == 1:
            partition = self._rr_next % self.partitions
            self._rr_next += 1
        else:
            partition = buffer_index
        seq = self.next_seq
        self.next_seq += 1
        pid = self.pcfg.producer_id
        batch = chunk.to_batch(f"{pid}-{self.run_token}-{seq}", pid, seq, self.source)
        try:
            value, headers = self.codec.encode_examples(batch)
        except Exception:
            m.PRODUCER_ERRORS.labels(*self.labels).inc()
            raise
        sent = Sent(
            partition=partition,
            key=batch.batch_id.encode(),
            value=value,
            headers=headers + recovery.batch_headers(pid, seq, chunk.positions),
            positions=chunk.positions,
            newest_ms=int(chunk.event_time_ms.max()),
        )
        if self.txn is not None:
            self.txn.add(sent)
        else:
            self._produce(sent)

    def _produce(self, sent: Sent) -> None:
        self._wait_for_room()
        report = functools.partial(self._on_delivery, sent)
        while True:
            try:
                self.producer.produce(
                    self.topic,
                    value=sent.value,
                    key=sent.key,
                    headers=sent.headers,
                    partition=sent.partition,
                    on_delivery=report,
                )
                break
            except BufferError:
                # The client's own queue is full (tiny queue settings): let it drain.
                self.producer.poll(0.05)
        self.in_flight += 1
        self.counts["max_in_flight"] = max(self.counts["max_in_flight"], self.in_flight)
        m.PRODUCER_QUEUE.labels(self.pcfg.producer_id).set(self.in_flight)

    def _wait_for_room(self) -> None:
        """Back-pressure: block on delivery reports while the in-flight window is full."""
        while self.in_flight >= self.pcfg.max_in_flight_batches:
            self.producer.poll(0.05)
            self._raise_failures()
            self.service.heartbeat()
            if time.monotonic() - self._last_ack > NOT_READY_AFTER_S:
                self._stalled = True
                self.service.set_ready(
                    False,
                    f"{self.in_flight} batches unacknowledged for {NOT_READY_AFTER_S:.0f}s; is the broker reachable?",
                )

    def _on_delivery(self, sent: Sent, err: Any, msg: Any) -> None:
        # Called from poll()/flush() on this thread: no lock needed.
        self.in_flight -= 1
        m.PRODUCER_QUEUE.labels(self.pcfg.producer_id).set(self.in_flight)
        self._last_ack = time.monotonic()
        if err is not None:
            self._failures.append(str(err))
            self.counts["failed_batches"] += 1
            m.PRODUCER_ERRORS.labels(*self.labels).inc()
            return
        if self.txn is not None:
            sent.offset = msg.offset()  # counted when its transaction commits
        else:
            self.delivered.add(sent.positions)
            self._count(sent)
        if self._stalled:
            self._stalled = False
            if not self.service.stopping.is_set():
                self.service.set_ready(True, "deliveries acknowledged again")

    def _count(self, sent: Sent) -> None:
        n, nbytes = len(sent.positions), len(sent.value)
        self.counts["examples"] += n
        self.counts["batches"] += 1
        self.counts["bytes"] += nbytes
        m.PRODUCER_EXAMPLES.labels(*self.labels).inc(n)
        m.PRODUCER_BATCHES.labels(*self.labels).inc()
        m.PRODUCER_BYTES.labels(*self.labels).inc(nbytes)
        if sent.newest_ms > self._newest_ms:
            self._newest_ms = sent.newest_ms
            m.PRODUCER_EVENT_TIME.labels(self.pcfg.producer_id).set(sent.newest_ms / 1000.0)

    def _commit(self) -> None:
        if not self.txn.batches:
            return
        self.position, done = self.txn.commit(self._next_position, self._flush_client)
        for sent in done:
            self._count(sent)
        self._dirty = True

    def _next_position(self, batches: list[Sent]) -> positions.Position:
        """The committed position plus the open transaction's (acknowledged) batches."""
        old = self.position
        delivered = old.delivered.copy()
        offsets = dict(old.offsets)
        for sent in batches:
            delivered.add(sent.positions)
            offsets[sent.partition] = max(offsets.get(sent.partition, 0), sent.offset + 1)
        return positions.Position(
            source=old.source,
            producer_id=old.producer_id,
            delivered=delivered,
            next_seq=self.next_seq,
            examples=old.examples + sum(len(s.positions) for s in batches),
            batches=old.batches + len(batches),
            offsets=offsets,
        )

    def _flush_client(self) -> None:
        left = self.producer.flush(FLUSH_TIMEOUT_S)
        self._raise_failures()
        if left:
            raise DeliveryError(f"{left} example batches still unacknowledged after {FLUSH_TIMEOUT_S:.0f}s")

    def _raise_failures(self) -> None:
        if self._failures:
            failures, self._failures = self._failures, []
            raise DeliveryError(
                f"{len(failures)} example batches were not delivered to {self.topic}; first: {failures[0]}"
            )

    def _maybe_save(self, now: float, force: bool = False) -> None:
        if self.position_file is None or not (self._dirty or force):
            return
        if force or now - self._last_save >= SAVE_EVERY_S:
            positions.save(self.position_file, self.position)
            self._dirty = False
            self._last_save = now

    def _progress(self, now: float) -> None:
        if now - self._last_progress >= PROGRESS_EVERY_S:
            self._last_progress = now
            log.info(
                "progress",
                extra={k: self.counts[k] for k in ("accepted", "examples", "batches")}
                | {"in_flight": self.in_flight, "position": self.delivered.watermark},
            )

    def _idle(self, now: float) -> None:
        """Sleep, serving delivery reports, until an example is due or a linger ends."""
        deadlines = []
        if not self.exhausted and self._buffered() < self._buffer_limit:
            if self._staged is None or self._cursor >= len(self._staged):
                self.producer.poll(0)  # the source can be read right away
                return
            deadlines.append(float(self._release[self._cursor]))
        linger = self.pcfg.linger_ms / 1000.0
        deadlines += [b.since + linger for b in self.buffers if b.rows]
        if self.txn is not None and self.txn.deadline() is not None:
            deadlines.append(self.txn.deadline())
        wait = min(deadlines) - now if deadlines else 0.0
        # At least 1 ms so a high rate releases examples in groups rather than one per step.
        self.producer.poll(min(max(wait, 0.001), 0.1) if wait > 0 else 0)

    # -- stop --------------------------------------------------------------------------------
    def close(self) -> None:
        if self.producer is None:
            return
        if self.service.stopping.is_set() and not self.exhausted:
            self.stop_reason = "signal"
        if not self._failed:
            # Everything already accepted goes out before the client is flushed.
            self._flush(time.monotonic(), force=True)
            if self.txn is not None:
                self._commit()
        elif self.txn is not None:
            self.txn.abandon()
        left = self.producer.flush(FLUSH_TIMEOUT_S)
        if left:
            log.error("messages still unacknowledged after flush", extra={"count": left})
        m.PRODUCER_QUEUE.labels(self.pcfg.producer_id).set(self.in_flight)
        self._maybe_save(time.monotonic(), force=True)
        if not self._failed:
            self._raise_failures()

    def run(self) -> dict[str, Any]:
        self.start()
        self.service.run(self.step, self.close)
        return self.result()

    def result(self) -> dict[str, Any]:
        seconds = time.monotonic() - self._started if self._started else 0.0
        return {
            "source": self.source.name,
            "producer_id": self.pcfg.producer_id,
            "topic": self.topic,
            "partitions": self.partitions,
            "stopped": self.stop_reason or "signal",
            **self.counts,
            "position": self.delivered.watermark,
            "next_seq": self.next_seq,
            "transactions": self.txn.commits if self.txn is not None else 0,
            "seconds": round(seconds, 3),
            "examples_per_s": round(self.counts["examples"] / seconds, 1) if seconds > 0 else 0.0,
        }


def producer_settings(config: Config, **overrides: Any) -> ProducerConfig:
    """``config.producer`` with the given fields replaced (None means: keep the config's)."""
    given = {k: v for k, v in overrides.items() if v is not None}
    unknown = sorted(set(given) - set(ProducerConfig.model_fields))
    if unknown:
        raise ConfigError(f"unknown producer options {unknown}; allowed: {sorted(ProducerConfig.model_fields)}")
    try:
        return ProducerConfig.model_validate(config.producer.model_dump() | given)
    except ValidationError as exc:
        where = "; ".join(f"producer.{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise ConfigError(f"invalid producer option: {where}") from None


def run_producer(
    config: Config,
    source: str | Source,
    *,
    handle_signals: bool = True,
    serve_http: bool = True,
    stop: threading.Event | None = None,
    source_options: dict[str, Any] | None = None,
    **producer_overrides: Any,
) -> dict[str, Any]:
    """Produce ``source`` into ``config.topics.examples`` until the data ends, ``max_examples``
    are accepted (counted in this run; with a position file, on top of what earlier runs
    delivered), or a stop is requested (SIGTERM/SIGINT, or ``stop`` set). Returns the counts.

    ``producer_overrides`` replace fields of ``config.producer`` (``max_examples``, ``rate``,
    ``speedup``, ``position_file``, ``batch_size``, ...); None leaves a field as configured.
    ``source_options`` go to the source (``data_dir`` for movielens). ``source`` may also be a
    ready ``Source``. ``handle_signals`` needs the main thread; ``serve_http`` serves /metrics,
    /healthz and /readyz on ``producer.metrics_port``.

    The counts: ``source``, ``producer_id``, ``topic``, ``partitions``, ``stopped``
    (``end_of_data``, ``max_examples`` or ``signal``), ``accepted`` (taken from the source),
    ``skipped`` (delivered by an earlier run), ``examples``/``batches``/``bytes`` (acknowledged
    in this run; with a position file, committed), ``failed_batches``, ``max_in_flight``,
    ``position`` (every position below it is delivered), ``next_seq``, ``transactions``
    (committed; 0 without a position file), ``seconds`` and ``examples_per_s``.
    """
    pcfg = producer_settings(config, **producer_overrides)
    src = source if isinstance(source, Source) else make_source(config, source, **(source_options or {}))
    service = Service("producer", pcfg.producer_id, port=pcfg.metrics_port)
    if stop is not None:
        service.stopping = stop
    # Built before anything starts: a config that does not match the source fails here.
    worker = ProducerService(config, src, producer=pcfg, service=service)
    if handle_signals:
        service.install_signal_handlers()
    if serve_http:
        service.start_http()
    try:
        result = worker.run()
    finally:
        service.shutdown_http()
    log.info("producer finished", extra=result)
    return result
