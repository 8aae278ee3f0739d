"""Messages through the client producer, and what their delivery reports say: the in-flight
window (back-pressure), failures raised on the loop's thread, readiness while the broker does
not acknowledge, and the counts and metrics of delivered example batches.

Delivery reports are served by the client's ``poll``/``flush`` on the loop's own thread: no lock.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

from distill.core import metrics as m
from distill.core.exceptions import DeliveryError
from distill.core.service import Service
from producers.transaction import Sent

log = logging.getLogger(__name__)

NOT_READY_AFTER_S = 10.0  # waiting this long for acknowledgements means the broker is in trouble
FLUSH_TIMEOUT_S = 30.0

# The counts a Delivery keeps up to date in its service's counts.
COUNTS = {"examples": 0, "batches": 0, "bytes": 0, "failed_batches": 0, "max_in_flight": 0}


class Delivery:
    """Produces ``Sent`` messages (the examples topic unless ``Sent.topic`` names another) with
    at most ``max_in_flight`` unacknowledged. ``counts`` holds the keys of ``COUNTS``;
    ``on_acknowledged`` (if given) is called with each acknowledged example batch."""

    def __init__(
        self,
        producer: Any,
        topic: str,
        service: Service,
        labels: tuple[str, str],
        counts: dict[str, int],
        *,
        max_in_flight: int,
        what: str,
        on_acknowledged: Callable[[Sent], None] | None = None,
    ):
        self.producer = producer
        self.topic = topic
        self.service = service
        self.labels = labels  # (producer id, source name)
        self.counts = counts
        self.max_in_flight = max_in_flight
        self.what = what  # what the messages are, for the errors
        self.on_acknowledged = on_acknowledged
        self.in_flight = 0
        self._queue = m.PRODUCER_QUEUE.labels(labels[0])
        self._failures: list[tuple[str, str]] = []  # (topic, error)
        self._last_ack = time.monotonic()
        self._stalled = False
        self._newest_ms = -(2**62)
        self._queue.set(0)

    def produce(self, sent: Sent) -> None:
        self._wait_for_room()
        report = functools.partial(self._on_delivery, sent)
        while True:
            try:
                self.producer.produce(
                    sent.topic or self.topic,
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
        self._queue.set(self.in_flight)

    def _wait_for_room(self) -> None:
        """Back-pressure: block on delivery reports while the in-flight window is full."""
        while self.in_flight >= self.max_in_flight:
            self.producer.poll(0.05)
            self.raise_failures()
            self.service.heartbeat()
            if time.monotonic() - self._last_ack > NOT_READY_AFTER_S:
                self._stalled = True
                self.service.set_ready(
                    False,
                    f"{self.in_flight} batches unacknowledged for {NOT_READY_AFTER_S:.0f}s; is the broker reachable?",
                )

    def _on_delivery(self, sent: Sent, err: Any, msg: Any) -> None:
        self.in_flight -= 1
        self._queue.set(self.in_flight)
        self._last_ack = time.monotonic()
        if err is not None:
            self._failures.append((sent.topic or self.topic, str(err)))
            self.counts["failed_batches"] += 1
            m.PRODUCER_ERRORS.labels(*self.labels).inc()
            return
        sent.offset = msg.offset()  # a transaction's position record needs it
        if self.on_acknowledged is not None and sent.topic is None:
            self.on_acknowledged(sent)
        if self._stalled:
            self._stalled = False
            if not self.service.stopping.is_set():
                self.service.set_ready(True, "deliveries acknowledged again")

    def count(self, delivered: Iterable[Sent]) -> None:
        """Count delivered (acknowledged, or committed) example batches; other messages are not."""
        for sent in delivered:
            if sent.topic is not None:
                continue
            n, nbytes = len(sent.positions), len(sent.value)
            self.counts["examples"] += n
            self.counts["batches"] += 1
            self.counts["bytes"] += nbytes
            m.PRODUCER_EXAMPLES.labels(*self.labels).inc(n)
            m.PRODUCER_BATCHES.labels(*self.labels).inc()
            m.PRODUCER_BYTES.labels(*self.labels).inc(nbytes)
            if sent.newest_ms > self._newest_ms:
                self._newest_ms = sent.newest_ms
                m.PRODUCER_EVENT_TIME.labels(self.labels[0]).set(sent.newest_ms / 1000.0)

    def raise_failures(self) -> None:
        if self._failures:
            failures, self._failures = self._failures, []
            topic, first = failures[0]
            raise DeliveryError(f"{len(failures)} {self.what} were not delivered to {topic}; first: {first}")

    def flush(self) -> None:
        """Every delivery report served; raises when a message failed or is still unacknowledged."""
        left = self.producer.flush(FLUSH_TIMEOUT_S)
        self.raise_failures()
        if left:
            raise DeliveryError(f"{left} {self.what} still unacknowledged after {FLUSH_TIMEOUT_S:.0f}s")

    def drain(self) -> None:
        """On stop: serve what delivery reports come within the flush timeout, raising nothing."""
        left = self.producer.flush(FLUSH_TIMEOUT_S)
        if left:
            log.error("messages still unacknowledged after flush", extra={"count": left})
        self._queue.set(self.in_flight)
