"""The shell every worker runs in; the teacher, labeler, trainer and student keep only their step.

The shell owns what they share: the Kafka clients and the wire codec, the HTTP service (health,
readiness, metrics), readiness while idle (a broker probe), the bookkeeping of assigned
partitions, the fencing and abort handling of a transactional producer, checkpoint restore,
progress files with consumer lag, and an orderly close. ``run_worker`` is the one entry point.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, ClassVar, Protocol

from confluent_kafka import Consumer, KafkaException, Message, Producer, TopicPartition

from distill.core import metrics as m
from distill.core.checkpoint import Checkpointer
from distill.core.config import Config
from distill.core.kafka import (
    BrokerProbe,
    Clients,
    consume_available,
    export_lag,
    fatal_cause,
    fenced,
    fenced_error,
    is_retriable,
    needs_abort,
    seek_to,
    without_errors,
)
from distill.core.progress import ProgressLog
from distill.core.service import Service
from distill.core.wire import Codec

log = logging.getLogger(__name__)


class Restorable(Protocol):
    """What a checkpoint restores: a learner (its model and optimizers)."""

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


UNREACHABLE = "broker unreachable (metadata request timed out)"


class Worker:
    """A long-lived Kafka worker. Subclasses set ``role`` and implement ``start``, ``step`` and
    ``snapshot``; they may override the ``on_assign``/``on_revoke`` hooks and ``finish``."""

    role: ClassVar[str]
    # Cooperative (incremental) rebalancing unless the worker's consumer uses an eager
    # assignment strategy (the student's range assignment keeps both topics' partitions together).
    cooperative: ClassVar[bool] = True

    def __init__(self, config: Config, name: str, *, port: int, service: Service | None = None):
        self.config = config
        self.name = name
        self.service = service or Service(self.role, name, port=port)
        self.codec = Codec(config.wire.non_finite, config.wire.max_message_bytes)
        self.clients = Clients(config.kafka, f"{self.role}.{name}")
        self.progress = ProgressLog(config.progress_dir(), self.role, name)
        self.probe = BrokerProbe()
        self.task_names = [t.name for t in config.tasks]
        self.kinds = [t.type for t in config.tasks]
        self.assigned: set[int] = set()  # partition numbers this worker owns now
        self.busy_s = 0.0  # time spent in steps that had work
        self.throughput = m.Throughput()
        self.consumer: Consumer | None = None
        self.producer: Producer | None = None
        self.transactional_id: str | None = None
        self.owner_setting = f"{self.role}.name"  # the setting that names a worker (and its transactional id)

    # -- what each worker implements -----------------------------------------------------------
    def start(self) -> None:
        raise NotImplementedError

    def step(self) -> bool:
        raise NotImplementedError

    def snapshot(self) -> dict[str, Any]:
        raise NotImplementedError

    def progress_count(self) -> int:
        """The example count a progress line is due by."""
        return 0

    def finish(self) -> None:
        """The last work before the summary is written and the clients close."""

    def on_assign(self, partitions: list[TopicPartition]) -> None:
        """Before the partitions are assigned: e.g. set their start offsets."""

    def on_revoke(self, partitions: list[TopicPartition]) -> None:
        """Before the partitions are taken away: e.g. checkpoint what was trained on them."""

    def assignment_changed(self) -> None:
        """Ready while the worker owns partitions (the labeler overrides this)."""
        self.service.set_ready(bool(self.assigned), "assigned" if self.assigned else "no partitions assigned")

    # -- checkpoints ---------------------------------------------------------------------------
    def restore(self, checkpointer: Checkpointer, learner: Restorable) -> dict[str, Any]:
        """Load the newest durable checkpoint into ``learner`` and return its whole state;
        ``{}`` on a fresh start."""
        found = checkpointer.load_latest()
        if found is None:
            log.info(f"no checkpoint: starting a fresh {self.role}")
            return {}
        version, state = found
        learner.load_state_dict(state)
        log.info("restored checkpoint", extra={"version": version})
        return state

    # -- reading -------------------------------------------------------------------------------
    def subscribe(self, topics: list[str]) -> None:
        assert self.consumer is not None
        self.consumer.subscribe(topics, on_assign=self._assigned, on_revoke=self._revoked, on_lost=self._revoked)

    def poll(self, max_messages: int, timeout: float, consumer: Consumer | None = None) -> list[Message]:
        """Up to ``max_messages`` records with data; a consume error that says the broker is
        down turns the worker not ready."""
        consumer = consumer or self.consumer
        assert consumer is not None
        return without_errors(consume_available(consumer, max_messages, timeout), self.not_ready)

    def rewind(self, topic: str, records: list[Message]) -> None:
        """Seek each partition back to its first record in ``records``: they are read again."""
        first: dict[int, int] = {}
        for msg in records:
            partition, offset = msg.partition(), msg.offset()
            assert partition is not None and offset is not None  # a consumed record has both
            first.setdefault(partition, offset)
        assert self.consumer is not None
        seek_to(self.consumer, topic, first)

    def not_ready(self, reason: str) -> None:
        self.service.set_ready(False, reason)

    def check_broker(self, ready: bool, reason: str) -> bool:
        """Readiness while idle: ``ready`` if the broker answers a metadata request, else not
        ready (a stalled broker keeps its connections open and reports no error for long)."""
        assert self.consumer is not None
        if not self.probe.check(self.consumer):
            self.service.set_ready(False, UNREACHABLE)
            return False
        self.service.set_ready(ready, reason)
        return True

    def _assigned(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self.on_assign(partitions)
        self.assigned.update(tp.partition for tp in partitions)
        (consumer.incremental_assign if self.cooperative else consumer.assign)(partitions)
        # librdkafka keeps a partition paused across unassign/assign: one paused (back-pressure)
        # when it was revoked or lost would never be fetched again.
        consumer.resume(partitions)
        log.info("partitions assigned", extra={"partitions": sorted(self.assigned)})
        self.assignment_changed()

    def _revoked(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        # A lost assignment (an expired session) is handed back like a revoked one.
        self.on_revoke(partitions)
        gone = {tp.partition for tp in partitions}
        self.assigned -= gone
        if self.cooperative:
            consumer.incremental_unassign(partitions)
        self.assignment_changed()

    # -- transactions --------------------------------------------------------------------------
    def transact(self, body: Callable[[], None], on_abort: Callable[[], None]) -> bool:
        """Run one transaction's ``body``. A fenced producer stops the worker with an error that
        names the setting to change; an error that needs an abort (or a retriable one) calls
        ``on_abort`` and returns False; any other error propagates."""
        try:
            body()
        except Exception as exc:
            exc = fatal_cause(self.producer, exc)
            if fenced(exc):
                raise fenced_error(str(self.transactional_id), self.owner_setting) from None
            if not isinstance(exc, KafkaException) or not (needs_abort(exc) or is_retriable(exc)):
                raise exc
            log.warning("transaction failed: aborting", extra={"error": str(exc)})
            on_abort()
            return False
        return True

    # -- progress and close ----------------------------------------------------------------------
    def write_progress(self) -> None:
        if self.consumer is not None:
            export_lag(self.consumer, self.role, self.name)
        self.progress.write(self.snapshot(), self.progress_count())

    def summary(self) -> dict[str, Any]:
        return self.snapshot()

    def consumers(self) -> list[Consumer]:
        return [self.consumer] if self.consumer is not None else []

    def close(self) -> None:
        try:
            self.finish()
            self.progress.write_summary(self.summary())
        finally:
            for consumer in self.consumers():
                consumer.close()
            if self.producer is not None:
                try:
                    self.producer.flush(10)
                except KafkaException as exc:  # a fenced producer: the error that stopped us says why
                    log.warning("producer flush failed on close", extra={"error": str(exc)})


def run_worker(worker: Worker, collective: bool = False) -> None:
    """Serve health and metrics, start, then step until SIGTERM/SIGINT and close. ``collective``:
    the loop ends when the step says so (every torchrun rank at the same step)."""
    worker.service.install_signal_handlers()
    worker.service.start_http()
    worker.start()
    worker.service.run(worker.step, worker.close, collective=collective)
