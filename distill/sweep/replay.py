"""Read a retained range of the examples topic into memory without touching the live pipeline.

The consumer is *assigned* its partitions (no group join, so no rebalance of a live group),
runs under its own group id and never commits an offset: the live groups' committed offsets
stay exactly as they were. Nothing is written to Kafka, not even dead letters (the teacher
already sends undecodable batches there; here they are only counted).
"""

from __future__ import annotations

import heapq
import logging
import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

from confluent_kafka import OFFSET_BEGINNING, KafkaException, TopicPartition

from distill.core.config import Config
from distill.core.exceptions import BrokerError, ConfigError, DecodeError
from distill.core.kafka import Clients, partition_count, wait_for_broker
from distill.core.wire import Codec, ExampleBatch

log = logging.getLogger(__name__)

TimeKind = Literal["kafka", "event"]

Offsets = int | dict[int, int] | None
_AGO = re.compile(r"^now(?:-(\d+(?:\.\d+)?)([smhd]))?$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_offsets(text: str | None, flag: str) -> Offsets:
    """``1200`` (every partition) or ``0:1200,1:800`` (those partitions)."""
    if text is None:
        return None
    try:
        if ":" not in text:
            offsets: Offsets = int(text)
            values = [offsets]
        else:
            offsets = {int(p): int(o) for p, o in (part.split(":") for part in text.split(","))}
            values = [*offsets, *offsets.values()]
    except ValueError:
        values = [-1]
    if min(values) < 0:
        raise ConfigError(
            f"{flag} {text!r}: give one offset for every partition (1200) or "
            "partition:offset pairs (0:1200,1:800), all non-negative"
        )
    return offsets


def parse_time(text: str | None, flag: str, now_ms: int) -> int | None:
    """Milliseconds since the epoch from ``now``, ``now-2h`` (s, m, h, d), epoch milliseconds
    or ISO 8601 (UTC unless it names a zone)."""
    if text is None:
        return None
    text = text.strip()
    if text.isdigit():
        return int(text)
    ago = _AGO.match(text)
    if ago:
        return now_ms - int(float(ago.group(1) or 0) * _UNIT_S[ago.group(2) or "s"] * 1000)
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise ConfigError(
            f"{flag} {text!r}: use ISO 8601 (2024-05-01T12:00:00Z), epoch "
            "milliseconds, now or now-<N><s|m|h|d> (now-2h)"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return int(moment.timestamp() * 1000)


@dataclass
class Window:
    """A retained range of the examples topic: offsets ``[from, to)`` per partition and/or times
    ``[from, to)``; ``kafka`` times are message timestamps, ``event`` times the batches' own
    (a batch belongs to the window by its earliest event). Messages stamped after the sweep
    started are never read: the default window is the whole retained topic up to now."""

    from_offset: Offsets = None
    to_offset: Offsets = None
    from_ms: int | None = None
    to_ms: int | None = None
    time_kind: TimeKind = "kafka"

    @classmethod
    def parse(
        cls,
        from_offset: str | None = None,
        to_offset: str | None = None,
        from_time: str | None = None,
        to_time: str | None = None,
        time_kind: str = "kafka",
        now_ms: int | None = None,
    ) -> Window:
        now_ms = int(time.time() * 1000) if now_ms is None else now_ms
        if time_kind not in ("kafka", "event"):
            raise ConfigError(
                f"--time-kind {time_kind!r}: use kafka (message timestamps) or event (the batches' event times)"
            )
        window = cls(
            parse_offsets(from_offset, "--from-offset"),
            parse_offsets(to_offset, "--to-offset"),
            parse_time(from_time, "--from-time", now_ms),
            parse_time(to_time, "--to-time", now_ms),
            time_kind,
        )  # type: ignore[arg-type]
        a, b = window.from_ms, window.to_ms
        if a is not None and b is not None and a >= b:
            raise ConfigError(
                f"--from-time ({iso_ms(window.from_ms)}) must be before --to-time ({iso_ms(window.to_ms)})"
            )
        return window

    def first(self, p: int) -> int | None:
        return self.from_offset.get(p) if isinstance(self.from_offset, dict) else self.from_offset

    def end(self, p: int) -> int | None:
        return self.to_offset.get(p) if isinstance(self.to_offset, dict) else self.to_offset

    def check(self, partitions: int, topic: str) -> None:
        for flag, offsets in (("--from-offset", self.from_offset), ("--to-offset", self.to_offset)):
            if isinstance(offsets, dict) and any(p >= partitions for p in offsets):
                bad = sorted(p for p in offsets if p >= partitions)
                raise ConfigError(f"{flag}: topic {topic!r} has partitions 0..{partitions - 1}, not {bad}")
        for p in range(partitions):
            a, b = self.first(p), self.end(p)
            if a is not None and b is not None and a >= b:
                raise ConfigError(
                    f"partition {p}: --from-offset {a} is not before --to-offset {b} (the end is exclusive)"
                )

    def describe(self) -> dict[str, Any]:
        return {
            "from_offset": self.from_offset,
            "to_offset": self.to_offset,
            "from_time": iso_ms(self.from_ms),
            "to_time": iso_ms(self.to_ms),
            "time_kind": self.time_kind,
        }


def iso_ms(ms: int | None) -> str | None:
    if ms is None:
        return None
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds")


@dataclass
class WindowData:
    batches: list[ExampleBatch]  # every partition's, merged in event order
    partitions: dict[int, dict[str, int]]  # first offset read, end (last + 1), batches, examples
    skipped: dict[str, int]
    bytes: int = 0
    seconds: float = 0.0

    @property
    def examples(self) -> int:
        return sum(b.size for b in self.batches)


def _layout_problem(batch: ExampleBatch, config: Config) -> str | None:
    tasks = [t.name for t in config.tasks]
    want = (config.features.categorical_names, config.features.dense, tasks)
    got = (batch.categorical_names, batch.dense_names, batch.task_names)
    for what, w, g in zip(("categorical", "dense", "task"), want, got, strict=True):
        if list(g) != list(w):
            return f"{what} columns {list(g)} differ from the configured {list(w)}"
    return None


def merge_in_event_order(per_partition: dict[int, list[ExampleBatch]]) -> list[ExampleBatch]:
    """One order for every candidate: partitions interleaved by each batch's earliest event,
    each partition's own (offset) order kept; ties go to the lower partition."""
    streams = [per_partition[p] for p in sorted(per_partition)]
    return list(heapq.merge(*streams, key=lambda b: int(b.event_time_ms.min())))


def read_window(
    config: Config,
    window: Window,
    group_id: str,
    *,
    max_bytes: int,
    idle_s: float = 1.5,
    first_wait_s: float = 10.0,
    started_ms: int | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> WindowData:
    """Read the window into memory, decoded. Assigned partitions, ``group_id`` never commits."""
    started = time.monotonic()
    started_ms = int(time.time() * 1000) if started_ms is None else started_ms
    topic = config.topics.examples
    clients = Clients(config.kafka, "sweep")
    admin = clients.admin()
    wait_for_broker(admin, 30)
    count = partition_count(admin, topic)
    if count is None:
        raise ConfigError(
            f"topic {topic!r} does not exist on {config.kafka.bootstrap_servers}; "
            "check topics.examples in the config or produce data first"
        )
    window.check(count, topic)
    # enable.auto.commit is off in every consumer the factory makes; the offset store too, so
    # nothing could be committed even by an explicit call. assign(): no group join.
    consumer = clients.consumer(group_id, **{"enable.auto.offset.store": False})
    try:
        return _consume_window(
            consumer, config, window, count, max_bytes, (first_wait_s, idle_s), started, started_ms, on_batch
        )
    finally:
        consumer.close()


def _start_offsets(consumer: Any, topic: str, count: int, window: Window) -> dict[int, int]:
    starts = {p: window.first(p) for p in range(count)}
    if window.time_kind == "kafka" and window.from_ms is not None:
        try:
            found = consumer.offsets_for_times(
                [TopicPartition(topic, p, window.from_ms) for p in range(count)], timeout=10
            )
        except KafkaException as exc:
            # Reading from the start and filtering by timestamp gives the same window.
            log.warning("offsets_for_times failed (%s); filtering by timestamp instead", exc)
            found = []
        for tp in found:
            # Some brokers answer by record batch (an earlier offset): the read loop still
            # filters by timestamp, so an early answer costs reading, never a wrong window.
            if tp.offset >= 0:
                starts[tp.partition] = max(starts[tp.partition] or 0, tp.offset)
    return {p: OFFSET_BEGINNING if o is None else o for p, o in starts.items()}


def _consume_window(
    consumer: Any,
    config: Config,
    window: Window,
    count: int,
    max_bytes: int,
    waits: tuple[float, float],
    started: float,
    started_ms: int,
    on_batch: Callable[[int], None] | None,
) -> WindowData:
    topic = config.topics.examples
    codec = Codec(config.wire.non_finite)
    starts = _start_offsets(consumer, topic, count, window)
    ends = {p: e for p in range(count) if (e := window.end(p)) is not None}
    # Nothing stamped after the sweep started is read, so a live topic has an end.
    kafka_to = started_ms
    if window.time_kind == "kafka" and window.to_ms is not None:
        kafka_to = min(kafka_to, window.to_ms)
    active = {p for p in range(count) if not (p in ends and 0 <= ends[p] <= starts[p])}
    consumer.assign([TopicPartition(topic, p, starts[p]) for p in sorted(active)])
    per_partition: dict[int, list[ExampleBatch]] = {p: [] for p in range(count)}
    info: dict[int, dict[str, int]] = {}
    skipped = {"undecodable": 0, "layout": 0, "duplicate": 0, "outside_window": 0, "empty": 0}
    first_problem: str | None = None
    seen: set[str] = set()
    total_bytes, last_message = 0, time.monotonic()
    # The window ends where each partition caught up, hit its end or reached "now"; a partition
    # with nothing to read is given up on after ``idle`` seconds without any message.
    idle = waits[0]

    def finish(p: int) -> None:
        active.discard(p)
        consumer.pause([TopicPartition(topic, p)])  # stop fetching past the end

    while active and time.monotonic() - last_message < idle:
        for msg in consumer.consume(1000, 0.2):
            if msg.error() is not None:
                log.warning("consume error: %s", msg.error().str())
                continue
            p, off = msg.partition(), msg.offset()
            if p not in active:
                continue
            last_message, idle = time.monotonic(), waits[1]
            _, ts = msg.timestamp()
            if off >= ends.get(p, math.inf) or ts >= kafka_to:
                finish(p)
                continue
            part = info.setdefault(p, {"first": off, "end": off, "batches": 0, "examples": 0})
            part["end"] = off + 1
            value = msg.value()
            total_bytes += len(value or b"")
            if total_bytes > max_bytes:
                raise ConfigError(
                    f"the window holds more than {max_bytes // 2**20} MiB of example batches "
                    f"(partition {p} offset {off}); narrow it with --from-time/--from-offset or "
                    "raise --max-window-mb"
                )
            problem = _take(msg, codec, config, window, seen, per_partition[p], skipped)
            first_problem = first_problem or problem
            if problem is None:
                part["batches"] += 1
                part["examples"] += per_partition[p][-1].size
                if on_batch is not None:
                    on_batch(per_partition[p][-1].size)
            if off + 1 >= ends.get(p, math.inf):
                finish(p)
                continue
            _, high = consumer.get_watermark_offsets(TopicPartition(topic, p), cached=True)
            if high >= 0 and off + 1 >= high:
                finish(p)  # caught up with what the broker had at the last fetch: "now"
    for p in sorted(active):
        # Given up on for quiet: fine if there was nothing more, not if the broker has more.
        _, high = consumer.get_watermark_offsets(TopicPartition(topic, p), cached=True)
        reached = info[p]["end"] if p in info else max(starts[p], 0)
        if 0 <= reached < min(high, ends.get(p, math.inf)):
            raise BrokerError(
                f"partition {p} of {topic!r} stopped answering at offset {reached} "
                f"of {high}; check the broker and run the sweep again"
            )
    batches = merge_in_event_order(per_partition)
    if not batches:
        hint = f"; the first unusable batch: {first_problem}" if first_problem else ""
        raise ConfigError(
            f"the window holds no usable example batches in topic {topic!r} "
            f"({window.describe()}){hint}; produce data or widen the window"
        )
    return WindowData(batches, info, skipped, total_bytes, time.monotonic() - started)


def _take(
    msg: Any,
    codec: Codec,
    config: Config,
    window: Window,
    seen: set[str],
    into: list[ExampleBatch],
    skipped: dict[str, int],
) -> str | None:
    """Decode one message into ``into``; returns why it was skipped (None: taken)."""
    _, ts = msg.timestamp()
    if window.time_kind == "kafka" and window.from_ms is not None and ts < window.from_ms:
        skipped["outside_window"] += 1
        return "before --from-time"
    try:
        batch = codec.decode_examples(msg.value(), msg.headers())
    except DecodeError as exc:
        # The teacher dead-letters these; the sweep only counts them (it writes nothing).
        skipped["undecodable"] += 1
        return str(exc)
    problem = _layout_problem(batch, config)
    if problem:
        skipped["layout"] += 1
        return problem
    if batch.size == 0:
        skipped["empty"] += 1
        return "empty batch"
    if batch.batch_id in seen:
        skipped["duplicate"] += 1
        return "duplicate batch id"
    if window.time_kind == "event":
        first = int(batch.event_time_ms.min())
        if (window.from_ms is not None and first < window.from_ms) or (
            window.to_ms is not None and first >= window.to_ms
        ):
            skipped["outside_window"] += 1
            return "event time outside the window"
    seen.add(batch.batch_id)
    batch.truth = None  # evaluation-only column: not needed, not kept in memory
    into.append(batch)
    return None
