"""The producer's transactions: many example batches, then the position record they bring the
replay to, committed together (the pattern of Kafka Connect's exactly-once sources, KIP-618).

One transaction holds up to ``TXN_MAX_BATCHES`` batches or ``TXN_MAX_S`` seconds of them,
whichever comes first: a commit costs a flush and a round trip to the coordinator, and the
batches become visible to read_committed readers only then.

The batches of the open transaction stay in memory (encoded) until it commits. When the broker
requires an abort, the same messages, with the same batch ids, go out again in a new
transaction: a broker that shows aborted transactions (the embedded one) then shows two copies
with one batch id, which the readers de-duplicate.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from confluent_kafka import KafkaException

from distill.core.exceptions import BrokerError
from distill.core.kafka import Clients, fenced, fenced_error, is_retriable, needs_abort, retrying
from producers.recovery import encode_record

log = logging.getLogger(__name__)

TXN_MAX_BATCHES = 128
TXN_MAX_S = 0.1
COMMIT_TIMEOUT_S = 30.0
# A producer killed for good leaves its transaction open, and read_committed readers of those
# partitions wait until the broker aborts it (a restart with the same id aborts it at once).
TXN_TIMEOUT_MS = 15_000
MAX_ABORTS = 5  # in a row for one transaction: then the broker is in real trouble


def transactional_producer(clients: Clients, transactional_id: str) -> Any:
    """A client producer with transactions initialised: this aborts the open transaction of a
    killed predecessor with the same id (and fences it)."""
    producer = clients.producer(transactional_id=transactional_id, **{"transaction.timeout.ms": TXN_TIMEOUT_MS})
    for attempt in retrying("initialising transactions", 60.0):
        with attempt:
            producer.init_transactions(10)
    return producer


@dataclass
class Sent:
    """One example batch of the open transaction, as produced."""

    partition: int
    key: bytes
    value: bytes
    headers: list[tuple[str, Any]]  # as confluent_kafka takes them
    positions: np.ndarray
    newest_ms: int
    offset: int = -1  # set by its delivery report
    topic: str | None = None  # None: the examples topic; the events source's dead letters set it


class Transactions:
    """Begins a transaction with its first batch; ``commit`` ends it with the position record."""

    def __init__(
        self,
        producer: Any,
        positions_topic: str,
        transactional_id: str,
        send: Callable[[Sent], None],
        heartbeat: Callable[[], None],
        *,
        max_s: float = TXN_MAX_S,
        encode: Callable[[Any], tuple[bytes, bytes]] = encode_record,
        before_commit: Callable[[], None] | None = None,
    ):
        self.producer = producer
        self.positions_topic = positions_topic
        self.transactional_id = transactional_id
        self.send = send  # produces one Sent (back-pressure and delivery reports are the service's)
        self.heartbeat = heartbeat
        self.max_s = max_s
        self.encode = encode  # the position record's (key, value)
        # Called after the position record, before the commit (the events source sends its
        # input offsets to the transaction here).
        self.before_commit = before_commit
        self.batches: list[Sent] = []
        self.opened_at = 0.0
        self.commits = 0
        self.aborts = 0

    def add(self, sent: Sent) -> None:
        if not self.batches:
            self._call(self.producer.begin_transaction)
            self.opened_at = time.monotonic()
        self.batches.append(sent)
        self.send(sent)

    def due(self, now: float) -> bool:
        return bool(self.batches) and (len(self.batches) >= TXN_MAX_BATCHES or now - self.opened_at >= self.max_s)

    def deadline(self) -> float | None:
        return self.opened_at + self.max_s if self.batches else None

    def commit(self, next_position: Callable[[list[Sent]], Any], flush: Callable[[], None]) -> tuple[Any, list[Sent]]:
        """Flush (every batch acknowledged, offsets known), produce the position record, commit.
        Returns the committed position and batches. ``flush`` raises when a batch failed."""
        for attempt in range(MAX_ABORTS + 1):
            flush()
            pos = next_position(self.batches)
            key, value = self.encode(pos)
            try:
                self.producer.produce(self.positions_topic, key=key, value=value, partition=0)
                if self.before_commit is not None:
                    self.before_commit()
                self._commit_retrying()
                done, self.batches = self.batches, []
                self.commits += 1
                return pos, done
            except KafkaException as exc:
                if not needs_abort(exc) or attempt == MAX_ABORTS:
                    raise
                log.warning("transaction aborted; sending its batches again", extra={"error": str(exc)})
            self.aborts += 1
            self.producer.flush(10)  # abort purges unsent messages (see BROKER.md)
            self._call(lambda: self.producer.abort_transaction(COMMIT_TIMEOUT_S))
            self._call(self.producer.begin_transaction)
            for sent in self.batches:
                self.send(sent)
        raise AssertionError("unreachable")

    def abandon(self) -> None:
        """After an error: abort what is open (a restart would abort it anyway, later)."""
        if self.batches:
            try:
                self.producer.abort_transaction(5)
            except KafkaException as exc:
                log.warning("abort failed", extra={"error": str(exc)})
            self.batches = []

    def _commit_retrying(self) -> None:
        while True:
            try:
                self.producer.commit_transaction(COMMIT_TIMEOUT_S)
                return
            except KafkaException as exc:
                if fenced(exc):
                    raise fenced_error(self.transactional_id, "producer.producer_id") from None
                if not is_retriable(exc):
                    raise
                log.warning("commit failed, retrying", extra={"error": str(exc)})
                self.heartbeat()
                time.sleep(0.5)

    def _call(self, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except KafkaException as exc:
            if fenced(exc):
                raise fenced_error(self.transactional_id, "producer.producer_id") from None
            raise BrokerError(f"transaction call failed: {exc}") from None
