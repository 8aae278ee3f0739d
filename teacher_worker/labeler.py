"""A teacher labeler (``teacher.role = "labeler"``): label with the newest out-of-sample checkpoint.

Labelers form one consumer group on the examples topic and scale like any group (up to one per
partition). Each reads every announcement on the checkpoints topic, hot-loads the newest
checkpoint from the model store (sha256 verified) and keeps ``keep_in_memory`` of them; an
older one that a batch needs is read back from the store. A batch at (partition p, offset o) is
labelled by the newest checkpoint whose watermark for p is at most o, so no label comes from a
teacher that trained on its example. Labels go out as in the single-process teacher: one
transaction per step with the examples offsets (exactly-once), holding what was read within
``max_transaction_seconds``; same partition number, the batch id, the checkpoint's version and
its watermark.

A batch with no eligible checkpoint known yet (a labeler that has not read the announcements
that far) is not labelled: its partition is rewound to it and tried again on the next step. So
is a batch whose newest eligible checkpoint is more than ``max_label_staleness_examples`` behind
it while the trainer has not trained past it: the labels stay within that distance of what one
teacher would give, and the labelers go at the trainer's pace (which publishes early when they
wait). Once the trainer has passed a batch no fresher out-of-sample checkpoint can come, and
the newest one labels it (``distill_teacher_stale_labels_total``).
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict, defaultdict

from confluent_kafka import OFFSET_BEGINNING, TopicPartition

from distill.core import metrics as m
from distill.core.config import Config
from distill.core.exceptions import CheckpointError, DecodeError
from distill.core.kafka import consume_available, ensure_topics, seek_to
from distill.core.layout import check_layout
from distill.core.model_store import ModelStore
from distill.core.service import Service
from distill.core.wire import CheckpointAnnouncement, ExampleBatch, LabelBatch
from distill.core.worker import Worker, run_worker
from distill.learn.models import RankingModel, batch_tensors, resolve_device
from distill.learn.step import predict
from teacher_worker.labels import LabelTransactions
from teacher_worker.out_of_sample import newest_eligible

log = logging.getLogger(__name__)

# A dead labeler's open transaction holds back read_committed readers of the labels topic
# until the broker aborts it; its pod name (transactional id) may never come back to fence it.
TRANSACTION_TIMEOUT_MS = 15_000
# A checkpoint that did not load is tried again after this long: a file on a network volume
# may show up on this node a moment after its announcement does.
RETRY_FAILED_S = 10.0


class Labeler(Worker):
    role = "teacher"

    def __init__(self, config: Config, service: Service | None = None):
        tc = config.teacher
        super().__init__(config, tc.name, port=tc.metrics_port, service=service)
        self.pool = tc.pool
        self.device = resolve_device(tc.device)
        self.store = ModelStore(config.model_store())
        self.announcements: list[CheckpointAnnouncement] = []  # increasing version
        self.history: list[tuple[int, dict[int, int]]] = []  # (version, watermark) of each of them
        self.models: OrderedDict[int, RankingModel] = OrderedDict()  # version -> loaded, oldest first
        self.failed: dict[int, float] = {}  # version -> when its file last failed to load
        self.examples_labeled = 0
        self.versions_used: dict[int, int] = defaultdict(int)  # version -> label batches
        m.TEACHER_NO_CHECKPOINT.labels(self.name).inc(0)

    # -- checkpoints -----------------------------------------------------------------------------
    def _read_announcements(self, timeout: float = 0.0) -> int:
        """Take in new announcements; hot-load the newest. Returns how many arrived."""
        msgs = consume_available(self.announcer, 1000, timeout)
        fresh = 0
        for msg in msgs:
            if msg.error() is not None:
                continue
            try:
                a = self.codec.decode_announcement(msg.value(), msg.headers())
            except DecodeError as exc:  # every labeler reads it: logged, not dead-lettered N times
                log.error(
                    "unreadable checkpoint announcement skipped", extra={"offset": msg.offset(), "error": str(exc)}
                )
                continue
            if self.announcements and a.version <= self.announcements[-1].version:
                continue  # a restarted trainer announces its current version again
            self.announcements.append(a)
            fresh += 1
        if fresh:
            newest = self.announcements[-1]
            # The store no longer holds versions older than oldest_kept: forget them.
            self.announcements = [a for a in self.announcements if a.version >= newest.oldest_kept]
            self.failed = {v: t for v, t in self.failed.items() if v >= newest.oldest_kept}
            self.history = [(a.version, a.watermark) for a in self.announcements]  # once, not per batch
            # Hot reload; a file that fails its checksum falls back to the newest older one.
            for i in range(len(self.announcements) - 1, -1, -1):
                if self._model(i, source="announcement") is not None:
                    break
            self._evict(keep=set())
        return fresh

    def _model(self, index: int, source: str = "store") -> RankingModel | None:
        """The loaded checkpoint of ``self.announcements[index]``; None if it cannot be loaded."""
        a = self.announcements[index]
        if a.version in self.models:
            self.models.move_to_end(a.version)
            return self.models[a.version]
        if time.monotonic() - self.failed.get(a.version, float("-inf")) < RETRY_FAILED_S:
            return None
        started = time.perf_counter()
        try:
            weights = self.store.load(a.uri, a.sha256)
            model = RankingModel(self.config.features, self.config.tasks, self.config.teacher.model)
            model.load_state_dict(weights)
        except (CheckpointError, OSError, RuntimeError) as exc:
            # An older checkpoint is still out-of-sample: the batches fall back to it.
            log.error("checkpoint unusable", extra={"version": a.version, "error": str(exc)})
            m.TEACHER_RELOADS.labels(self.name, "failed").inc()
            self.failed[a.version] = time.monotonic()
            return None
        model.to(self.device).eval()
        self.models[a.version] = model
        m.TEACHER_RELOADS.labels(self.name, source).inc()
        m.TEACHER_RELOAD_SECONDS.labels(self.name).observe(time.perf_counter() - started)
        log.info("loaded checkpoint", extra={"version": a.version, "source": source})
        return model

    def _evict(self, keep: set[int]) -> None:
        newest = self.announcements[-1].version if self.announcements else None
        for version in list(self.models):
            if len(self.models) <= self.pool.keep_in_memory:
                break
            if version not in keep and version != newest:
                del self.models[version]

    def _eligible(self, partition: int, offset: int) -> tuple[CheckpointAnnouncement, RankingModel] | None:
        history = self.history
        i = newest_eligible(history, partition, offset)
        while i is not None:
            model = self._model(i)
            if model is not None:
                return self.announcements[i], model
            i = newest_eligible(history[:i], partition, offset)
        return None

    def _trained_past(self, partition: int, offset: int) -> bool:
        """Whether the newest announced checkpoint has trained on the batch at ``offset``: no
        later checkpoint can label it out-of-sample then."""
        return bool(self.announcements) and self.announcements[-1].trained_through(partition) > offset

    # -- Kafka -------------------------------------------------------------------------------
    def start(self) -> None:
        topics = self.config.topics
        ensure_topics(self.config, self.clients.admin(), seconds=None)
        self.labels = LabelTransactions(
            self,
            f"{self.pool.labeler_group_id}.{self.name}",
            **{"transaction.timeout.ms": TRANSACTION_TIMEOUT_MS},
        )
        # Every announcement from the start, assigned and never committed: each labeler needs all.
        self.announcer = self.clients.consumer(f"{self.pool.labeler_group_id}.{self.name}.announcements")
        self.announcer.assign([TopicPartition(topics.checkpoints, 0, OFFSET_BEGINNING)])
        self.service.set_ready(False, "waiting for the trainer's first checkpoint")
        while not self.models and not self.service.stopping.is_set():
            self.service.heartbeat()  # alive, only not ready: a trainer that starts later is waited for
            self._read_announcements(timeout=1.0)
        self.consumer = self.clients.consumer(self.pool.labeler_group_id)
        self.subscribe([topics.examples])
        # Ready means connected with a model, able to take partitions: with more labelers than
        # partitions (a surge pod at the top of the KEDA range) one owns none and must still be
        # ready, or the rollout waits for it forever. Ownership is a metric.
        m.TEACHER_ASSIGNED_PARTITIONS.labels(self.name).set(0)
        self.service.set_ready(True, "connected, waiting for partitions")

    def assignment_changed(self) -> None:
        # Ready whether or not it owns partitions (see start); ownership is the metric.
        m.TEACHER_ASSIGNED_PARTITIONS.labels(self.name).set(len(self.assigned))

    # -- the loop ------------------------------------------------------------------------------
    def step(self) -> bool:
        self._read_announcements()
        records = self.poll(self.config.teacher.max_batches_per_step, self.config.teacher.poll_timeout_s)
        if not records:
            self._idle()
            return True
        started = time.perf_counter()
        self.service.set_ready(True, "labelling")
        labelled: list[tuple[object, ExampleBatch, CheckpointAnnouncement]] = []
        rewind: dict[int, int] = {}  # partition -> first batch with no out-of-sample checkpoint yet
        read: list = []  # every record of the transaction: an abort reads them all again
        if not self.transact(
            lambda: rewind.update(self._transaction(records, labelled, read)), lambda: self._abort(read)
        ):
            return True
        if rewind:
            seek_to(self.consumer, self.config.topics.examples, rewind)
            if not labelled:  # only waiting batches: give the announcements time to arrive
                self.service.set_ready(True, "waiting for a fresh enough checkpoint from the trainer")
                time.sleep(self.config.teacher.poll_timeout_s)
        n = sum(b.size for _, b, _ in labelled)
        self.examples_labeled += n
        m.TEACHER_EXAMPLES.labels(self.name).inc(n)
        m.TEACHER_LABEL_BATCHES.labels(self.name).inc(len(labelled))
        for msg, batch, a in labelled:
            self._observe_staleness(msg, batch, a)
            self.versions_used[a.version] += 1
        if labelled:
            m.TEACHER_VERSION.labels(self.name).set(max(a.version for _, _, a in labelled))
        self._evict(keep=set())
        elapsed = time.perf_counter() - started
        self.busy_s += elapsed
        m.TEACHER_STEP_SECONDS.labels(self.name).observe(elapsed)
        m.TEACHER_THROUGHPUT.labels(self.name).set(self.throughput.update(n, elapsed))
        if self.progress.due(self.examples_labeled):
            self.write_progress()
        return True

    def _transaction(self, records: list, labelled: list, read: list) -> dict[int, int]:
        """Label what can be labelled, in offset order per partition; returns the offsets to
        rewind to (partition -> first batch with no out-of-sample checkpoint yet).

        While ``max_transaction_seconds`` is left, what the consumer already holds is labelled
        too and joins the same transaction, as in the single teacher: one commit (3 ms on the
        embedded broker, 15% of a labeler's time at one commit per poll) per that many seconds.
        A poll that changes the assignment ends the reading: nothing is added for a partition
        that has gone."""
        rewind: dict[int, int] = {}
        done: dict[int, int] = {}  # partition -> next offset (labelled or dead-lettered)
        tc = self.config.teacher
        started, assigned = time.perf_counter(), set(self.assigned)
        self.labels.begin()
        while records:
            read.extend(records)
            self._label_records(records, labelled, rewind, done)
            if time.perf_counter() - started >= tc.max_transaction_seconds:
                break
            self._read_announcements()  # each poll labelled with the newest checkpoint, as per step
            records = self.poll(tc.max_batches_per_step, 0)  # no wait: an empty prefetch ends it
            if self.assigned != assigned:  # a rebalance: the next step labels what this poll read
                self.rewind(self.config.topics.examples, [r for r in records if r.partition() in self.assigned])
                break
        self.labels.commit(done)
        if rewind:
            log.info("waiting for a fresh enough out-of-sample checkpoint", extra={"rewind": rewind})
        return rewind

    def _label_records(self, records: list, labelled: list, rewind: dict[int, int], done: dict[int, int]) -> None:
        """Label one poll's records into the open transaction (see ``_transaction``)."""
        groups: dict[int, list[tuple[object, ExampleBatch, CheckpointAnnouncement]]] = defaultdict(list)
        for msg in records:
            p, o = msg.partition(), msg.offset()
            if p in rewind:
                continue  # keep the partition in order: nothing after a batch that waits
            try:
                batch = self.codec.decode_examples(msg.value(), msg.headers())
                check_layout(batch, self.config)
            except DecodeError as exc:
                self.labels.dead(msg, exc)
                done[p] = o + 1
                continue
            found = self._eligible(p, o)
            if found is None:
                rewind[p] = o
                m.TEACHER_NO_CHECKPOINT.labels(self.name).inc()
                continue
            a, _ = found
            if (o - a.trained_through(p)) * batch.size > self.pool.max_label_staleness_examples:
                if not self._trained_past(p, o):  # a fresher out-of-sample checkpoint can still come
                    rewind[p] = o
                    m.TEACHER_STALE_WAITS.labels(self.name).inc()
                    continue
                m.TEACHER_STALE_LABELS.labels(self.name).inc()
            groups[a.version].append((msg, batch, a))
            done[p] = o + 1
        for version, items in sorted(groups.items()):
            self._publish_labels(self.models[version], items)
            labelled.extend(items)

    def _publish_labels(self, model: RankingModel, items: list) -> None:
        batches = [b for _, b, _ in items]
        cat, dense, _ = batch_tensors(batches, self.device)
        logits = predict(model, cat, dense)
        start = 0
        now_ms = int(time.time() * 1000)
        for msg, batch, a in items:
            chunk = logits[start : start + batch.size]
            start += batch.size
            p = msg.partition()
            label = LabelBatch.of(batch, msg, a.version, a.trained_through(p), self.task_names, chunk, now_ms)
            self.labels.label(label, p)

    def _observe_staleness(self, msg, batch: ExampleBatch, a: CheckpointAnnouncement) -> None:
        p = msg.partition()
        m.TEACHER_STALENESS_EXAMPLES.labels(self.name).observe((msg.offset() - a.trained_through(p)) * batch.size)
        _, ts = msg.timestamp()
        trained_ts = a.watermark_time_ms.get(p)
        if trained_ts is not None and ts > 0:
            m.TEACHER_STALENESS_SECONDS.labels(self.name).observe(max(0.0, (ts - trained_ts) / 1000))

    def _abort(self, records: list) -> None:
        """Abort, then read the step's batches again: the next step labels them anew."""
        self.labels.abort()
        self.rewind(self.config.topics.examples, records)

    def _idle(self) -> None:
        self.check_broker(True, f"connected, {len(self.assigned)} partitions assigned")
        if self.progress.due():
            self.write_progress()

    def progress_count(self) -> int:
        return self.examples_labeled

    def snapshot(self) -> dict:
        return {
            "role": self.role,
            "teacher_role": "labeler",
            "name": self.name,
            "version": self.announcements[-1].version if self.announcements else None,
            "versions_in_memory": list(self.models),
            "label_batches_by_version": dict(sorted(self.versions_used.items())),
            "partitions": sorted(self.assigned),
            "examples_labeled": self.examples_labeled,
            "busy_s": self.busy_s,
            "examples_per_s": self.examples_labeled / self.busy_s if self.busy_s else 0.0,
        }

    def consumers(self) -> list:
        return [*super().consumers(), self.announcer]


def run_labeler(config: Config) -> None:
    """Run until SIGTERM/SIGINT: the entry point of ``distill teacher --role labeler``."""
    run_worker(Labeler(config))
