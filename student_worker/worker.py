"""The student's hot path: join examples with labels -> score -> train -> checkpoint -> commit.

One consumer reads both topics (range assignment keeps partition p of both together). Per
partition a ``PartitionJoin`` merges the streams by batch id. Each ready batch is scored before
it is trained on (progressive validation), for the serving head, the aux head and the teacher.

Commit order (exactly-once training): train -> checkpoint (model, optimizer, per-partition
next offsets of both topics, counts; temp file, fsync, rename) -> commit those offsets to
Kafka. On start and on assignment the checkpoint's offsets win over the group's, so a SIGKILL
anywhere replays exactly what the last durable checkpoint had not yet trained.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

import numpy as np

from distill.core import metrics as m
from distill.core.checkpoint import Checkpointer
from distill.core.config import Config
from distill.core.dead_letters import DeadLetters
from distill.core.exceptions import DecodeError
from distill.core.kafka import check_partitions, partitions_at, wait_for_broker
from distill.core.layout import check_layout
from distill.core.service import Service
from distill.core.worker import Worker, run_worker
from distill.learn.evaluation import ProgressiveEvaluator
from distill.learn.export import ServingGraphs, export_serving_model
from distill.learn.gate import TeacherGate
from distill.learn.models import resolve_device, weights_finite
from distill.learn.step import Learner, Objective, Scored
from student_worker.join import PartitionJoin, Ready

log = logging.getLogger(__name__)


@dataclass
class Trained:
    """One trained batch: its hard labels, the teacher's labels if joined, the step's scores."""

    labels: np.ndarray
    teacher: np.ndarray | None
    scored: Scored | None  # None for a null student


class StudentWorker(Worker):
    role = "student"
    cooperative = False  # range assignment: partition p of both topics stays together

    def __init__(self, config: Config, name: str, service: Service | None = None):
        self.sc = sc = config.student(name)
        super().__init__(config, name, port=sc.metrics_port, service=service)
        self.device = resolve_device(sc.device)
        # model.kind "null" (transport benchmark): join, count, checkpoint and commit only.
        self.null = sc.model.kind == "null"
        objective = Objective.student(config, sc)
        self.distilled = objective.distilled
        # The teacher-free student the promotion rule compares with (None: promote, see docs/serving.md).
        self.baseline = next((s.name for s in config.students if s.mode == "none"), None)
        self.features = config.features.subset(sc.features)
        self.learner = Learner.build(config, sc.model, objective, self.device, self.features)
        self.model, self.optimizer = self.learner.model, self.learner.optimizer
        self.gate = TeacherGate.of(sc, self.distilled, self.kinds)
        self.checkpointer = Checkpointer(config.checkpoint_dir(self.role, name), sc.checkpoint.keep)
        self.graphs = ServingGraphs()  # traced at the first export, refilled at the next ones
        self.evaluator = ProgressiveEvaluator(self.task_names, self.kinds)
        state = self.restore(self.checkpointer, self.learner)  # {} on a fresh start
        self.version: int = state.get("version", 0)
        self.evaluator.load_state_dict(state.get("evaluator", {}))
        self.gate.load_state_dict(state.get("gate", {}))
        self.joins: dict[int, PartitionJoin] = {}
        # checkpointed per partition: examples / labels_resume / labels_seen
        self.offsets: dict[int, dict[str, int]] = {int(p): dict(o) for p, o in state.get("offsets", {}).items()}
        self.label_position: dict[int, int] = {}  # next label offset read, per partition
        # Where the in-memory model stands on partitions handed back without a checkpoint
        # (a failed write, a lost assignment): used if they come back to this process.
        self.live_offsets: dict[int, dict[str, int]] = {}
        self.counts = {
            "examples_trained": 0,
            "batches_trained": 0,
            "joined": 0,
            "missing": 0,
            "late": 0,
            "duplicate": 0,
            **state.get("counts", {}),
        }
        # for tests and audits (checkpointed)
        self.trained_batch_ids: deque[str] = deque(state.get("trained_batch_ids", []), maxlen=100_000)
        self.batches_since_ckpt = 0
        self.last_ckpt = time.monotonic()
        self.recent_outcomes: deque[bool] = deque(maxlen=200)
        self.paused: set[tuple[str, int]] = set()
        self.teacher_seen_at = float("-inf")  # when any label last arrived
        self._layout_ok: tuple[list[str], list[str], list[str]] | None = None
        # observed per batch: looked up once
        self._label_delay = m.STUDENT_LABEL_DELAY.labels(name)
        self._label_staleness = m.STUDENT_LABEL_STALENESS.labels(name)
        self._children: dict[tuple, Any] = {}  # the per-step metrics' labelled children (see _metric)
        for counter in [m.STUDENT_NAN.labels(name), m.STUDENT_CKPT_FAILURES.labels(name)] + [
            m.STUDENT_JOIN.labels(name, o) for o in ("joined", "missing", "late", "duplicate")
        ]:
            counter.inc(0)  # exported at 0 from the start, so increase() alerts see the first one

    # -- checkpoints ---------------------------------------------------------------------------
    def _current_offsets(self) -> dict[int, dict[str, int]]:
        offsets = {p: dict(o) for p, o in self.offsets.items()}
        offsets.update({p: dict(o) for p, o in self.live_offsets.items()})
        for p, join in self.joins.items():
            seen = self.label_position.get(p, offsets.get(p, {}).get("labels_seen", 0))
            offsets[p] = {
                # pending (untrained) examples are replayed after a restart
                "examples": join.examples[0].offset if join.examples else join.next_offset,
                "labels_resume": join.label_resume_offset(seen),
                "labels_seen": seen,
            }
        return offsets

    def checkpoint(self) -> bool:
        """Write a durable checkpoint, export the serving model, then commit. False on failure."""
        if not weights_finite(self.model):
            log.error("weights are not finite: checkpoint skipped (the last good one stays)")
            m.STUDENT_NAN.labels(self.name).inc()
            return False
        started = time.perf_counter()
        offsets = self._current_offsets()
        version = self.version + 1
        try:
            self.checkpointer.save(
                version,
                {
                    "version": version,
                    **self.learner.state_dict(),
                    "offsets": offsets,
                    "counts": dict(self.counts),
                    "trained_batch_ids": list(self.trained_batch_ids),
                    "evaluator": self.evaluator.state_dict(),
                    "gate": self.gate.state_dict(),
                },
            )
            exported = export_serving_model(
                self.model,
                self.features,
                self.config.tasks,
                self.sc.model,
                self.config.model_dir(self.name),  # a str: an s3:// URL must not go through Path
                version,
                export=self.sc.export,
                metrics=self.evaluator.snapshot(),
                compared_tasks=[self.task_names[i] for i in self.distilled] or None,
                baseline=self.baseline,
                graphs=self.graphs,
            )
        except OSError as exc:
            # Nothing is committed past the last durable checkpoint; retried at the next one.
            m.STUDENT_CKPT_FAILURES.labels(self.name).inc()
            log.error("checkpoint failed; offsets stay at the last durable checkpoint", extra={"error": str(exc)})
            self.last_ckpt = time.monotonic()
            return False
        self.version = version
        self.offsets = offsets
        self.live_offsets.clear()
        self.batches_since_ckpt = 0
        self.last_ckpt = time.monotonic()
        m.STUDENT_CKPT_AGE.labels(self.name).set(time.time())
        m.STUDENT_CKPT_SECONDS.labels(self.name).observe(time.perf_counter() - started)
        m.STUDENT_EXPORT_VERSION.labels(self.name).set(version)
        m.STUDENT_PROMOTED_VERSION.labels(self.name).set(exported.promoted or 0)
        m.STUDENT_EXPORT_VERSIONS.labels(self.name).set(len(exported.kept))
        m.STUDENT_EXPORT_BYTES.labels(self.name).set(exported.bytes)
        if exported.decision is not None and not exported.decision.promote:
            m.STUDENT_PROMOTIONS_HELD.labels(self.name).inc()
            log.warning("export not promoted", extra={"version": version, "reason": exported.decision.reason})
        self._commit(offsets)
        return True

    def _commit(self, offsets: dict[int, dict[str, int]]) -> None:
        topics = self.config.topics
        owned = {p: o for p, o in offsets.items() if p in self.joins}
        if not owned:
            return
        tps = partitions_at(topics.examples, {p: o["examples"] for p, o in owned.items()})
        tps += partitions_at(topics.labels, {p: o["labels_resume"] for p, o in owned.items()})
        try:
            self.consumer.commit(offsets=tps, asynchronous=False)
        except Exception as exc:  # the checkpoint is the truth; the group offsets only follow it
            log.warning("offset commit failed (the checkpoint still holds them)", extra={"error": str(exc)})

    def _checkpoint_due(self) -> bool:
        return self.sc.checkpoint.due(self.batches_since_ckpt, time.monotonic() - self.last_ckpt)

    # -- Kafka ---------------------------------------------------------------------------------
    def start(self) -> None:
        admin = self.clients.admin()
        wait_for_broker(admin, seconds=None)  # not ready until it answers; no crash loop
        check_partitions(self.config, admin)
        self.producer = self.clients.producer()
        self.dead_letters = DeadLetters(self.producer, self.codec, self.role, self.name)
        # range assignment: partition p of the examples and of the labels topic go together
        self.consumer = self.clients.consumer(self.sc.group_id, **{"partition.assignment.strategy": "range"})
        self.subscribe([self.config.topics.examples, self.config.topics.labels])

    def on_assign(self, partitions) -> None:
        topics = self.config.topics
        for tp in partitions:
            # The model's own position wins over the group's: in memory if this process has
            # trained past its last checkpoint, else the checkpoint's.
            saved = self.live_offsets.get(tp.partition) or self.offsets.get(tp.partition)
            if saved is not None:
                tp.offset = saved["examples"] if tp.topic == topics.examples else saved["labels_resume"]
            if tp.topic == topics.examples and tp.partition not in self.joins:
                start = saved["examples"] if saved else 0
                self.joins[tp.partition] = PartitionJoin(
                    tp.partition, start, self.sc.label_wait_s, self.sc.max_pending_batches
                )

    def on_revoke(self, partitions) -> None:
        # Hand pending batches back: checkpoint and commit at the first untrained offset, then
        # drop the partitions' state. Whoever gets them next replays them with their labels.
        # A lost assignment too: the model trained on these batches, so its position is kept.
        revoked = {tp.partition for tp in partitions if tp.topic == self.config.topics.examples}
        if revoked and self.batches_since_ckpt:
            self.checkpoint()
        self._drop(revoked)

    def _drop(self, partitions: set[int]) -> None:
        current = self._current_offsets()
        for p in partitions:
            if p in self.joins and self.batches_since_ckpt:
                self.live_offsets[p] = current[p]
            self.joins.pop(p, None)
            self.label_position.pop(p, None)
            self.paused = {(t, q) for t, q in self.paused if q != p}

    # -- the loop ----------------------------------------------------------------------------------
    def step(self) -> bool:
        records = self.poll(64, self.sc.poll_timeout_s)
        now = time.monotonic()
        topics = self.config.topics
        for msg in records:
            p = msg.partition()
            join = self.joins.get(p)
            if join is None:
                continue  # revoked meanwhile
            if msg.topic() == topics.examples:
                self._on_examples(msg, join, now)
            else:
                self._on_label(msg, join, now)
        if records:
            self.service.set_ready(bool(self.joins), "assigned")
        else:
            self.check_broker(bool(self.joins), "assigned" if self.joins else "no partitions assigned")
        started = time.perf_counter()
        # every partition's ready batches in one pass: the metrics are updated once per step
        ready = [r for join in self.joins.values() for r in join.pop_ready(now, self.teacher_seen_at)]
        trained = self._train_ready(ready)
        if trained:
            elapsed = time.perf_counter() - started
            self.busy_s += elapsed
            self._metric(m.STUDENT_THROUGHPUT).set(self.throughput.update(trained, elapsed))
        self._backpressure()
        if self._checkpoint_due():
            self.checkpoint()
        if self.progress.due(self.counts["examples_trained"]):
            self.write_progress()
        return True

    def _on_examples(self, msg, join: PartitionJoin, now: float) -> None:
        try:
            batch = self.codec.decode_examples(msg.value(), msg.headers())
            self._check_layout(batch)
        except DecodeError as exc:
            self.dead_letters.send(msg, exc)
            join.skip(msg.offset())
            return
        join.add_examples(batch, msg.offset(), now)

    def _check_layout(self, batch) -> None:
        """``check_layout`` once per distinct layout: every batch of a stream carries the same."""
        names = (batch.categorical_names, batch.dense_names, batch.task_names)
        if names != self._layout_ok:
            check_layout(batch, self.config)
            self._layout_ok = names

    def _on_label(self, msg, join: PartitionJoin, now: float) -> None:
        p = msg.partition()
        self.teacher_seen_at = now
        replay = msg.offset() < self.offsets.get(p, {}).get("labels_seen", -1)
        self.label_position[p] = msg.offset() + 1
        try:
            label = self.codec.decode_labels(msg.value(), msg.headers())
        except DecodeError as exc:
            self.dead_letters.send(msg, exc)
            return
        outcome = join.add_label(label, msg.offset(), now, message=msg)
        if outcome == "mismatch":
            if not replay:  # dead-lettered before the restart
                self.dead_letters.send(
                    msg,
                    DecodeError(
                        "id_mismatch",
                        f"label batch {label.batch_id} does not match its example batch (another size or id checksum)",
                    ),
                )
            return
        if outcome is not None and not replay:  # a replay after restart was counted before
            self.counts[outcome] += 1
            self._metric(m.STUDENT_JOIN, outcome).inc()

    def _train_ready(self, ready: list[Ready]) -> int:
        """Train on ready batches in offset order, one optimizer step per example batch; the
        progressive metrics and counters are updated once for all of them."""
        if not ready:
            return 0
        trained: list[Trained] = []
        for r in ready:
            if r.label is not None and not r.label.matched and not self._label_matches(r):
                r.label = None
            trained.append(self._train_one(r))
        self._account(ready, trained)
        return sum(r.examples.batch.size for r in ready)

    def _label_matches(self, r: Ready) -> bool:
        assert r.label is not None
        label, batch = r.label.batch, r.examples.batch
        if label.size == batch.size and label.example_ids_checksum == batch.example_ids_checksum:
            return True
        if r.label.message is not None:
            self.dead_letters.send(
                r.label.message,
                DecodeError(
                    "id_mismatch",
                    f"label batch {label.batch_id} does not match its example batch "
                    f"({label.size} vs {batch.size} examples or another id checksum)",
                ),
            )
        return False

    def _train_one(self, r: Ready) -> Trained:
        """One learning step on one batch, with the gate's soft weights of the moment."""
        batch = r.examples.batch
        teacher = r.label.batch.logits if r.label is not None else None
        if self.null:  # transport benchmark: no forward pass, no training
            return Trained(batch.labels, teacher, None)
        scored = self.learner.step(self.learner.tensors(batch), teacher, self.sc.soft_weight, self.gate.fractions())
        assert scored is not None
        if not scored.stepped:
            m.STUDENT_NAN.labels(self.name).inc()
            log.warning("non-finite loss: training step skipped", extra={"batch_id": batch.batch_id})
        if teacher is not None:
            self.gate.update(scored.main, teacher, batch.labels)
        return Trained(batch.labels, teacher, scored)

    def _account(self, ready: list[Ready], trained: list[Trained]) -> None:
        labels = np.concatenate([t.labels for t in trained])
        joined = [t for t in trained if t.teacher is not None]
        scored = [t.scored for t in trained if t.scored is not None]
        if scored:  # a null student has no outputs to score
            self.evaluator.update("main", np.concatenate([s.main for s in scored]), labels)
            aux = [s.aux for s in scored if s.aux is not None]
            if aux:
                self.evaluator.update("aux", np.concatenate(aux), labels, self.distilled)
            if joined:
                self.evaluator.update(
                    "teacher", np.concatenate([t.teacher for t in joined]), np.concatenate([t.labels for t in joined])
                )
            for (i, head), value in scored[-1].losses.items():
                self._metric(m.STUDENT_LOSS, self.task_names[i], head).set(value.item())
        if self.sc.mode != "none":
            for j, weight, lead in zip(self.distilled, self.gate.weights(), self.gate.leads(), strict=True):
                self._metric(m.STUDENT_SOFT_WEIGHT, self.task_names[j]).set(weight)
                self._metric(m.STUDENT_TEACHER_LEAD, self.task_names[j]).set(lead)
        for r in ready:
            has_label = r.label is not None
            self.trained_batch_ids.append(r.examples.batch.batch_id)
            self.recent_outcomes.append(has_label)
            if has_label:
                self._label_delay.observe(max(0.0, r.label.arrived - r.examples.arrived))
                label = r.label.batch  # how far its checkpoint was behind the batch (0 from one teacher)
                self._label_staleness.observe((label.source_offset - label.watermark) * label.size)
        n_joined = len(joined)
        n_missing = len(ready) - n_joined
        n = int(labels.shape[0])
        self.counts["joined"] += n_joined
        self.counts["missing"] += n_missing
        self.counts["examples_trained"] += n
        self.counts["batches_trained"] += len(ready)
        self.batches_since_ckpt += len(ready)
        self._metric(m.STUDENT_JOIN, "joined").inc(n_joined)
        self._metric(m.STUDENT_JOIN, "missing").inc(n_missing)
        self._metric(m.STUDENT_EXAMPLES).inc(n)
        self._metric(m.STUDENT_BATCHES).inc(len(ready))
        self._metric(m.STUDENT_COVERAGE).set(sum(self.recent_outcomes) / len(self.recent_outcomes))

    def _backpressure(self) -> None:
        """Pause a topic's partition whose side of the join is full; resume when it drains."""
        topics = self.config.topics
        for p, join in self.joins.items():
            for topic, full, empty_enough in (
                (topics.examples, join.examples_full, len(join.examples) < join.max_pending // 2),
                (topics.labels, join.labels_full, len(join.labels) < join.max_pending // 2),
            ):
                key = (topic, p)
                if full and key not in self.paused:
                    self.consumer.pause(partitions_at(topic, {p: 0}))
                    self.paused.add(key)
                elif key in self.paused and empty_enough:
                    self.consumer.resume(partitions_at(topic, {p: 0}))
                    self.paused.discard(key)
        self._metric(m.STUDENT_PENDING).set(sum(len(j.examples) for j in self.joins.values()))
        for topic in (topics.examples, topics.labels):
            self._metric(m.STUDENT_PAUSED, topic).set(sum(1 for t, _ in self.paused if t == topic))

    def _metric(self, metric: Any, *labels: str) -> Any:
        """``metric.labels(self.name, *labels)``, looked up once: the hot path sets a dozen a step."""
        child = self._children.get((metric, labels))
        if child is None:
            child = self._children[(metric, labels)] = metric.labels(self.name, *labels)
        return child

    def progress_count(self) -> int:
        return self.counts["examples_trained"]

    def snapshot(self) -> dict:
        snap = self.evaluator.snapshot()
        for task, head, metric, window, value in self.evaluator.values(snap):
            self._metric(m.STUDENT_METRIC, task, head, metric, window).set(value)
        return {
            "role": self.role,
            "name": self.name,
            "mode": self.sc.mode,
            "version": self.version,
            "params": self.model.param_count(serving_only=True),
            "flops_per_example": self.model.flops_per_example,
            **self.counts,
            "unique_batches_trained": len(set(self.trained_batch_ids)),
            "busy_s": self.busy_s,
            "examples_per_s": self.counts["examples_trained"] / self.busy_s if self.busy_s else 0.0,
            "coverage": (sum(self.recent_outcomes) / len(self.recent_outcomes)) if self.recent_outcomes else None,
            "pending": sum(len(j.examples) for j in self.joins.values()),
            "features": self.features.categorical_names + list(self.features.dense),
            "gate": self._gate_snapshot(),
            "metrics": snap,
        }

    def _gate_snapshot(self) -> dict:
        """Per distilled task: the labels' smoothed lead over the serving head, and the soft
        weight in effect (the configured one when the gate is off)."""
        if self.sc.mode == "none":
            return {}
        return {
            self.task_names[i]: {"lead": lead, "soft_weight": w, "enabled": self.sc.gate.enabled}
            for i, lead, w in zip(self.distilled, self.gate.leads(), self.gate.weights(), strict=True)
        }

    def finish(self) -> None:
        # Pending batches are not trained here: their offsets stay uncommitted and are
        # replayed on the next start (with their labels, which are re-read too).
        if self.batches_since_ckpt or self.version == 0:
            self.checkpoint()


def run_student(config: Config, name: str) -> None:
    """Run until SIGTERM/SIGINT: the entry point of ``distill student --name NAME``."""
    run_worker(StudentWorker(config, name))
