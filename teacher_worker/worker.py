"""The teacher's hot path: per batch score -> train, then publish labels + commit (one transaction).

Every label is out-of-sample: a batch's logits are the scores of the learning step's forward
pass, from the weights before the step that trains on it (``distill.learn.step``). Each batch is
labelled by a teacher that has trained on every batch before it, so grouping batches into one
transaction costs the labels nothing. Each LabelBatch carries the watermark (per partition, the
example offsets the teacher had trained through) and the teacher's version.

Order of one step:
  1. consume up to ``max_batches_per_step`` example batches and decode them back to back;
     undecodable ones go to the DLQ;
  2. per batch, in offset order: one learning step (score, then train on the hard labels; a
     NaN loss skips the optimizer step and is counted) -> one LabelBatch to the same partition
     number of the labels topic (batch id, checksum, version, watermark);
  3. dead letters, labels and the examples offsets in one transaction; commit (exactly-once
     labels on Kafka). The commit runs on a publisher thread while the next transaction's
     batches are labelled and trained: its broker round trips leave the training thread. A
     transaction is sent only once the one before it has committed, so labels keep their
     order. A failed commit is aborted and the *same* labels are sent again in a new
     transaction, with those labelled meanwhile (never relabelled: the weights have trained
     on those batches since);
  4. every N batches or T seconds: checkpoint model + optimizer + trained-through offsets,
     once every label of a trained batch has committed (the checkpoint resumes past them);
     serialized on the training thread, made durable on a checkpoint thread.
On restart the checkpoint's offsets win over the group's: batches labelled after the last
checkpoint are labelled again (same batch id, de-duplicated by readers) and trained once.

A partition taken away before its labels committed (a rebalance, or an assignment lost while
the coordinator was unreachable) keeps those labels here. If it comes back, the teacher reads
from the first of those batches again and sends the kept labels rather than training again.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
from confluent_kafka import Message

from distill.core import metrics as m
from distill.core.checkpoint import Checkpointer, serialize
from distill.core.config import Config
from distill.core.exceptions import DecodeError
from distill.core.kafka import ensure_topics, seek_to
from distill.core.layout import check_layout
from distill.core.service import Service
from distill.core.wire import ExampleBatch, LabelBatch
from distill.core.worker import Worker, run_worker
from distill.learn.evaluation import ProgressiveEvaluator
from distill.learn.models import resolve_device, weights_finite
from distill.learn.step import Learner, Objective
from teacher_worker.labels import LabelTransactions

log = logging.getLogger(__name__)


@dataclass
class Read:
    """A consumed record, decoded as it arrives with the rest of its poll: back to back the
    decoder's code and data stay in the caches (between two training steps it took 3x as long)."""

    record: Message
    batch: ExampleBatch | DecodeError


@dataclass
class Labelled:
    """One example batch's label, and its true labels for the progressive evaluation."""

    record: Message
    label: LabelBatch
    truth: np.ndarray | None  # None for the null model (transport benchmark)


@dataclass
class Outbox:
    """One step's output, kept until its transaction commits (and sent again if it aborts)."""

    records: list[Message]
    labels: list[Labelled] = field(default_factory=list)
    dead: list[tuple[Message, DecodeError]] = field(default_factory=list)
    started: float = field(default_factory=time.perf_counter)  # when its first batch was read

    def extend(self, later: Outbox) -> None:
        """Join the next transaction's output to this one (sent again together, in order)."""
        self.records += later.records
        self.labels += later.labels
        self.dead += later.dead

    @property
    def examples(self) -> int:
        return sum(e.label.size for e in self.labels)

    def take(self, partitions: set[int]) -> tuple[list[Message], list[Labelled]]:
        """Remove and return the records and labels of ``partitions``."""
        taken = [r for r in self.records if r.partition() in partitions]
        labels = [e for e in self.labels if e.record.partition() in partitions]
        self.records = [r for r in self.records if r.partition() not in partitions]
        self.labels = [e for e in self.labels if e.record.partition() not in partitions]
        self.dead = [(r, e) for r, e in self.dead if r.partition() not in partitions]
        return taken, labels


@dataclass
class HandedAway:
    """A partition's batches whose transaction lost the partition: read again from ``start``
    if it comes back; the kept labels go out instead of a second training step."""

    start: int  # the first record not committed
    end: int  # past the last one
    labels: dict[int, Labelled]  # offset -> label


class TeacherWorker(Worker):
    role = "teacher"

    def __init__(self, config: Config, service: Service | None = None):
        tc = config.teacher
        super().__init__(config, tc.name, port=tc.metrics_port, service=service)
        self.device = resolve_device(tc.device)
        self.learner = Learner.build(config, tc.model, Objective.teacher(config), self.device)
        self.model, self.optimizer = self.learner.model, self.learner.optimizer
        # model.kind "null" (transport benchmark): zero logits, no forward pass, no training.
        self.null = tc.model.kind == "null"
        self.checkpointer = Checkpointer(config.checkpoint_dir(self.role, self.name), tc.checkpoint.keep)
        self.evaluator = ProgressiveEvaluator(self.task_names, self.kinds)
        state = self.restore(self.checkpointer, self.learner)  # {} on a fresh start
        self.version: int = state.get("version", 0)
        # partition -> next example offset to train (the checkpoint's win over the group's)
        self.trained_through = {int(p): int(o) for p, o in state.get("trained_through", {}).items()}
        self.examples_labeled: int = state.get("examples_labeled", 0)
        self.examples_trained: int = state.get("examples_trained", 0)
        self.evaluator.load_state_dict(state.get("evaluator", {}))
        self.batches_since_ckpt = 0
        self.last_ckpt = time.monotonic()
        self.outbox: Outbox | None = None  # labels whose transaction aborted: sent again next step
        self.committing: tuple[Outbox, Future[bool]] | None = None  # on the publisher thread
        self.publisher = ThreadPoolExecutor(1, thread_name_prefix=f"{self.role}-commit")
        self.checkpoint_writer = ThreadPoolExecutor(1, thread_name_prefix=f"{self.role}-checkpoint")
        self.writing: Future[None] | None = None  # the checkpoint being made durable
        self._last_committed = 0.0  # perf_counter of the last commit counted
        self.building: Outbox | None = None  # the transaction being labelled (polls may rebalance)
        self.unread: list[Read] = []  # read, not labelled yet: the next step's first records
        self.handed_away: dict[int, HandedAway] = {}  # partition -> labels a lost transaction held
        self._layout_ok: tuple[list[str], list[str], list[str]] | None = None
        self._last_losses: dict = {}
        self._trained = m.TEACHER_TRAINED.labels(self.name)
        m.TEACHER_VERSION.labels(self.name).set(self.version)
        m.TEACHER_NAN.labels(self.name).inc(0)  # exported at 0 from the start, so increase() alerts see the first one

    # -- checkpoints -------------------------------------------------------------------------
    def checkpoint(self) -> None:
        """The state is serialized here; hashing, the write and the fsyncs run on the checkpoint
        thread while training goes on (they were about two thirds of a checkpoint's time). One
        write at a time: a failed one raises here, at the next checkpoint, or when stopping."""
        if not weights_finite(self.model):
            log.error("weights are not finite: checkpoint skipped (the last good one stays)")
            m.TEACHER_NAN.labels(self.name).inc()
            return
        self.checkpoint_written()
        started = time.perf_counter()
        self.version += 1
        payload = serialize(
            {
                "version": self.version,
                **self.learner.state_dict(),
                "trained_through": self._resume_offsets(),
                "examples_labeled": self.examples_labeled,
                "examples_trained": self.examples_trained,
                "evaluator": self.evaluator.state_dict(),
            }
        )
        self.batches_since_ckpt = 0
        self.last_ckpt = time.monotonic()
        m.TEACHER_VERSION.labels(self.name).set(self.version)
        self.writing = self.checkpoint_writer.submit(self._write_checkpoint, self.version, payload, started)

    def _write_checkpoint(self, version: int, payload: bytes, started: float) -> None:
        self.checkpointer.write(version, payload)
        m.TEACHER_CKPT_AGE.labels(self.name).set(time.time())
        m.TEACHER_CKPT_SECONDS.labels(self.name).observe(time.perf_counter() - started)

    def checkpoint_written(self) -> None:
        """Wait until the checkpoint being written is durable (its error is raised here)."""
        if self.writing is not None:
            writing, self.writing = self.writing, None
            writing.result()

    def _resume_offsets(self) -> dict[int, int]:
        """Per partition, where a restart reads from: the next batch to train, or the first
        handed-away batch whose label is not out yet."""
        kept = self.handed_away
        return {p: min(o, kept[p].start) if p in kept else o for p, o in self.trained_through.items()}

    def _checkpoint_due(self) -> bool:
        return self.config.teacher.checkpoint.due(self.batches_since_ckpt, time.monotonic() - self.last_ckpt)

    # -- Kafka -------------------------------------------------------------------------------
    def start(self) -> None:
        # A broker that is not there yet is waited for (not ready), never a crash loop.
        ensure_topics(self.config, self.clients.admin(), seconds=None)
        self.labels = LabelTransactions(self, f"{self.config.teacher.group_id}.{self.name}")
        self.consumer = self.clients.consumer(self.config.teacher.group_id)
        self.subscribe([self.config.topics.examples])

    def on_assign(self, partitions) -> None:
        # The checkpoint's offsets win over the group's committed ones; a partition that comes
        # back is read again from its first batch whose label did not go out.
        for tp in partitions:
            if tp.partition in self.trained_through:
                tp.offset = self._resume_offsets()[tp.partition]

    def on_revoke(self, partitions) -> None:
        # Partitions taken away (or lost) while their labels wait for a commit: this teacher
        # commits neither their labels nor their offsets. The next owner labels them with
        # weights that have not trained on them; if they come back here, the kept labels go out.
        gone = {tp.partition for tp in partitions}
        self._settle()  # the transaction in flight either committed or is kept like the others
        for outbox in (self.building, self.outbox):
            if outbox is not None:
                self._hand_away(outbox, gone)
        self.unread = [r for r in self.unread if r.record.partition() not in gone]  # read again from trained_through

    def _hand_away(self, outbox: Outbox, gone: set[int]) -> None:
        records, labels = outbox.take(gone)
        for p in {r.partition() for r in records}:
            kept = HandedAway(
                start=min(r.offset() for r in records if r.partition() == p),
                end=self.trained_through[p],
                labels={e.record.offset(): e for e in labels if e.record.partition() == p},
            )
            if p in self.handed_away:  # taken away again before all of it was read again
                old = self.handed_away[p]
                kept = HandedAway(min(old.start, kept.start), max(old.end, kept.end), old.labels | kept.labels)
            self.handed_away[p] = kept

    # -- the loop ------------------------------------------------------------------------------
    def step(self) -> bool:
        if self.outbox is not None:  # an aborted transaction: send the same labels again
            return self._retry(self.outbox)
        tc = self.config.teacher
        # One transaction per step; records read but not labelled in time open the next one.
        records, self.unread = self.unread or self._read(tc.max_batches_per_step, tc.poll_timeout_s), []
        if not records:
            self._idle()
            return True
        self.service.set_ready(bool(self.assigned), "assigned")
        started = time.perf_counter()
        outbox, self.unread = self._label_and_train(records)  # the previous transaction commits meanwhile
        self.busy_s += time.perf_counter() - started
        self._settle()
        if self.outbox is not None:  # the previous one aborted: this one goes out with its retry
            self.outbox.extend(outbox)
            return True
        self._send(outbox)
        self._after_commit()
        return True

    def _read(self, max_messages: int, timeout: float) -> list[Read]:
        """Records of the partitions this teacher owns now, decoded. A poll that revoked a
        partition may still return records fetched for it before: labelling them would move its
        trained-through offset past batches whose labels it handed away."""
        return [Read(r, self._decode(r)) for r in self.poll(max_messages, timeout) if r.partition() in self.assigned]

    def _decode(self, msg: Message) -> ExampleBatch | DecodeError:
        try:
            batch = self.codec.decode_examples(msg.value(), msg.headers())
            self._check_layout(batch)
        except DecodeError as exc:
            return exc
        return batch

    def _label_and_train(self, records: list[Read]) -> tuple[Outbox, list[Read]]:
        """Label and train batches in offset order until ``max_transaction_seconds`` have gone
        (at least one batch): the transaction's first labels wait at most about that long.

        While time is left, what the consumer already holds is read too and joins the same
        transaction: one commit (two broker round trips) per ``max_transaction_seconds`` rather
        than per ``max_batches_per_step`` batches."""
        outbox = self.building = Outbox([])
        now_ms = int(time.time() * 1000)
        started = time.perf_counter()
        tc = self.config.teacher
        try:
            while records:
                for i, read in enumerate(records):
                    if outbox.records and time.perf_counter() - started >= tc.max_transaction_seconds:
                        return outbox, records[i:]
                    self._label_one(read, outbox, now_ms)
                if time.perf_counter() - started >= tc.max_transaction_seconds:
                    break
                # no wait: an empty prefetch ends the transaction (a live stream's labels go now)
                records = self._read(tc.max_batches_per_step, 0)
            return outbox, []
        finally:
            self.building = None
            self._report_losses()

    def _label_one(self, read: Read, outbox: Outbox, now_ms: int) -> None:
        msg, batch = read.record, read.batch
        p = msg.partition()
        if p in self.handed_away and self._past_kept(msg):
            return
        outbox.records.append(msg)
        if p in self.handed_away and self._send_kept(msg, outbox):
            return
        if isinstance(batch, DecodeError):
            outbox.dead.append((msg, batch))
            self.trained_through[p] = msg.offset() + 1
            return
        watermark = self.trained_through.get(p, 0)  # before this batch: it is out-of-sample
        logits = self._score_and_train(batch)
        self.trained_through[p] = msg.offset() + 1
        label = LabelBatch.of(batch, msg, self.version, watermark, self.task_names, logits, now_ms)
        outbox.labels.append(Labelled(msg, label, None if self.null else batch.labels))

    def _past_kept(self, msg: Message) -> bool:
        """A record after the kept batches of a partition that came back, read before them:
        not labelled; the partition is read again from the first kept one."""
        kept = self.handed_away[msg.partition()]
        if msg.offset() < kept.end:
            return False
        log.error(
            "read past the labels kept for a partition that came back: reading from them again",
            extra={"partition": msg.partition(), "offset": msg.offset(), "kept_from": kept.start},
        )
        assert self.consumer is not None
        seek_to(self.consumer, self.config.topics.examples, {msg.partition(): kept.start})
        return True

    def _send_kept(self, msg: Message, outbox: Outbox) -> bool:
        """A batch read again after its partition came back: its kept label, if it has one (it
        was scored before the weights trained on it; training again would count it twice)."""
        kept = self.handed_away[msg.partition()]
        offset = msg.offset()
        kept.start = offset + 1
        label = kept.labels.pop(offset, None)
        if kept.start >= kept.end:
            del self.handed_away[msg.partition()]
        if label is None:  # a dead letter: dead-lettered again
            return False
        outbox.labels.append(replace(label, record=msg))
        return True

    def _check_layout(self, batch: ExampleBatch) -> None:
        """``check_layout`` once per distinct layout: every batch of a stream carries the same."""
        names = (batch.categorical_names, batch.dense_names, batch.task_names)
        if names != self._layout_ok:
            check_layout(batch, self.config)
            self._layout_ok = names

    def _score_and_train(self, batch: ExampleBatch) -> np.ndarray:
        if self.null:  # transport benchmark: zero logits, no forward pass, no training
            return np.zeros((batch.size, len(self.task_names)), dtype=np.float32)
        scored = self.learner.step(self.learner.tensors(batch))
        assert scored is not None
        if scored.stepped:
            self.examples_trained += batch.size
            self._trained.inc(batch.size)
            self._last_losses = scored.losses
        else:
            m.TEACHER_NAN.labels(self.name).inc()
            log.warning("non-finite loss: training step skipped", extra={"batch_id": batch.batch_id})
        return np.ascontiguousarray(scored.main, dtype=np.float32)

    def _report_losses(self) -> None:
        """The loss gauges take the transaction's last step (read once, not per batch)."""
        for (i, _head), value in self._last_losses.items():
            m.TEACHER_LOSS.labels(self.name, self.task_names[i]).set(value.item())
        self._last_losses = {}

    def _send(self, outbox: Outbox) -> None:
        """Commit ``outbox`` on the publisher thread; ``_settle`` takes the outcome."""
        assert self.consumer is not None and self.committing is None
        metadata = self.consumer.consumer_group_metadata()  # the polling thread's, for the commit
        future = self.publisher.submit(self.transact, lambda: self._transaction(outbox, metadata), self.labels.abort)
        self.committing = (outbox, future)

    def _settle(self) -> None:
        """Wait for the transaction in flight: counted if it committed, kept to send again if it
        aborted. A fenced producer's error is raised here, on the worker's thread."""
        if self.committing is None:
            return
        outbox, future = self.committing
        self.committing = None
        if future.result():
            self._committed(outbox)
        else:
            self._keep_for_retry(outbox)

    def _committed(self, outbox: Outbox) -> None:
        """Counted once the transaction has committed."""
        now = time.perf_counter()
        self.examples_labeled += outbox.examples
        m.TEACHER_EXAMPLES.labels(self.name).inc(outbox.examples)
        m.TEACHER_LABEL_BATCHES.labels(self.name).inc(len(outbox.labels))
        scored = [e for e in outbox.labels if e.truth is not None]
        if scored:
            self.evaluator.update(
                "main", np.concatenate([e.label.logits for e in scored]), np.concatenate([e.truth for e in scored])
            )
        self.batches_since_ckpt += len(outbox.records)
        m.TEACHER_STEP_SECONDS.labels(self.name).observe(now - outbox.started)
        # transactions overlap (one commits while the next trains): the rate is per wall second
        wall = now - max(outbox.started, self._last_committed)
        m.TEACHER_THROUGHPUT.labels(self.name).set(self.throughput.update(outbox.examples, wall))
        self._last_committed = now

    def _after_commit(self) -> None:
        if self._checkpoint_due():
            self._settle()  # the checkpoint resumes past every trained batch: their labels first
            if self.outbox is None:
                self.checkpoint()
        if self.progress.due(self.examples_labeled):
            self.write_progress()

    def _retry(self, outbox: Outbox) -> bool:
        # Serve rebalance callbacks first, so the labels of a revoked partition are handed
        # away; a record the poll returns waits with the other unread ones.
        time.sleep(self.config.teacher.poll_timeout_s)
        self.unread += self._read(1, 0)
        self.outbox = None
        if outbox.records:
            self._send(outbox)
            self._settle()
            self._after_commit()
        return True

    def _transaction(self, outbox: Outbox, group_metadata: Any) -> None:
        self.labels.begin()
        for msg, exc in outbox.dead:
            self.labels.dead(msg, exc)
        for e in outbox.labels:
            self.labels.label(e.label, e.record.partition())
        self.labels.commit({msg.partition(): msg.offset() + 1 for msg in outbox.records}, group_metadata)

    def _abort(self, outbox: Outbox) -> None:
        """Abort; keep the labels to send again (the consumer does not seek back)."""
        self.labels.abort()
        self._keep_for_retry(outbox)

    def _keep_for_retry(self, outbox: Outbox) -> None:
        self._hand_away(outbox, {r.partition() for r in outbox.records} - self.assigned)
        self.outbox = outbox if outbox.records else None

    def _idle(self) -> None:
        self._settle()
        if self.outbox is not None:  # aborted: sent again next step
            return
        self.check_broker(bool(self.assigned), "assigned" if self.assigned else "no partitions assigned")
        if self._checkpoint_due():
            self.checkpoint()
        if self.progress.due():
            self.write_progress()

    def progress_count(self) -> int:
        return self.examples_labeled

    def snapshot(self) -> dict:
        snap = self.evaluator.snapshot()
        m.set_teacher_metrics(self.name, self.evaluator.values(snap))
        return {
            "role": self.role,
            "name": self.name,
            "version": self.version,
            "params": self.model.param_count(),
            "flops_per_example": self.model.flops_per_example,
            "examples_labeled": self.examples_labeled,
            "examples_trained": self.examples_trained,
            "busy_s": self.busy_s,
            "examples_per_s": self.examples_labeled / self.busy_s if self.busy_s else 0.0,
            "metrics": snap,
        }

    def finish(self) -> None:
        try:
            self._settle()
        finally:
            self.publisher.shutdown()
        try:
            if self.outbox is not None:
                # Trained on batches whose labels are not out: a checkpoint would skip them.
                log.warning("stopping with labels unpublished: they are labelled again after the restart")
            elif self.batches_since_ckpt:
                self.checkpoint()
            self.checkpoint_written()
        finally:
            self.checkpoint_writer.shutdown()


def run_teacher(config: Config) -> None:
    """Run until SIGTERM/SIGINT: the entry point of ``distill teacher``."""
    run_worker(TeacherWorker(config))
