"""``model.kind = "null"`` (the transport benchmark's models) on both brokers: the
teacher publishes one all-zero label batch per example batch without training, and a student
joins and counts everything and commits, without training either."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from confluent_kafka import TopicPartition

from distill.core.kafka import Clients
from student_worker.worker import StudentWorker
from teacher_worker.worker import TeacherWorker
from tests.integration.workers import example_batch_ids, produce_synthetic, read_labels, run_until

NULL = {"kind": "null"}


def _weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _unchanged(model: torch.nn.Module, before: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.both_brokers  # one transaction per step, committed group offsets at the end
def test_null_teacher_labels_every_batch_and_null_student_joins_everything(make_config):
    config = make_config(
        topics={"partitions": 2},
        teacher={"model": NULL},
        students=[{"name": "null", "model": NULL, "label_wait_s": 30}],
    )
    produced = produce_synthetic(config, 3000, batch_size=200)
    batches = produced["batches"]
    assert batches >= 10

    teacher = TeacherWorker(config)
    teacher_before = _weights(teacher.model)
    teacher.start()
    run_until(lambda: teacher.examples_labeled >= 3000, [teacher.step], 60)
    assert teacher.examples_trained == 0  # no training, nothing scored
    assert teacher.evaluator.metrics == {}
    assert _unchanged(teacher.model, teacher_before)
    teacher.close()

    examples = example_batch_ids(config)
    labels = read_labels(config)
    assert sorted(lb.batch_id for _, _, lb in labels) == sorted(examples)  # one per batch
    for partition, _offset, lb in labels:
        assert (partition, lb.source_offset) == examples[lb.batch_id]
        assert lb.logits.shape == (lb.size, 2)
        assert lb.logits.dtype == np.float32 and not lb.logits.any()  # all zero

    student = StudentWorker(config, "null")
    student_before = _weights(student.model)
    student.start()
    run_until(lambda: student.counts["batches_trained"] >= batches, [student.step], 60)
    assert student.counts["joined"] == batches
    assert student.counts["examples_trained"] == 3000
    assert student.counts["missing"] == student.counts["late"] == student.counts["duplicate"] == 0
    assert sorted(student.trained_batch_ids) == sorted(examples)
    assert _unchanged(student.model, student_before)  # no training
    assert student.evaluator.metrics == {}  # nothing scored
    student.close()

    # close() checkpointed and committed: the group's offsets are past every example batch.
    consumer = Clients(config.kafka, "check").consumer(config.student("null").group_id)
    try:
        parts = [TopicPartition(config.topics.examples, p) for p in range(2)]
        committed = consumer.committed(parts, 10)
    finally:
        consumer.close()
    ends = {p: max(o for q, o in examples.values() if q == p) + 1 for p in range(2)}
    assert {tp.partition: tp.offset for tp in committed} == ends
