"""Kafka clients built from the one ``[kafka]`` config section, plus topic admin and lag.

The only module that constructs confluent-kafka clients. Security settings (TLS, SASL) are
passed through; passwords never reach a log line (see ``redacted``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic
from tenacity import Retrying, retry_if_exception_type, stop_after_delay, stop_never, wait_exponential, wait_random

from distill.core.config import Config, KafkaConfig
from distill.core.exceptions import BrokerError, ConfigError, TopicMismatchError

log = logging.getLogger(__name__)

_SECRET_KEYS = ("password", "secret", "sasl.oauthbearer.config")


def redacted(conf: dict[str, Any]) -> dict[str, Any]:
    return {k: ("***" if any(s in k for s in _SECRET_KEYS) else v) for k, v in conf.items()}


# What the system sets itself, because a guarantee rests on it: kafka.extra may not change
# these (a ConfigError at start-up says why). Every other librdkafka property in kafka.extra wins
# over the built-in value.
RESERVED: dict[str, str] = {
    "isolation.level": "read_committed keeps the records of aborted transactions out of training and joins",
    "enable.auto.commit": "offsets are committed with the transaction or checkpoint they belong to, never in the "
    "background (a background commit would skip examples after a crash)",
    "enable.auto.offset.store": "offsets are stored only for records that were processed",
    "transactional.id": "each worker derives its own from its group and name (two processes with one id fence "
    "each other); set the worker's name instead",
    "enable.idempotence": "transactions and exactly-once delivery need the idempotent producer",
    "acks": "the idempotent producer needs acks=all",
    "transaction.timeout.ms": "each transactional worker sets its own, sized for its recovery",
    "group.id": "set by the config (teacher.group_id, teacher.pool.labeler_group_id, students' group_id)",
    "partition.assignment.strategy": "a student joins examples and labels by partition number (range); the other "
    "workers rely on cooperative rebalancing",
    "auto.offset.reset": "a new consumer group starts at the oldest retained example: the teacher labels every "
    "batch, a new student backfills",
    "enable.partition.eof": "the workers' loops and the producer's recovery set it as they need",
}
# Properties that have their own field in [kafka]: one name per option.
_FIELDS = {
    "bootstrap.servers": "bootstrap_servers",
    "client.id": "client_id",
    "security.protocol": "security_protocol",
    "sasl.mechanism": "sasl_mechanism",
    "sasl.username": "sasl_username",
    "sasl.password": "sasl_password",
    "ssl.ca.location": "ssl_ca_location",
    "ssl.certificate.location": "ssl_certificate_location",
    "ssl.key.location": "ssl_key_location",
    "ssl.key.password": "ssl_key_password",
    "session.timeout.ms": "session_timeout_ms",
    "compression.type": "compression_type",
}

# librdkafka properties that apply to one kind of client only (its CONFIGURATION.md, C or P):
# kafka.extra is one flat table, and a consumer property given to a producer makes librdkafka
# log a CONFWARN line at every start. Unlisted properties go to every client.
CONSUMER_ONLY = frozenset(
    {
        "fetch.wait.max.ms",
        "fetch.min.bytes",
        "fetch.max.bytes",
        "fetch.message.max.bytes",
        "max.partition.fetch.bytes",
        "fetch.error.backoff.ms",
        "fetch.queue.backoff.ms",
        "queued.min.messages",
        "queued.max.messages.kbytes",
        "heartbeat.interval.ms",
        "max.poll.interval.ms",
        "auto.commit.interval.ms",
        "group.instance.id",
        "coordinator.query.interval.ms",
        "check.crcs",
    }
)
PRODUCER_ONLY = frozenset(
    {
        "linger.ms",
        "queue.buffering.max.ms",
        "queue.buffering.max.messages",
        "queue.buffering.max.kbytes",
        "batch.size",
        "batch.num.messages",
        "message.timeout.ms",
        "delivery.timeout.ms",
        "request.timeout.ms",
        "message.send.max.retries",
        "retries",
        "compression.level",
        "sticky.partitioning.linger.ms",
        "partitioner",
    }
)

# The longest a resumed partition waits for its first fetch (consumer_config, docs/kafka.md).
FETCH_WAIT_MS = 100

# Client settings for the embedded broker only (docs/kafka.md): tansu does not answer a waiting
# fetch when data arrives, so the built-in fetch wait (FETCH_WAIT_MS) would be added to every read.
LOCAL_PROFILE: dict[str, str | int | float | bool] = {"fetch.wait.max.ms": 25}


def local_profile(extra: dict[str, Any]) -> dict[str, Any]:
    """``kafka.extra`` for clients of the embedded broker: LOCAL_PROFILE under the user's own
    extra (the user's value wins). ``distill up`` applies it when it starts the broker."""
    return {**LOCAL_PROFILE, **extra}


def check_extra(extra: dict[str, Any]) -> None:
    """A ConfigError for a property of ``kafka.extra`` the system must control, or that has its
    own field in [kafka]."""
    for key in extra:
        if key in RESERVED:
            raise ConfigError(f"kafka.extra must not set {key!r}: {RESERVED[key]}. Remove it from kafka.extra.")
        if key in _FIELDS:
            raise ConfigError(f"kafka.extra must not set {key!r}: set kafka.{_FIELDS[key]} instead.")


def client_config(kafka: KafkaConfig) -> dict[str, Any]:
    """The settings every client shares, with the properties of kafka.extra that are not for
    one kind of client only. The producer and consumer factories apply kafka.extra again after
    their own defaults, so that the user's value wins there too."""
    check_extra(kafka.extra)
    conf: dict[str, Any] = {
        "bootstrap.servers": kafka.bootstrap_servers,
        "client.id": kafka.client_id,
        "security.protocol": kafka.security_protocol,
    }
    optional = {
        "sasl.mechanism": kafka.sasl_mechanism,
        "sasl.username": kafka.sasl_username,
        "sasl.password": kafka.sasl_password,
        "ssl.ca.location": kafka.ssl_ca_location,
        "ssl.certificate.location": kafka.ssl_certificate_location,
        "ssl.key.location": kafka.ssl_key_location,
        "ssl.key.password": kafka.ssl_key_password,
    }
    conf.update({k: v for k, v in optional.items() if v is not None})
    conf.update({k: v for k, v in kafka.extra.items() if k not in CONSUMER_ONLY | PRODUCER_ONLY})
    return conf


def _log_error(err: KafkaError) -> None:
    # librdkafka reports transient broker trouble here; it retries by itself.
    log.warning("kafka client error: %s", err)


class _ErrorWatch:
    """An admin client's error_cb: logs like the others and keeps the first SASL
    authentication failure, which retrying cannot cure (wait_for_broker turns it into a
    ConfigError)."""

    def __init__(self) -> None:
        self.authentication: KafkaError | None = None

    def __call__(self, err: KafkaError) -> None:
        if err.code() == KafkaError._AUTHENTICATION and self.authentication is None:
            self.authentication = err
        _log_error(err)


class _Admin(AdminClient):
    """An admin client that remembers a SASL authentication failure (for wait_for_broker)."""

    def __init__(self, conf: dict[str, Any], kafka: KafkaConfig):
        self.errors = _ErrorWatch()
        self.kafka = kafka
        super().__init__(conf | {"error_cb": self.errors})


def authentication_error(admin: AdminClient) -> ConfigError | None:
    """The ConfigError for a SASL authentication failure the admin client has seen, or None."""
    if not isinstance(admin, _Admin):
        return None
    admin.poll(0)  # serves error_cb
    err = admin.errors.authentication
    if err is None:
        return None
    user = f" as {admin.kafka.sasl_username!r}" if admin.kafka.sasl_username else ""
    return ConfigError(
        f"the broker refused to authenticate{user}: {err.str()}. Check kafka.sasl_username, kafka.sasl_password "
        "(DISTILL_KAFKA__SASL_PASSWORD) and kafka.sasl_mechanism; retrying would not help."
    )


class Clients:
    """Factory of producers, consumers and admin clients for one worker."""

    def __init__(self, kafka: KafkaConfig, name: str):
        self.kafka = kafka
        self.name = name
        self.base = client_config(kafka) | {"client.id": f"{kafka.client_id}.{name}", "error_cb": _log_error}

    def _extra(self, skip: frozenset[str]) -> dict[str, Any]:
        return {k: v for k, v in self.kafka.extra.items() if k not in skip}

    def _with_extra(self, defaults: dict[str, Any], skip: frozenset[str], overrides: dict[str, Any]) -> dict[str, Any]:
        # defaults < the user's kafka.extra < what the call site needs. kafka.extra cannot hold
        # a reserved key (check_extra), so a call site never overrides the user silently.
        return defaults | self._extra(skip) | overrides

    def producer_config(self, transactional_id: str | None = None, **overrides: Any) -> dict[str, Any]:
        conf = self.base | {
            "enable.idempotence": True,
            "acks": "all",
            "linger.ms": 20,
            "batch.size": 1_000_000,
            "compression.type": self.kafka.compression_type,
            "message.max.bytes": 16 * 1024 * 1024,
        }
        if transactional_id:
            overrides = overrides | {"transactional.id": transactional_id}
        return self._with_extra(conf, CONSUMER_ONLY, overrides)

    def producer(self, transactional_id: str | None = None, **overrides: Any) -> Producer:
        return Producer(self.producer_config(transactional_id, **overrides))

    def consumer_config(self, group_id: str, **overrides: Any) -> dict[str, Any]:
        conf = self.base | {
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
            "isolation.level": "read_committed",
            "session.timeout.ms": self.kafka.session_timeout_ms,
            "heartbeat.interval.ms": max(100, self.kafka.session_timeout_ms // 5),
            "partition.assignment.strategy": "cooperative-sticky",
            "fetch.max.bytes": 64 * 1024 * 1024,
            # Small per-partition fetches interleave the partitions: a model that reads one
            # partition's whole backlog before the next jumps back and forth in event time.
            "max.partition.fetch.bytes": 256 * 1024,
            # librdkafka keeps one fetch in flight per broker and leaves paused partitions out
            # of it. A partition resumed (the student's join backpressure) waits until the fetch
            # in flight returns: with librdkafka's 500 ms it stalls whenever that fetch holds
            # only caught-up partitions. The wait ends at once when data arrives, so a shorter
            # one costs only empty round trips when idle. The embedded broker's 25 ms is in
            # LOCAL_PROFILE.
            "fetch.wait.max.ms": FETCH_WAIT_MS,
            "enable.partition.eof": False,
        }
        return self._with_extra(conf, PRODUCER_ONLY, {"group.id": group_id} | overrides)

    def consumer(self, group_id: str, **overrides: Any) -> Consumer:
        return Consumer(self.consumer_config(group_id, **overrides))

    def admin(self) -> AdminClient:
        return _Admin(self.base, self.kafka)


def retrying(what: str, seconds: float | None = 60.0) -> Retrying:
    """Backoff for connecting and admin calls: broker hiccups are retried, then reported.
    ``seconds=None`` retries until it works (workers: not ready, but no crash loop)."""
    return Retrying(
        retry=retry_if_exception_type((KafkaException, BrokerError)),
        wait=wait_exponential(multiplier=0.2, max=5.0) + wait_random(0, 0.2),
        stop=stop_never if seconds is None else stop_after_delay(seconds),
        reraise=True,
        before_sleep=lambda rs: log.warning(
            "%s failed (attempt %d), retrying: %s", what, rs.attempt_number, rs.outcome.exception()
        ),
    )


def wait_for_broker(admin: AdminClient, seconds: float | None = 60.0) -> None:
    """Retries an unreachable broker; wrong SASL credentials are a ConfigError at once."""
    for attempt in retrying("connecting to the broker", seconds):
        with attempt:
            try:
                admin.list_topics(timeout=2.0)
            except KafkaException as exc:
                refused = authentication_error(admin)
                if refused is not None:
                    raise refused from None
                raise BrokerError(f"broker unreachable: {exc}") from None


def partition_count(admin: AdminClient, topic: str, timeout: float = 10.0) -> int | None:
    # All topics, not list_topics(topic=...): a metadata request naming a missing topic lets a
    # broker with auto-creation on (tansu; Kafka's default) create it with default partitions.
    meta = admin.list_topics(timeout=timeout)
    t = meta.topics.get(topic)
    if t is None or t.error is not None:
        return None
    return len(t.partitions)


def ensure_topics(config: Config, admin: AdminClient, seconds: float | None = 60.0) -> None:
    """Create the examples, labels, checkpoints and DLQ topics if missing and check their
    partition counts."""
    topics = config.topics
    wanted = {
        topics.examples: topics.partitions,
        topics.labels: topics.partitions,
        topics.checkpoints: 1,  # one ordered stream of announcements
        topics.dlq(topics.examples): 1,
        topics.dlq(topics.labels): 1,
    }
    wait_for_broker(admin, seconds)
    for attempt in retrying("creating topics", seconds):
        with attempt:
            existing = admin.list_topics(timeout=5.0).topics
            missing = [
                NewTopic(
                    name,
                    num_partitions=n,
                    replication_factor=topics.replication_factor,
                    config={"retention.ms": str(topics.retention_ms)},
                )
                for name, n in wanted.items()
                if name not in existing
            ]
            if missing:
                for name, future in admin.create_topics(missing, operation_timeout=10).items():
                    try:
                        future.result()
                    except KafkaException as exc:
                        code = exc.args[0].code()
                        if code in (KafkaError.TOPIC_AUTHORIZATION_FAILED, KafkaError.CLUSTER_AUTHORIZATION_FAILED):
                            raise _not_authorized(config, name) from None
                        if code != KafkaError.TOPIC_ALREADY_EXISTS:
                            raise
    # Apache Kafka answers CreateTopics before its metadata lists the new topics, and lists them
    # with LEADER_NOT_AVAILABLE until their partitions have leaders. Each metadata request may go
    # to another broker of a cluster, one that has not heard of them yet: the counts checked are
    # those of the one answer that listed every topic.
    deadline = time.monotonic() + 30
    while (counts := _listed(admin, set(wanted))) is None and time.monotonic() < deadline:
        time.sleep(0.05)
    if counts is None:
        check_partitions(config, admin)  # says which is missing
    else:
        _check_counts(config, counts[topics.examples], counts[topics.labels])


def _listed(admin: AdminClient, names: set[str]) -> dict[str, int] | None:
    """Each topic's partition count, from one metadata answer that lists them all; else None."""
    topics = admin.list_topics(timeout=5.0).topics
    if not all(name in topics and topics[name].error is None for name in names):
        return None
    return {name: len(topics[name].partitions) for name in names}


def _not_authorized(config: Config, topic: str) -> ConfigError:
    user = f"user {config.kafka.sasl_username!r}" if config.kafka.sasl_username else "this client"
    return ConfigError(
        f"topic {topic!r} is not visible to {user}, which may not create it either: create the topic "
        "(`distill topics`, or a KafkaTopic) and grant the user Describe on it (an ACL)."
    )


def check_partitions(config: Config, admin: AdminClient) -> int:
    """The labels topic must mirror the examples topic: label batch i of partition p goes to p."""
    return _check_counts(
        config, partition_count(admin, config.topics.examples), partition_count(admin, config.topics.labels)
    )


def _check_counts(config: Config, ex: int | None, lb: int | None) -> int:
    if ex is None or lb is None:
        missing = config.topics.examples if ex is None else config.topics.labels
        raise TopicMismatchError(f"topic {missing!r} does not exist; create it or run `distill topics create`")
    if ex != lb:
        raise TopicMismatchError(
            f"topic {config.topics.examples!r} has {ex} partitions but {config.topics.labels!r} has {lb}; "
            "they must be equal (a label goes to its example batch's partition number). "
            "Recreate the labels topic with the same count."
        )
    return ex


def lag(consumer: Consumer, partitions: list[TopicPartition]) -> dict[tuple[str, int], int]:
    """Messages between the consumer's position and the high watermark, per partition.

    Uses the watermarks cached from fetch responses: the embedded broker answers a wrong high
    watermark to a direct ListOffsets request.
    """
    out: dict[tuple[str, int], int] = {}
    if not partitions:
        return out
    for tp in consumer.position(partitions):
        try:
            _low, high = consumer.get_watermark_offsets(tp, cached=True)
        except KafkaException:
            continue
        if high < 0 or tp.offset < 0:
            # No cached watermark, or nothing consumed yet: unknown, not 0 (a consumer that
            # has not returned its first message may have a backlog of any size).
            continue
        out[(tp.topic, tp.partition)] = max(0, high - tp.offset)
    return out


def export_lag(consumer: Consumer, role: str, worker: str) -> None:
    """``distill_consumer_lag_messages`` for every assigned partition (informative only)."""
    from distill.core import metrics as m

    try:
        for (topic, p), n in lag(consumer, consumer.assignment()).items():
            m.CONSUMER_LAG.labels(role, worker, topic, str(p)).set(n)
    except Exception as exc:
        log.debug("lag unavailable: %s", exc)


def partitions_at(topic: str, offsets: dict[int, int]) -> list[TopicPartition]:
    return [TopicPartition(topic, p, o) for p, o in sorted(offsets.items())]


def seek_to(consumer: Consumer, topic: str, offsets: dict[int, int]) -> None:
    for tp in partitions_at(topic, offsets):
        try:
            consumer.seek(tp)
        except Exception as exc:  # the partition may have been revoked meanwhile
            log.warning("seek failed", extra={"partition": tp.partition, "error": str(exc)})


def abort_and_rewind(producer: Producer, consumer: Consumer, topic: str, records: list[Message]) -> None:
    """Abort the open transaction and seek each partition back to its first record in it, so
    that the next step reads (and labels) them again."""
    try:
        producer.flush(10)  # abort purges unsent messages (see docs/kafka.md)
        producer.abort_transaction(30)
    except Exception as exc:
        log.warning("abort failed", extra={"error": str(exc)})
    first: dict[int, int] = {}
    for msg in records:
        first.setdefault(msg.partition(), msg.offset())
    seek_to(consumer, topic, first)


def is_retriable(exc: KafkaException) -> bool:
    err = exc.args[0] if exc.args else None
    return bool(getattr(err, "retriable", lambda: False)())


def needs_abort(exc: KafkaException) -> bool:
    err = exc.args[0] if exc.args else None
    return bool(getattr(err, "txn_requires_abort", lambda: False)())


def fenced(exc: Exception) -> bool:
    """Another producer started with this transactional id: this one can never commit again."""
    err = exc.args[0] if isinstance(exc, KafkaException) and exc.args else None
    codes = (KafkaError._FENCED, KafkaError.PRODUCER_FENCED, KafkaError.INVALID_PRODUCER_EPOCH)
    return isinstance(err, KafkaError) and err.code() in codes


def fatal_cause(producer: Producer | None, exc: Exception) -> Exception:
    """What stopped a producer. A call on a producer already in a fatal state (fenced in the
    background, while a batch was added to the transaction) raises only ``_FATAL``; the next
    ``poll`` raises the error that caused it, so that ``fenced`` can tell which it was."""
    err = exc.args[0] if isinstance(exc, KafkaException) and exc.args else None
    fatal = KafkaError._FATAL  # noqa: SLF001 (librdkafka's local error codes start with "_")
    if producer is None or not isinstance(err, KafkaError) or err.code() != fatal:
        return exc
    try:
        producer.poll(0)
    except KafkaException as cause:
        return cause
    return exc


def fenced_error(transactional_id: str, setting: str) -> ConfigError:
    return ConfigError(
        f"transactional id {transactional_id!r} was taken over by another process started with the same name: "
        f"two workers cannot share it. Give each one a unique {setting} (for a labeler, its pod name)."
    )


def broker_down(err: KafkaError) -> bool:
    return err.code() in (KafkaError._ALL_BROKERS_DOWN, KafkaError._TRANSPORT, KafkaError._TIMED_OUT)


def without_errors(msgs: list[Message], not_ready: Callable[[str], None]) -> list[Message]:
    """The messages that carry data. Consume errors are logged; one that says the broker is
    down also turns the worker not ready (``not_ready(reason)``)."""
    records = []
    for msg in msgs:
        err = msg.error()
        if err is None:
            records.append(msg)
            continue
        if broker_down(err):
            not_ready(f"broker: {err.str()}")
        log.warning("consume error", extra={"error": err.str()})
    return records


def consume_available(consumer: Consumer, max_messages: int, timeout: float) -> list[Message]:
    """Up to ``max_messages`` without waiting for a full batch: ``consume(n, t)`` blocks until
    it has n messages or t passes, which would stall a worker whenever the prefetch runs low.
    Waits up to ``timeout`` only when nothing at all is there."""
    msgs = consumer.consume(max_messages, 0)
    if msgs:
        return msgs
    msgs = consumer.consume(1, timeout)
    if msgs and max_messages > 1:
        msgs += consumer.consume(max_messages - 1, 0)
    return msgs


class BrokerProbe:
    """Readiness while idle: a metadata request every ``every_s`` seconds, bounded by
    ``timeout_s``. A stalled broker keeps its TCP connections open, so librdkafka reports no
    error for a long time; this notices within a few seconds."""

    def __init__(self, every_s: float = 2.0, timeout_s: float = 1.0):
        self.every_s, self.timeout_s = every_s, timeout_s
        self._last = float("-inf")
        self.reachable = True

    def check(self, client: Consumer) -> bool:
        now = time.monotonic()
        if now - self._last >= self.every_s:
            self._last = now
            try:
                client.list_topics(timeout=self.timeout_s)
                self.reachable = True
            except KafkaException:
                self.reachable = False
        return self.reachable
