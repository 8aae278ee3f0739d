"""The teacher's hot path: predict -> publish labels -> commit (one transaction) -> train.

Every label is out-of-sample: the logits are computed before the teacher trains on the batch,
and each LabelBatch carries the watermark (per partition, the example offsets the teacher had
trained through) and the teacher's version.

Order of one step:
  1. consume up to ``max_batches_per_step`` example batches; undecodable ones go to the DLQ;
  2. forward pass without gradients -> one LabelBatch per example batch, to the same partition
     number of the labels topic (batch id, checksum, version, watermark);
  3. the examples offsets go into the same transaction; commit (exactly-once labels on Kafka);
  4. train on the hard labels (a NaN loss skips the step and is counted);
  5. every N batches or T seconds: checkpoint model + optimizer + trained-through offsets.
On restart the checkpoint's offsets win over the group's: batches labelled after the last
checkpoint are labelled again (same batch id, de-duplicated by readers) and trained once.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import torch
from confluent_kafka import KafkaException

from distill import metrics as m
from distill.checkpoint import Checkpointer
from distill.config import Config
from distill.dead_letters import DeadLetters
from distill.evaluation import ProgressiveEvaluator
from distill.exceptions import DecodeError
from distill.kafka import (
    BrokerProbe,
    Clients,
    abort_and_rewind,
    consume_available,
    ensure_topics,
    export_lag,
    fenced,
    fenced_error,
    is_retriable,
    needs_abort,
    partitions_at,
    without_errors,
)
from distill.losses import hard_losses
from distill.models import RankingModel, autocast, batch_tensors, make_optimizer, resolve_device, weights_finite
from distill.progress import ProgressLog
from distill.service import Service
from distill.wire import Codec, ExampleBatch, LabelBatch, ids_checksum

log = logging.getLogger(__name__)


def check_layout(batch: ExampleBatch, config: Config) -> None:
    """The batch must carry the configured columns, in order; else it is a dead letter."""
    want = (config.features.categorical_names, config.features.dense, [t.name for t in config.tasks])
    got = (batch.categorical_names, batch.dense_names, batch.task_names)
    for what, w, g in zip(("categorical", "dense", "task"), want, got, strict=False):
        if list(g) != list(w):
            raise DecodeError("layout_mismatch", f"{what} columns {list(g)} differ from the configured {list(w)}")


class TeacherWorker:
    role = "teacher"

    def __init__(self, config: Config, service: Service | None = None):
        self.config = config
        tc = config.teacher
        self.name = tc.name
        self.service = service or Service(self.role, self.name, port=tc.metrics_port)
        self.device = resolve_device(tc.device)
        torch.manual_seed(tc.model.seed)
        self.model = RankingModel(config.features, config.tasks, tc.model).to(self.device)
        self.optimizer = make_optimizer(self.model, tc.model)
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
        msgs = consume_available(
            self.consumer, self.config.teacher.max_batches_per_step, self.config.teacher.poll_timeout_s
        )
        good: list[tuple[object, ExampleBatch]] = []
        records = without_errors(msgs, lambda reason: self.service.set_ready(False, reason))
        if not records:
            self._idle()
            return True
        started = time.perf_counter()
        self.service.set_ready(bool(self.assigned), "assigned")
        try:
            self._transaction(records, good)
        except Exception as exc:
            if fenced(exc):
                raise fenced_error(f"{self.config.teacher.group_id}.{self.name}", "teacher.name") from None
            if not needs_abort(exc) and not is_retriable(exc):
                raise
            log.warning("transaction failed, aborting and rewinding", extra={"error": str(exc)})
            self._abort_and_rewind(records)
            return True
        if good:  # counted once the transaction has committed (an aborted one is relabelled)
            n = sum(b.size for _, b in good)
            self.examples_labeled += n
            m.TEACHER_EXAMPLES.labels(self.name).inc(n)
            m.TEACHER_LABEL_BATCHES.labels(self.name).inc(len(good))
        if good and not self.null:
            self.evaluator.update("main", *self._scored)
            self._train([b for _, b in good])
        for msg in records:
            self.trained_through[msg.partition()] = msg.offset() + 1
        self.batches_since_ckpt += len(records)
        elapsed = time.perf_counter() - started
        self.busy_s += elapsed
        m.TEACHER_STEP_SECONDS.labels(self.name).observe(elapsed)
        m.TEACHER_THROUGHPUT.labels(self.name).set(self._throughput.update(sum(b.size for _, b in good), elapsed))
        if self._checkpoint_due():
            self.checkpoint()
        if self.progress.due(self.examples_labeled):
            self._write_progress()
        return True

    def _transaction(self, records: list, good: list) -> None:
        self.producer.begin_transaction()
        for msg in records:
            try:
                batch = self.codec.decode_examples(msg.value(), msg.headers())
                check_layout(batch, self.config)
                good.append((msg, batch))
            except DecodeError as exc:
                self.dead_letters.send(msg, exc)
        if good:
            self._publish_labels(good)
        offsets: dict[int, int] = {}
        for msg in records:
            offsets[msg.partition()] = msg.offset() + 1
        self.producer.send_offsets_to_transaction(
            partitions_at(self.config.topics.examples, offsets), self.consumer.consumer_group_metadata(), 30
        )
        self.producer.commit_transaction(60)
        m.TEACHER_TRANSACTIONS.labels(self.name, "commit").inc()

    def _publish_labels(self, good: list[tuple[object, ExampleBatch]]) -> None:
        batches = [b for _, b in good]
        if self.null:  # transport benchmark: no forward pass
            logits = np.zeros((sum(b.size for b in batches), len(self.task_names)), dtype=np.float32)
        else:
            cat, dense, _ = batch_tensors(batches, self.device)
            self.model.eval()
            with torch.no_grad(), autocast(self.device):
                main, _ = self.model(cat, dense)
            logits = main.float().cpu().numpy()
        labels = np.concatenate([b.labels for b in batches])
        self._scored = (logits, labels)  # added to the metrics once the transaction commits
        start = 0
        now_ms = int(time.time() * 1000)
        for msg, batch in good:
            chunk = logits[start : start + batch.size]
            start += batch.size
            p = msg.partition()
            label = LabelBatch(
                batch_id=batch.batch_id,
                example_ids_checksum=ids_checksum(batch.example_ids),
                source_partition=p,
                source_offset=msg.offset(),
                teacher_version=self.version,
                watermark=self.trained_through.get(p, 0),
                task_names=self.task_names,
                logits=chunk,
                produced_at_ms=now_ms,
            )
            value, headers = self.codec.encode_labels(label)
            self.producer.produce(
                self.config.topics.labels, value=value, key=batch.batch_id.encode(), partition=p, headers=headers
            )

    def _train(self, batches: list[ExampleBatch]) -> None:
        # One optimizer step per example batch: grouping speeds up labelling, not learning, so
        # the learning dynamics do not depend on how many batches a step consumed.
        for batch in batches:
            self._train_step(batch)

    def _train_step(self, batch: ExampleBatch) -> None:
        cat, dense, labels = batch_tensors([batch], self.device)
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        with autocast(self.device):
            main, _ = self.model(cat, dense)
        losses = hard_losses(main, labels, self.kinds)
        loss = torch.stack(losses).sum()
        if not torch.isfinite(loss):
            m.TEACHER_NAN.labels(self.name).inc()
            log.warning("non-finite loss: training step skipped", extra={"batch_id": batch.batch_id})
            return
        loss.backward()
        self.optimizer.step()
        self.examples_trained += batch.size
        m.TEACHER_TRAINED.labels(self.name).inc(batch.size)
        for name, value in zip(self.task_names, losses, strict=False):
            m.TEACHER_LOSS.labels(self.name, name).set(value.item())

    def _abort_and_rewind(self, records: list) -> None:
        m.TEACHER_TRANSACTIONS.labels(self.name, "abort").inc()
        abort_and_rewind(self.producer, self.consumer, self.config.topics.examples, records)

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
            if self.batches_since_ckpt:
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
