"""The teacher's trainer (``teacher.role = "trainer"``): train, publish checkpoints, bound the lead.

It reads the examples topic and trains the teacher; it labels nothing. Under torchrun each
rank reads a fixed share of the partitions (p % world == rank, assigned, not a consumer group)
and every step is collective: each rank contributes at most one example batch, the gradients
are all-reduced weighted by batch size, and every rank takes the same optimizer step, so the
weights stay identical. One process (no torchrun) is the same code with no-op collectives.

Every ``publish_every_batches`` batches or ``publish_every_seconds`` (and earlier when the
labels' staleness bound asks for it) rank 0:
  1. snapshots the weights; a publisher thread writes them to the model store (atomic,
     sha256) and announces version, URI, checksum and watermark on the checkpoints topic
     (``teacher_worker.publisher``);
  2. when ``teacher.checkpoint`` says one is due (by default every 30 s), and on stop, also
     checkpoints its own state (weights, optimizer, per-partition trained-through offsets).
Publishes come every few batches; a full checkpoint at each (21 MB with the optimizer) took
most of the trainer's time. A restart resumes from the last checkpoint. The store may hold
versions published after it, with weights that are gone: the restored weights are published
again under a version past the store's newest, so a version number never names two models.
Rank 0 also reads the labelers' committed offsets: while its newest version is
``max_lead_versions`` ahead of the oldest one they may still need, every rank pauses, so an
out-of-sample checkpoint always exists; store files no labeler can need any more are deleted.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections import deque

import torch
from confluent_kafka import OFFSET_BEGINNING, KafkaException, TopicPartition

from distill.core import metrics as m
from distill.core.checkpoint import Checkpointer
from distill.core.config import Config
from distill.core.exceptions import CheckpointError, DecodeError
from distill.core.kafka import (
    ensure_topics,
    partition_count,
)
from distill.core.layout import check_layout
from distill.core.model_store import ModelStore
from distill.core.service import Service, configure_logging
from distill.core.wire import CheckpointAnnouncement, ExampleBatch
from distill.core.worker import Worker, run_worker
from distill.learn.evaluation import ProgressiveEvaluator
from distill.learn.models import weights_finite
from distill.learn.step import Learner, Objective
from teacher_worker.out_of_sample import lead_batches, oldest_needed
from teacher_worker.publisher import WeightsPublisher
from teacher_worker.ranks import Ranks

log = logging.getLogger(__name__)

# What a published version trained through: per partition the next offset to train and the
# Kafka time of the last batch trained, and the examples trained in all.
Published = tuple[dict[int, int], dict[int, int], int]

# Fields of the per-step control all-reduce (a sum over the ranks).
_EXAMPLES, _BATCHES, _STOP, _PUBLISH, _PAUSE = range(5)


def weights_digest(model: torch.nn.Module) -> str:
    """sha256 of every parameter's bytes: equal on every rank when data parallelism works."""
    h = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


class Trainer(Worker):
    role = "teacher"

    def __init__(self, config: Config, ranks: Ranks, device: torch.device, service: Service | None = None):
        tc = config.teacher
        name = tc.name if ranks.world == 1 else f"{tc.name}.rank{ranks.rank}"
        port = tc.metrics_port + ranks.rank if tc.metrics_port else 0
        super().__init__(config, name, port=port, service=service)
        self.pool = tc.pool
        self.ranks = ranks
        self.device = device
        # The same seed on every rank: identical initial weights. Collective steps with ranks.
        reduce = ranks.all_reduce if ranks.world > 1 else None
        self.learner = Learner.build(config, tc.model, Objective.teacher(config), device, all_reduce=reduce)
        self.model, self.optimizer = self.learner.model, self.learner.optimizer
        self.checkpointer = Checkpointer(config.checkpoint_dir(self.role, tc.name), tc.checkpoint.keep)
        self.store = ModelStore(config.model_store())
        self.publisher = WeightsPublisher(self.store, self.name)
        self.evaluator = ProgressiveEvaluator(self.task_names, self.kinds)
        self.version = 0
        self.trained_through: dict[int, int] = {}  # this rank's partitions -> next offset to train
        self.trained_time: dict[int, int] = {}  # partition -> Kafka timestamp of the last batch trained
        # Rank 0: (version, watermark) of the published checkpoints a labeler may still need.
        self.history: list[tuple[int, dict[int, int]]] = []
        self.oldest_kept = 0
        # Rank 0: what the last publish trained through (watermark, Kafka times, examples), for a
        # checkpoint of the same weights on stop while the weights have not moved since; and the
        # version of the last checkpoint.
        self.last_published: Published = ({}, {}, 0)
        self.trained_since_publish = False
        self.checkpointed = 0
        self.batches_since_checkpoint = 0
        self.last_checkpoint = time.monotonic()
        self.examples_trained = 0  # by this rank
        self.batches_since_publish = 0  # by all ranks: the same number on each
        self.last_publish = time.monotonic()
        self.buffer: deque[tuple[object, ExampleBatch | None]] = deque()  # None: undecodable
        self.paused = False  # by the lead bound (every rank)
        self.idle_everywhere = True  # no rank had a batch at the last step
        self.pause_wanted = False  # rank 0's latest decision
        # This rank's partitions -> trained-through offset of the last publish, and the size of
        # the last batch trained: together they keep labels within max_label_staleness_examples.
        self.published_through: dict[int, int] = {}
        self.batch_size = 0
        self.last_lead_check = float("-inf")
        self.partitions: list[int] = []
        m.TEACHER_NAN.labels(self.name).inc(0)
        m.TEACHER_PAUSED.labels(self.name).set(0)
        self._restore()

    # -- state -------------------------------------------------------------------------------
    def _restore(self) -> None:
        # Rank 0 reads its checkpoint and hands it to the others: no shared disk is needed.
        found = self.checkpointer.load_latest() if self.ranks.leader else None
        found = self.ranks.broadcast(found)
        if found is None:
            log.info("no checkpoint: starting a fresh teacher")
            return
        _, state = found
        self.learner.load_state_dict(state)
        self.version = state["version"]
        self.trained_through = {int(p): int(o) for p, o in state["trained_through"].items()}
        self.trained_time = {int(p): int(t) for p, t in state.get("trained_time", {}).items()}
        self.history = [(int(v), {int(p): int(o) for p, o in wm.items()}) for v, wm in state.get("history", [])]
        if not self.history:  # a single-process teacher's checkpoint: it trained through its offsets
            self.history = [(self.version, dict(self.trained_through))]
        self.oldest_kept = state.get("oldest_kept", 0)
        self.examples_trained = state.get("examples_trained", 0) if self.ranks.leader else 0
        self.last_published = (dict(self.history[-1][1]), dict(self.trained_time), state.get("examples_trained", 0))
        self.checkpointed = self.version
        log.info("restored checkpoint", extra={"version": self.version, "offsets": self.trained_through})

    def _checkpoint(self, watermark: dict[int, int], times: dict[int, int], examples: int) -> None:
        """The current weights and optimizer, which trained through ``watermark``."""
        self.checkpointed = self.version
        self.batches_since_checkpoint = 0
        self.last_checkpoint = time.monotonic()
        self.checkpointer.save(
            self.version,
            {
                "version": self.version,
                **self.learner.state_dict(),
                "trained_through": watermark,
                "trained_time": times,
                "history": self.history,
                "oldest_kept": self.oldest_kept,
                "examples_trained": examples,
                "world_size": self.ranks.world,
            },
        )

    # -- Kafka -------------------------------------------------------------------------------
    def start(self) -> None:
        ensure_topics(self.config, self.clients.admin(), seconds=None)
        count = partition_count(self.clients.admin(), self.config.topics.examples) or 0
        self.partitions = [p for p in range(count) if p % self.ranks.world == self.ranks.rank]
        self.all_partitions = list(range(count))
        self.consumer = self.clients.consumer(f"{self.config.teacher.group_id}.trainer")
        # The checkpoint's offsets: this rank's share, whatever the world size was before.
        self.consumer.assign(
            [
                TopicPartition(self.config.topics.examples, p, self.trained_through.get(p, OFFSET_BEGINNING))
                for p in self.partitions
            ]
        )
        self.trained_through = {p: o for p, o in self.trained_through.items() if p in self.partitions}
        # What the last published checkpoint trained through here (nothing on a fresh start).
        published = self.history[-1][1] if self.history else {}
        self.published_through = {p: o for p, o in published.items() if p in self.partitions}
        if self.ranks.leader:
            self.producer = self.clients.producer()
            # Never joins the labelers' group: only reads its committed offsets.
            self.lead_reader = self.clients.consumer(self.pool.labeler_group_id)
            self._announce_current()
        self.version = self.ranks.broadcast(self.version)  # rank 0 may have numbered past the store's newest
        log.info("partitions assigned", extra={"partitions": self.partitions, "rank": self.ranks.rank})
        self.service.set_ready(True, f"training partitions {self.partitions}")

    def _announce_current(self) -> None:
        """On start: make sure the current weights are in the store and announced (version 0,
        the untrained teacher, on a fresh start; after a restart the checkpoint's weights)."""
        if not self.history:  # a fresh teacher
            stale = self.store.versions()
            if stale:
                raise CheckpointError(
                    f"the model store {self.store.dir} holds versions {stale[0]}..{stale[-1]} but the trainer has no "
                    f"checkpoint in {self.checkpointer.dir}: restore the trainer's checkpoints, or start a new teacher "
                    f"with an empty store and a new {self.config.topics.checkpoints!r} topic (labelers keep what they "
                    "read there)"
                )
            self.history.append((self.version, {}))
            self._checkpoint({}, {}, 0)  # first, so that a crash from here on restarts from version 0
        newest = max(self.store.versions(), default=self.version)
        if newest > self.version:
            # Published after the checkpoint, before a restart: those weights are gone. The
            # checkpoint's go out again as a new version (labelers take only newer ones).
            log.warning(
                "the store holds versions newer than the checkpoint: publishing its weights as a new version",
                extra={"checkpoint": self.version, "store_newest": newest, "version": newest + 1},
            )
            self.version = newest + 1
            self.history.append((self.version, self.last_published[0]))
        described = self.store.describe(self.version)
        if described:  # in the store already: announced again (labelers ignore a version they know)
            self._announce(self.version, *described, self.last_published)
            self.publisher.announced = self.version
        else:
            self.publisher.publish(self.version, self.model.state_dict(), self._announcer(self.last_published))
        self.publisher.wait()  # a store that refuses writes stops the start
        m.TEACHER_VERSION.labels(self.name).set(self.version)

    def _announcer(self, published: Published):
        """The announcement of the current version, sent by the publisher once it is written."""
        version, oldest_kept = self.version, self.oldest_kept
        return lambda uri, sha: self._announce(version, uri, sha, published, oldest_kept)

    def _announce(self, version: int, uri: str, sha: str, published: Published, oldest_kept: int | None = None) -> None:
        watermark, times, examples = published
        announcement = CheckpointAnnouncement(
            version=version,
            uri=uri,
            sha256=sha,
            watermark=watermark,
            watermark_time_ms=times,
            oldest_kept=self.oldest_kept if oldest_kept is None else oldest_kept,
            examples_trained=examples,
            trainer=self.config.teacher.name,
            world_size=self.ranks.world,
        )
        value, headers = self.codec.encode_announcement(announcement)
        self.producer.produce(self.config.topics.checkpoints, value=value, headers=headers, partition=0)
        if self.producer.flush(30) > 0:
            raise KafkaException(f"checkpoint announcement {version} not delivered within 30 s")
        log.info("announced checkpoint", extra={"version": version, "uri": uri})

    # -- the loop ------------------------------------------------------------------------------
    def step(self) -> bool:
        """One collective step; False once any rank was asked to stop (all then stop together)."""
        self._refill()
        while self.buffer and self.buffer[0][1] is None:  # a bad batch: skipped, in offset order
            msg, _ = self.buffer.popleft()
            self.trained_through[msg.partition()] = msg.offset() + 1
        local = self.buffer[0][1] if self.buffer else None
        ctl = torch.zeros(5, dtype=torch.float64, device=self.device)
        ctl[_EXAMPLES] = local.size if local is not None else 0
        ctl[_BATCHES] = 1 if local is not None else 0
        ctl[_STOP] = 1 if self.service.stopping.is_set() else 0
        ctl[_PUBLISH] = 1 if self._fresh_labels_due() else 0  # any rank may ask for a publish
        if self.ranks.leader:
            ctl[_PUBLISH] += 1 if self._publish_due() else 0
            ctl[_PAUSE] = 1 if self.pause_wanted else 0
        examples, batches, stop, publish, pause = (int(x) for x in self.ranks.all_reduce(ctl).tolist())
        self.idle_everywhere = batches == 0
        self._set_paused(pause > 0)
        started = time.perf_counter()
        if batches and not self.paused:
            msg, batch = self.buffer.popleft() if local is not None else (None, None)
            self._train_step(batch, examples)
            self.batches_since_publish += batches
            self.batches_since_checkpoint += batches
            self.trained_since_publish = True
            if msg is not None:
                self.trained_through[msg.partition()] = msg.offset() + 1
                self.trained_time[msg.partition()] = msg.timestamp()[1]
            elapsed = time.perf_counter() - started
            self.busy_s += elapsed
            m.TEACHER_STEP_SECONDS.labels(self.name).observe(elapsed)
            m.TEACHER_THROUGHPUT.labels(self.name).set(self.throughput.update(batch.size if batch else 0, elapsed))
        elif self.paused:
            self.publisher.wait()  # nothing to train: the last versions go out meanwhile
            time.sleep(self.config.teacher.poll_timeout_s)
        published = bool(publish or (stop and self.batches_since_publish))
        if published:
            self._publish(final=bool(stop))
        if stop:
            if self.ranks.leader and self.checkpointed < self.version and not self.trained_since_publish:
                self._checkpoint(*self.last_published)  # the weights of the last publish
            return False
        # Right after a publish too, so that the lead never passes the bound between checks.
        if self.ranks.leader and (published or time.monotonic() - self.last_lead_check >= self.pool.lead_check_seconds):
            self._check_lead()
        if self.progress.due(self.examples_trained):
            self.write_progress()
        return True

    def _refill(self) -> None:
        want = self.config.teacher.max_batches_per_step - len(self.buffer)
        if want <= 0 or self.paused:
            return
        # Wait for data only when no rank had any at the last step: a rank whose partitions ran
        # dry must not hold the busy ones up by its poll timeout at every collective step.
        timeout = self.config.teacher.poll_timeout_s if not self.buffer and self.idle_everywhere else 0.0
        msgs = self.poll(want, timeout)
        for msg in msgs:
            try:
                batch = self.codec.decode_examples(msg.value(), msg.headers())
                check_layout(batch, self.config)
            except DecodeError as exc:
                # The labelers dead-letter the same message; the trainer only skips it.
                log.warning("skipping a bad example batch", extra={"reason": exc.reason, "offset": msg.offset()})
                batch = None
            self.buffer.append((msg, batch))
        if not msgs and not self.buffer:
            self.check_broker(True, "idle")
        elif msgs:
            self.service.set_ready(True, "training")

    def _set_paused(self, paused: bool) -> None:
        if paused == self.paused:
            return
        self.paused = paused
        assignment = self.consumer.assignment()
        (self.consumer.pause if paused else self.consumer.resume)(assignment)
        m.TEACHER_PAUSED.labels(self.name).set(1 if paused else 0)
        log.info("waiting for the labelers (lead bound)" if paused else "labelers caught up: training again")

    def _train_step(self, batch: ExampleBatch | None, total_examples: int) -> None:
        # Weighted by batch size, so the summed gradient is the mean over every example.
        tensors = self.learner.tensors(batch) if batch is not None else None
        share = batch.size / total_examples if batch is not None else 0.0
        scored = self.learner.step(tensors, share=share)
        if scored is not None:
            self.evaluator.update("main", scored.main, batch.labels)
            for (i, _head), value in scored.losses.items():
                m.TEACHER_LOSS.labels(self.name, self.task_names[i]).set(value.item())
        if batch is not None:
            self.batch_size = batch.size
        if batch is not None and scored is not None and scored.stepped:
            self.examples_trained += batch.size
            m.TEACHER_TRAINED.labels(self.name).inc(batch.size)
        elif batch is not None:
            m.TEACHER_NAN.labels(self.name).inc()
            log.warning("non-finite gradient: training step skipped on every rank")

    # -- checkpoints and the lead bound ------------------------------------------------------------
    def _publish_due(self) -> bool:
        return self.batches_since_publish > 0 and (
            self.batches_since_publish >= self.pool.publish_every_batches
            or time.monotonic() - self.last_publish >= self.pool.publish_every_seconds
        )

    def _fresh_labels_due(self) -> bool:
        """A partition of this rank has trained half the staleness bound past the last publish.
        Publishing then, a batch the trainer has passed always has an out-of-sample checkpoint
        within half the bound, and labelers waiting ahead of the trainer go on at its pace."""
        half = max(1, self.pool.max_label_staleness_examples // max(1, self.batch_size or 256) // 2)
        return any(o - self.published_through.get(p, 0) >= half for p, o in self.trained_through.items())

    def _publish(self, final: bool = False) -> None:
        """Collective: gather every rank's offsets; rank 0 publishes the weights (written and
        announced on the publisher thread) and checkpoints when one is due or ``final``."""
        shares = self.ranks.gather((dict(self.trained_through), dict(self.trained_time), self.examples_trained))
        self.published_through = dict(self.trained_through)
        self.batches_since_publish = 0
        self.last_publish = time.monotonic()
        if not weights_finite(self.model):  # the same weights on every rank: the same decision
            log.error("weights are not finite: nothing published (the last good checkpoint stays)")
            m.TEACHER_NAN.labels(self.name).inc()
            return
        self.version += 1
        self.trained_since_publish = False
        m.TEACHER_VERSION.labels(self.name).set(self.version)
        if not self.ranks.leader:
            return
        watermark = dict(self.history[-1][1]) if self.history else {}
        times: dict[int, int] = {}
        for offsets, stamps, _ in shares:
            watermark.update(offsets)
            times.update(stamps)
        examples = sum(n for _, _, n in shares)
        self.history.append((self.version, watermark))
        self.last_published = (watermark, times, examples)
        self.publisher.publish(self.version, self.model.state_dict(), self._announcer(self.last_published))
        due = self.config.teacher.checkpoint.due(self.batches_since_checkpoint, time.monotonic() - self.last_checkpoint)
        if final or due:
            self._checkpoint(watermark, times, examples)

    def _check_lead(self) -> None:
        self.last_lead_check = time.monotonic()
        topic = self.config.topics.examples
        try:
            committed = self.lead_reader.committed([TopicPartition(topic, p) for p in self.all_partitions], timeout=5)
        except KafkaException as exc:  # keep the last decision; the broker may be back soon
            log.warning("labelers' offsets unavailable", extra={"error": str(exc)})
            return
        positions = {tp.partition: tp.offset for tp in committed if tp.offset >= 0}
        # Versions still being written are not announced: no labeler uses them yet.
        announced = [h for h in self.history if h[0] <= self.publisher.announced]
        needed = oldest_needed(announced, positions, self.all_partitions)
        if needed is None:
            return
        lead = self.version - needed
        self.pause_wanted = lead >= self.pool.max_lead_versions
        m.TEACHER_LEAD_VERSIONS.labels(self.name).set(lead)
        m.TEACHER_LEAD_BATCHES.labels(self.name).set(lead_batches(self.history[-1][1], positions))
        # What no labeler can need any more: forgotten here, deleted from the store.
        self.history = [h for h in self.history if h[0] >= needed]
        self.oldest_kept = needed
        self.store.prune(keep_from=needed)

    # -- reporting -------------------------------------------------------------------------------
    def snapshot(self) -> dict:
        snap = self.evaluator.snapshot()
        m.set_teacher_metrics(self.name, self.evaluator.values(snap))
        return {
            "role": self.role,
            "teacher_role": "trainer",
            "name": self.name,
            "rank": self.ranks.rank,
            "world_size": self.ranks.world,
            "partitions": self.partitions,
            "version": self.version,
            "params": self.model.param_count(),
            "flops_per_example": self.model.flops_per_example,
            "examples_trained": self.examples_trained,
            "busy_s": self.busy_s,
            "examples_per_s": self.examples_trained / self.busy_s if self.busy_s else 0.0,
            "metrics": snap,
        }

    def progress_count(self) -> int:
        return self.examples_trained

    def summary(self) -> dict:
        return {**self.snapshot(), "weights_sha256": weights_digest(self.model)}

    def finish(self) -> None:
        self.publisher.close()  # every publish written and announced (or its error raised)

    def consumers(self) -> list:
        return [*super().consumers(), *([self.lead_reader] if self.ranks.leader else [])]

    def close(self) -> None:
        try:
            super().close()
        finally:
            self.ranks.close()


def run_trainer(config: Config) -> None:
    """Entry point of ``distill teacher --role trainer`` (directly, or once per torchrun rank)."""
    ranks, device = Ranks.from_env(config.teacher)
    name = config.teacher.name if ranks.world == 1 else f"{config.teacher.name}.rank{ranks.rank}"
    configure_logging("teacher", name)
    # Collective: the loop ends when the step says so (every rank at the same step), not
    # when this rank's own stop flag is set.
    run_worker(Trainer(config, ranks, device), collective=True)
