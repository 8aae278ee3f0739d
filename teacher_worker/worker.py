"""The teacher's hot path: per batch score -> train, then publish labels + commit (one transaction).

Every label is out-of-sample: a batch's logits are the scores of the learning step's forward
pass, from the weights before the step that trains on it (``distill.learn.step``). Each batch is
labelled by a teacher that has trained on every batch before it, so grouping batches into one
transaction costs the labels nothing. Each LabelBatch carries the watermark (per partition, the
example offsets the teacher had trained through) and the teacher's version.

Order of one step:
  1. consume up to ``max_batches_per_step`` example batches; undecodable ones go to the DLQ;
  2. per batch, in offset order: one learning step (score, then train on the hard labels; a
     NaN loss skips the optimizer step and is counted) -> one LabelBatch to the same partition
     number of the labels topic (batch id, checksum, version, watermark);
  3. dead letters, labels and the examples offsets in one transaction; commit (exactly-once
     labels on Kafka). A failed commit is aborted and the *same* labels are sent again in a new
     transaction (never relabelled: the weights have trained on those batches since);
  4. every N batches or T seconds: checkpoint model + optimizer + trained-through offsets.
On restart the checkpoint's offsets win over the group's: batches labelled after the last
checkpoint are labelled again (same batch id, de-duplicated by readers) and trained once.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np
from confluent_kafka import KafkaException, Message

from distill.core import metrics as m
from distill.core.checkpoint import Checkpointer
from distill.core.config import Config
from distill.core.dead_letters import DeadLetters
from distill.core.exceptions import DecodeError
from distill.core.kafka import (
    BrokerProbe,
    Clients,
    consume_available,
    ensure_topics,
    export_lag,
    fenced,
    fenced_error,
    is_retriable,
    needs_abort,
    partitions_at,
    seek_to,
    without_errors,
)
from distill.core.layout import check_layout
from distill.core.progress import ProgressLog
from distill.core.service import Service
from distill.core.wire import Codec, ExampleBatch, LabelBatch
from distill.learn.evaluation import ProgressiveEvaluator
from distill.learn.models import resolve_device, weights_finite
from distill.learn.step import Learner, Objective

log = logging.getLogger(__name__)


def _first_offsets(records: list[Message]) -> dict[int, int]:
    first: dict[int, int] = {}
    for msg in records:
        first.setdefault(msg.partition(), msg.offset())
    return first


@dataclass
class Outbox:
    """One step's output, kept until its transaction commits (and sent again if it aborts)."""

    records: list[Message]
    labels: list[tuple[Message, LabelBatch]] = field(default_factory=list)
    dead: list[tuple[Message, DecodeError]] = field(default_factory=list)
    scores: list[tuple[np.ndarray, np.ndarray]] = field(default_factory=list)  # (logits, labels)

    @property
    def examples(self) -> int:
        return sum(lb.size for _, lb in self.labels)

    def keep_only(self, partitions: set[int]) -> None:
        self.records = [r for r in self.records if r.partition() in partitions]
        self.labels = [(r, lb) for r, lb in self.labels if r.partition() in partitions]
        self.dead = [(r, e) for r, e in self.dead if r.partition() in partitions]


class TeacherWorker:
    role = "teacher"

    def __init__(self, config: Config, service: Service | None = None):
        self.config = config
        tc = config.teacher
        self.name = tc.name
        self.service = service or Service(self.role, self.name, port=tc.metrics_port)
        self.device = resolve_device(tc.device)
        self.learner = Learner.build(config, tc.model, Objective.teacher(config), self.device)
        self.model, self.optimizer = self.learner.model, self.learner.optimizer
        self.kinds = [t.type for t in config.tasks]
        self.task_names = [t.name for t in config.tasks]
        # model.kind "null" (transport benchmark): zero logits, no forward pass, no training.
        self.null = tc.model.kind == "null"
        self.codec = Codec(config.wire.non_finite, config.wire.max_message_bytes)
        self.clients = Clients(config.kafka, f"teacher.{self.name}")
        self.checkpointer = Checkpointer(config.checkpoint_dir(self.role, self.name), tc.checkpoint.keep)
        self.progress = ProgressLog(config.progress_dir(), self.role, self.name)
        self.evaluator = ProgressiveEvaluator(self.task_names, self.kinds)
        self.version = 0
        self.trained_through: dict[int, int] = {}  # partition -> next example offset to train
        self.examples_labeled = 0
        self.examples_trained = 0
        self.batches_since_ckpt = 0
        self.last_ckpt = time.monotonic()
        self.assigned: set[int] = set()
        self.outbox: Outbox | None = None  # labels whose transaction has not committed yet
        self.busy_s = 0.0
        self._throughput = m.Throughput()
        self.probe = BrokerProbe()
        for counter in (
            m.TEACHER_NAN.labels(self.name),
            m.TEACHER_TRANSACTIONS.labels(self.name, "commit"),
            m.TEACHER_TRANSACTIONS.labels(self.name, "abort"),
        ):
            counter.inc(0)  # exported at 0 from the start, so increase() alerts see the first one
        self._restore()

    # -- checkpoints -------------------------------------------------------------------------
    def _restore(self) -> None:
        found = self.checkpointer.load_latest()
        if found is None:
            log.info("no checkpoint: starting a fresh teacher")
            return
        version, state = found
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.version = state["version"]
        self.trained_through = {int(p): int(o) for p, o in state["trained_through"].items()}
        self.examples_labeled = state.get("examples_labeled", 0)
        self.examples_trained = state.get("examples_trained", 0)
        self.evaluator.load_state_dict(state.get("evaluator", {}))
        m.TEACHER_VERSION.labels(self.name).set(self.version)
        log.info("restored checkpoint", extra={"version": version, "offsets": self.trained_through})

    def checkpoint(self) -> None:
        if not weights_finite(self.model):
            log.error("weights are not finite: checkpoint skipped (the last good one stays)")
            m.TEACHER_NAN.labels(self.name).inc()
            return
        started = time.perf_counter()
        self.version += 1
        self.checkpointer.save(
            self.version,
            {
                "version": self.version,
                "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "trained_through": dict(self.trained_through),
                "examples_labeled": self.examples_labeled,
                "examples_trained": self.examples_trained,
                "evaluator": self.evaluator.state_dict(),
            },
        )
        self.batches_since_ckpt = 0
        self.last_ckpt = time.monotonic()
        m.TEACHER_VERSION.labels(self.name).set(self.version)
        m.TEACHER_CKPT_AGE.labels(self.name).set(time.time())
        m.TEACHER_CKPT_SECONDS.labels(self.name).observe(time.perf_counter() - started)

    def _checkpoint_due(self) -> bool:
        cc = self.config.teacher.checkpoint
        return self.batches_since_ckpt > 0 and (
            self.batches_since_ckpt >= cc.every_batches or time.monotonic() - self.last_ckpt >= cc.every_seconds
        )

    # -- Kafka -------------------------------------------------------------------------------
    def start(self) -> None:
        topics = self.config.topics
        # A broker that is not there yet is waited for (not ready), never a crash loop.
        ensure_topics(self.config, self.clients.admin(), seconds=None)
        self.producer = self.clients.producer(transactional_id=f"{self.config.teacher.group_id}.{self.name}")
        self.producer.init_transactions(60)
        self.dead_letters = DeadLetters(self.producer, self.codec, self.role, self.name)
        self.consumer = self.clients.consumer(self.config.teacher.group_id)
        self.consumer.subscribe(
            [topics.examples], on_assign=self._on_assign, on_revoke=self._on_revoke, on_lost=self._on_revoke
        )

    def _on_assign(self, consumer, partitions) -> None:
        # The checkpoint's offsets win over the group's committed ones.
        for tp in partitions:
            if tp.partition in self.trained_through:
                tp.offset = self.trained_through[tp.partition]
            self.assigned.add(tp.partition)
        consumer.incremental_assign(partitions)
        log.info("partitions assigned", extra={"partitions": sorted(self.assigned)})
        self.service.set_ready(bool(self.assigned), "assigned" if self.assigned else "no partitions")

    def _on_revoke(self, consumer, partitions) -> None:
        # Every step commits its own transaction, so nothing is pending between steps.
        for tp in partitions:
            self.assigned.discard(tp.partition)
        consumer.incremental_unassign(partitions)
        self.service.set_ready(bool(self.assigned), "assigned" if self.assigned else "no partitions assigned")

    # -- the loop ------------------------------------------------------------------------------
    def step(self) -> bool:
        if self.outbox is not None:  # an aborted transaction: send the same labels again
            return self._retry(self.outbox)
        msgs = consume_available(
            self.consumer, self.config.teacher.max_batches_per_step, self.config.teacher.poll_timeout_s
        )
        records = without_errors(msgs, lambda reason: self.service.set_ready(False, reason))
        if not records:
            self._idle()
            return True
        self.service.set_ready(bool(self.assigned), "assigned")
        while records:
            started = time.perf_counter()
            outbox, records = self._label_and_train(records)
            self.busy_s += time.perf_counter() - started
            self._publish(outbox, started)
            if self.outbox is not None and records:  # aborted: the rest is read again later
                seek_to(self.consumer, self.config.topics.examples, _first_offsets(records))
                break
        return True

    def _label_and_train(self, records: list[Message]) -> tuple[Outbox, list[Message]]:
        """Label and train batches in offset order until ``max_transaction_seconds`` have gone
        (at least one batch): the transaction's first labels wait at most about that long."""
        outbox = Outbox([])
        now_ms = int(time.time() * 1000)
        started = time.perf_counter()
        budget = self.config.teacher.max_transaction_seconds
        for i, msg in enumerate(records):
            if outbox.records and time.perf_counter() - started >= budget:
                return outbox, records[i:]
            outbox.records.append(msg)
            p = msg.partition()
            try:
                batch = self.codec.decode_examples(msg.value(), msg.headers())
                check_layout(batch, self.config)
            except DecodeError as exc:
                outbox.dead.append((msg, exc))
                self.trained_through[p] = msg.offset() + 1
                continue
            watermark = self.trained_through.get(p, 0)  # before this batch: it is out-of-sample
            logits = self._score_and_train(batch)
            self.trained_through[p] = msg.offset() + 1
            label = LabelBatch.of(batch, msg, self.version, watermark, self.task_names, logits, now_ms)
            outbox.labels.append((msg, label))
            if not self.null:
                outbox.scores.append((logits, batch.labels))
        return outbox, []

    def _score_and_train(self, batch: ExampleBatch) -> np.ndarray:
        if self.null:  # transport benchmark: zero logits, no forward pass, no training
            return np.zeros((batch.size, len(self.task_names)), dtype=np.float32)
        scored = self.learner.step(self.learner.tensors(batch))
        assert scored is not None
        if scored.stepped:
            self.examples_trained += batch.size
            m.TEACHER_TRAINED.labels(self.name).inc(batch.size)
            for (i, _head), value in scored.losses.items():
                m.TEACHER_LOSS.labels(self.name, self.task_names[i]).set(value.item())
        else:
            m.TEACHER_NAN.labels(self.name).inc()
            log.warning("non-finite loss: training step skipped", extra={"batch_id": batch.batch_id})
        return np.ascontiguousarray(scored.main, dtype=np.float32)

    def _publish(self, outbox: Outbox, started: float | None = None) -> bool:
        try:
            self._transaction(outbox)
        except Exception as exc:
            if fenced(exc):
                raise fenced_error(f"{self.config.teacher.group_id}.{self.name}", "teacher.name") from None
            if not needs_abort(exc) and not is_retriable(exc):
                raise
            log.warning("transaction failed: aborting, then sending the same labels again", extra={"error": str(exc)})
            self._abort(outbox)
            return True
        self.outbox = None
        # counted once the transaction has committed
        self.examples_labeled += outbox.examples
        m.TEACHER_EXAMPLES.labels(self.name).inc(outbox.examples)
        m.TEACHER_LABEL_BATCHES.labels(self.name).inc(len(outbox.labels))
        if outbox.scores:
            self.evaluator.update(
                "main", np.concatenate([s for s, _ in outbox.scores]), np.concatenate([y for _, y in outbox.scores])
            )
        self.batches_since_ckpt += len(outbox.records)
        if started is not None:
            elapsed = time.perf_counter() - started
            m.TEACHER_STEP_SECONDS.labels(self.name).observe(elapsed)
            m.TEACHER_THROUGHPUT.labels(self.name).set(self._throughput.update(outbox.examples, elapsed))
        if self._checkpoint_due():
            self.checkpoint()
        if self.progress.due(self.examples_labeled):
            self._write_progress()
        return True

    def _retry(self, outbox: Outbox) -> bool:
        # Serve rebalance callbacks first, so the labels of a revoked partition are dropped;
        # a record the poll returns is read again later (seek back to it).
        time.sleep(self.config.teacher.poll_timeout_s)
        msgs = [msg for msg in self.consumer.consume(1, 0) if msg.error() is None]
        seek_to(self.consumer, self.config.topics.examples, {msg.partition(): msg.offset() for msg in msgs})
        outbox.keep_only(self.assigned)
        if not outbox.records:
            self.outbox = None
            return True
        return self._publish(outbox)

    def _transaction(self, outbox: Outbox) -> None:
        self.producer.begin_transaction()
        for msg, exc in outbox.dead:
            self.dead_letters.send(msg, exc)
        for msg, label in outbox.labels:
            value, headers = self.codec.encode_labels(label)
            self.producer.produce(
                self.config.topics.labels,
                value=value,
                key=label.batch_id.encode(),
                partition=msg.partition(),
                headers=headers,
            )
        offsets: dict[int, int] = {}
        for msg in outbox.records:
            offsets[msg.partition()] = msg.offset() + 1
        self.producer.send_offsets_to_transaction(
            partitions_at(self.config.topics.examples, offsets), self.consumer.consumer_group_metadata(), 30
        )
        self.producer.commit_transaction(60)
        m.TEACHER_TRANSACTIONS.labels(self.name, "commit").inc()

    def _abort(self, outbox: Outbox) -> None:
        """Abort; keep the labels to send again, for the partitions this teacher still owns.

        Labels of a partition handed to another teacher are dropped: that one labels them with
        its own weights (which have not trained on them). The consumer does not seek back."""
        m.TEACHER_TRANSACTIONS.labels(self.name, "abort").inc()
        try:
            self.producer.flush(10)  # abort purges unsent messages (see BROKER.md)
            self.producer.abort_transaction(30)
        except Exception as exc:
            log.warning("abort failed", extra={"error": str(exc)})
        outbox.keep_only(self.assigned)
        self.outbox = outbox if outbox.records else None

    def _idle(self) -> None:
        if not self.probe.check(self.consumer):
            self.service.set_ready(False, "broker unreachable (metadata request timed out)")
        else:
            self.service.set_ready(bool(self.assigned), "assigned" if self.assigned else "no partitions assigned")
        if self._checkpoint_due():
            self.checkpoint()
        if self.progress.due():
            self._write_progress()
            export_lag(self.consumer, self.role, self.name)

    def snapshot(self) -> dict:
        snap = self.evaluator.snapshot()
        for task, heads in snap.items():
            for window, values in heads.get("main", {}).items():
                for metric, value in values.items():
                    m.TEACHER_METRIC.labels(self.name, task, metric, window).set(value)
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

    def _write_progress(self) -> None:
        self.progress.write(self.snapshot(), self.examples_labeled)

    def close(self) -> None:
        try:
            if self.outbox is not None:
                # Trained on batches whose labels are not out: a checkpoint would skip them.
                log.warning("stopping with labels unpublished: they are labelled again after the restart")
            elif self.batches_since_ckpt:
                self.checkpoint()
            self.progress.write_summary(self.snapshot())
        finally:
            self.consumer.close()
            try:
                self.producer.flush(10)
            except KafkaException as exc:  # a fenced producer: the error that stopped us says why
                log.warning("producer flush failed on close", extra={"error": str(exc)})


def run_teacher(config: Config) -> None:
    """Run until SIGTERM/SIGINT: the entry point of ``distill teacher``."""
    worker = TeacherWorker(config)
    worker.service.install_signal_handlers()
    worker.service.start_http()
    worker.start()
    worker.service.run(worker.step, worker.close)
