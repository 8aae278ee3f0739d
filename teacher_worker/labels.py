"""The labels' producer of a teacher or a labeler: dead letters, label batches and the examples
offsets in one Kafka transaction, so every example batch has exactly one visible label batch."""

from __future__ import annotations

import logging
from typing import Any

from confluent_kafka import Message

from distill.core import metrics as m
from distill.core.dead_letters import DeadLetters
from distill.core.exceptions import DecodeError
from distill.core.kafka import partitions_at
from distill.core.wire import LabelBatch
from distill.core.worker import Worker

log = logging.getLogger(__name__)


class LabelTransactions:
    def __init__(self, worker: Worker, transactional_id: str, **settings: Any):
        self.worker = worker
        self.topics = worker.config.topics
        self.producer = worker.clients.producer(transactional_id=transactional_id, **settings)
        self.producer.init_transactions(60)
        worker.producer, worker.transactional_id = self.producer, transactional_id
        self.dead_letters = DeadLetters(self.producer, worker.codec, worker.role, worker.name)
        for outcome in ("commit", "abort"):
            m.TEACHER_TRANSACTIONS.labels(worker.name, outcome).inc(0)  # exported at 0 for increase()

    def begin(self) -> None:
        self.producer.begin_transaction()

    def dead(self, msg: Message, exc: DecodeError) -> None:
        self.dead_letters.send(msg, exc)

    def label(self, label: LabelBatch, partition: int) -> None:
        """To the same partition number of the labels topic as its example batch."""
        value, headers = self.worker.codec.encode_labels(label)
        self.producer.produce(
            self.topics.labels, value=value, key=label.batch_id.encode(), partition=partition, headers=headers
        )

    def commit(self, offsets: dict[int, int], group_metadata: Any = None) -> None:
        """Commit with the examples offsets (partition -> next offset) read by this transaction.
        ``group_metadata``: the consumer's, taken on the thread that polls it (default: now)."""
        if offsets:
            if group_metadata is None:
                consumer = self.worker.consumer
                assert consumer is not None
                group_metadata = consumer.consumer_group_metadata()
            self.producer.send_offsets_to_transaction(partitions_at(self.topics.examples, offsets), group_metadata, 30)
        self.producer.commit_transaction(60)
        m.TEACHER_TRANSACTIONS.labels(self.worker.name, "commit").inc()

    def abort(self) -> None:
        m.TEACHER_TRANSACTIONS.labels(self.worker.name, "abort").inc()
        try:
            self.producer.flush(10)  # abort purges unsent messages (docs/kafka.md)
            self.producer.abort_transaction(30)
        except Exception as exc:
            log.warning("abort failed", extra={"error": str(exc)})
