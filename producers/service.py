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

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from confluent_kafka import KafkaException

from distill.core.config import Config, ProducerConfig
from distill.core.kafka import Clients, ensure_topics, fatal_cause, fenced, fenced_error, partition_count
from distill.core.service import Service
from distill.core.wire import Codec
from producers import position as positions
from producers import recovery
from producers.batcher import Batcher
from producers.batcher import user_partition as user_partition  # where callers have found it
from producers.delivery import COUNTS, Delivery
from producers.running import Worker, closing_figures, producer_settings, run_service
from producers.source import Chunk, Source
from producers.sources import check_columns, make_source
from producers.transaction import Sent, Transactions, transactional_producer

log = logging.getLogger(__name__)

SAVE_EVERY_S = 1.0
PROGRESS_EVERY_S = 10.0
MAX_LAG_S = 1.0  # a paced producer that fell behind catches up at most this much in a burst


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


class ProducerService(Worker):
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
        self.clients = Clients(config.kafka, f"producer.{pcfg.producer_id}")

        self.position_file = Path(pcfg.position_file) if pcfg.position_file else None
        # A position file makes the replay resumable, and resumable means exactly-once:
        # transactions, and the position recovered from Kafka on start (the file is the fallback).
        self.exactly_once = self.position_file is not None
        self.position = (
            positions.load(self.position_file, source.name, pcfg.producer_id)
            if self.position_file
            else positions.Position(source.name, pcfg.producer_id)
        )
        self.batcher = Batcher(
            pcfg.producer_id,
            source,
            Codec(config.wire.non_finite),
            by_user=pcfg.partitioner == "user",
            size=pcfg.batch_size,
            linger_s=pcfg.linger_ms / 1000.0,
        )
        self.batcher.next_seq = self.position.next_seq
        self.txn: Transactions | None = None
        self.delivery: Delivery | None = None
        self.pacer = Pacer(pcfg.rate, pcfg.speedup)

        self.partitions = 0
        self.producer: Any = None
        self._chunks: Any = None
        self._staged: Chunk | None = None
        self._release = np.zeros(0)
        self._cursor = 0
        self.exhausted = False
        self.stop_reason = ""
        self._failed = False
        self._dirty = False
        self._last_save = 0.0
        self._last_progress = time.monotonic()
        self.counts = {"accepted": 0, "skipped": 0, **COUNTS}
        self._started = 0.0
        self._buffer_limit = 0  # set by start(), from the partition count
        self._resuming = False

    @property
    def delivered(self) -> positions.Delivered:
        return self.position.delivered

    @property
    def next_seq(self) -> int:
        return self.batcher.next_seq

    @property
    def in_flight(self) -> int:
        return self.delivery.in_flight if self.delivery is not None else 0

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
            self._deliver_through(self.producer, on_acknowledged=self._acknowledged)
        self.batcher.layout(self.partitions)
        # Large enough for a full batch per partition from one chunk, small enough to bound memory.
        chunk_rows = self.pcfg.batch_size * len(self.batcher.buffers)
        self._buffer_limit = chunk_rows + self.pcfg.batch_size
        start = self.delivered.watermark
        self._resuming = bool(self.delivered.above().any())
        self._chunks = iter(self.source.chunks(start=start, size=chunk_rows))
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

    def _deliver_through(self, producer: Any, on_acknowledged: Callable[[Sent], None] | None = None) -> Delivery:
        self.delivery = Delivery(
            producer,
            self.topic,
            self.service,
            (self.pcfg.producer_id, self.source.name),
            self.counts,
            max_in_flight=self.pcfg.max_in_flight_batches,
            what="example batches",
            on_acknowledged=on_acknowledged,
        )
        return self.delivery

    def _start_transactions(self, admin: Any) -> None:
        pid = self.pcfg.producer_id
        topic = recovery.positions_topic(self.topic)
        recovery.ensure_positions_topic(admin, topic, self.config.topics.replication_factor)
        tid = f"producer.{pid}"
        self.producer = transactional_producer(self.clients, tid)
        delivery = self._deliver_through(self.producer)
        self.position = recovery.recover(self.clients, self.topic, self.source.name, pid, self.position)
        self.batcher.next_seq = self.position.next_seq
        self.txn = Transactions(self.producer, topic, tid, delivery.produce, self.service.heartbeat)

    # -- the loop ----------------------------------------------------------------------------
    def step(self) -> bool:
        assert self.delivery is not None
        try:
            self.producer.poll(0)
            self.delivery.raise_failures()
            now = time.monotonic()
            self._accept(now)
            self._flush(now, force=self.exhausted)
            if self.txn is not None and (self.txn.due(now) or (self.exhausted and not self.batcher.rows)):
                self._commit()
            self._maybe_save(now)
            self._progress(now)
            if self.exhausted and not self.batcher.rows:
                return False
            self._idle(time.monotonic())
            return True
        except KafkaException as exc:
            self._failed = True
            if self.txn is not None and fenced(fatal_cause(self.producer, exc)):
                raise fenced_error(self.txn.transactional_id, "producer.producer_id") from None
            raise
        except BaseException:
            self._failed = True
            raise

    def _accept(self, now: float) -> None:
        """Move examples that are due from the source into the partition buffers."""
        max_examples = self.pcfg.max_examples
        while self.batcher.rows < self._buffer_limit:
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
            self.batcher.add(part, now)

    def _end(self, reason: str) -> None:
        self.exhausted = True
        self.stop_reason = self.stop_reason or reason

    def _flush(self, now: float, force: bool) -> None:
        assert self.delivery is not None
        for sent in self.batcher.ready(now, force=force):
            if self.txn is not None:
                self.txn.add(sent)
            else:
                self.delivery.produce(sent)

    def _acknowledged(self, sent: Sent) -> None:
        """Without transactions a batch is delivered when acknowledged."""
        assert self.delivery is not None
        self.delivered.add(sent.positions)
        self.delivery.count([sent])

    def _commit(self) -> None:
        assert self.txn is not None and self.delivery is not None
        if not self.txn.batches:
            return
        self.position, done = self.txn.commit(self._next_position, self.delivery.flush)
        self.delivery.count(done)
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
        if not self.exhausted and self.batcher.rows < self._buffer_limit:
            if self._staged is None or self._cursor >= len(self._staged):
                self.producer.poll(0)  # the source can be read right away
                return
            deadlines.append(float(self._release[self._cursor]))
        oldest = self.batcher.oldest()
        if oldest is not None:
            deadlines.append(oldest + self.batcher.linger_s)
        txn_deadline = self.txn.deadline() if self.txn is not None else None
        if txn_deadline is not None:
            deadlines.append(txn_deadline)
        wait = min(deadlines) - now if deadlines else 0.0
        # At least 1 ms so a high rate releases examples in groups rather than one per step.
        self.producer.poll(min(max(wait, 0.001), 0.1) if wait > 0 else 0)

    # -- stop --------------------------------------------------------------------------------
    def close(self) -> None:
        if self.delivery is None:
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
        self.delivery.drain()
        self._maybe_save(time.monotonic(), force=True)
        if not self._failed:
            self.delivery.raise_failures()

    def result(self) -> dict[str, Any]:
        return {
            "source": self.source.name,
            "producer_id": self.pcfg.producer_id,
            "topic": self.topic,
            "partitions": self.partitions,
            "stopped": self.stop_reason or "signal",
            **self.counts,
            "position": self.delivered.watermark,
            "next_seq": self.next_seq,
            **closing_figures(self._started, self.counts["examples"], self.txn),
        }


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
    return run_service(
        pcfg,
        lambda service: ProducerService(config, src, producer=pcfg, service=service),
        handle_signals=handle_signals,
        serve_http=serve_http,
        stop=stop,
        finished="producer finished",
    )
