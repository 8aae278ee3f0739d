"""The dead-letter path: what cannot be processed goes to ``<topic>.dlq``, whole, with why."""

from __future__ import annotations

import logging
import time

from confluent_kafka import Message, Producer

from distill.core import metrics as m
from distill.core.exceptions import DecodeError
from distill.core.wire import Codec

log = logging.getLogger(__name__)


class DeadLetters:
    """Sends a failed message to its DLQ: the original value and headers inside a DeadLetter
    record, plus plain headers (reason, origin) that any Kafka tool can read."""

    def __init__(self, producer: Producer, codec: Codec, role: str, worker: str):
        self.producer = producer
        self.codec = codec
        self.role, self.worker = role, worker

    def send(self, msg: Message, error: DecodeError | Exception) -> None:
        reason = error.reason if isinstance(error, DecodeError) else "processing_error"
        detail = error.detail if isinstance(error, DecodeError) else f"{type(error).__name__}: {error}"
        topic = msg.topic()
        original = [(k, v) for k, v in (msg.headers() or [])]
        value, headers = self.codec.encode_dead_letter(
            {
                "reason": reason,
                "error": detail[:4000],
                "source_topic": topic,
                "source_partition": msg.partition(),
                "source_offset": msg.offset(),
                "worker": f"{self.role}/{self.worker}",
                "failed_at_ms": int(time.time() * 1000),
                "original_headers": [{"key": k, "value": v} for k, v in original],
                "payload": msg.value(),
            }
        )
        headers += [
            ("distill.dlq.reason", reason.encode()),
            ("distill.dlq.source", f"{topic}/{msg.partition()}/{msg.offset()}".encode()),
            ("distill.dlq.error", detail[:500].encode()),
        ]
        self.producer.produce(f"{topic}.dlq", value=value, key=msg.key(), headers=headers)
        m.DEAD_LETTERS.labels(self.role, self.worker, topic, reason).inc()
        log.warning(
            "message sent to dead-letter topic",
            extra={"reason": reason, "detail": detail[:500], "source": f"{topic}/{msg.partition()}/{msg.offset()}"},
        )
