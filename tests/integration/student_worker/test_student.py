"""Students against the embedded broker and Apache Kafka: the join, duplicates, crashes, several
students."""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import pytest

from distill.core.kafka import Clients
from student_worker.worker import StudentWorker
from teacher_worker.worker import TeacherWorker
from tests.integration.workers import (
    example_batch_ids,
    kill9,
    produce_synthetic,
    read_all,
    run_until,
    spawn,
    stop,
    write_config,
)

STUDENTS = [
    {"name": "aux", "mode": "aux", "label_wait_s": 0.5, "checkpoint": {"every_batches": 5}},
    {"name": "none", "mode": "none", "label_wait_s": 0.5, "checkpoint": {"every_batches": 5}},
]

pytestmark = pytest.mark.both_brokers


def _label_everything(config, batches: int) -> TeacherWorker:
    teacher = TeacherWorker(config)
    teacher.start()
    run_until(lambda: sum(teacher.trained_through.values()) >= batches, [teacher.step], 60)
    return teacher


def _trained_all(student: StudentWorker, batches: int):
    return lambda: student.counts["batches_trained"] >= batches


def test_join_outcomes_with_the_teacher_paused_then_resumed(make_config):
    config = make_config(students=STUDENTS[:1])
    first = produce_synthetic(config, 3000, batch_size=200)["batches"]
    student = StudentWorker(config, "aux")
    student.start()
    # Teacher down: every batch waits label_wait, then trains on hard labels.
    run_until(_trained_all(student, first), [student.step], 60)
    assert student.counts["missing"] == first and student.counts["joined"] == 0
    assert student.snapshot()["coverage"] == 0.0
    # Teacher back: it labels the old batches (late for this student), then the new ones.
    teacher = TeacherWorker(config)
    teacher.start()
    run_until(lambda: student.counts["late"] >= first, [teacher.step, student.step], 60)
    second = produce_synthetic(config, 3000, batch_size=200)["batches"]
    run_until(lambda: student.counts["batches_trained"] >= first + second, [teacher.step, student.step], 60)
    assert student.counts["joined"] == second
    assert student.counts["late"] == first
    assert student.counts["missing"] == first
    assert student.counts["duplicate"] == 0
    teacher.close()
    student.close()


def test_duplicate_labels_are_ignored(make_config):
    config = make_config(students=STUDENTS[:1])
    batches = produce_synthetic(config, 4000, batch_size=250)["batches"]
    _label_everything(config, batches).close()
    # A teacher replay after a crash republishes labels with the same batch ids.
    producer = Clients(config.kafka, "replayer").producer()
    labels = read_all(config, config.topics.labels)
    assert len(labels) == batches
    for msg in labels:
        producer.produce(
            config.topics.labels, value=msg.value(), key=msg.key(), partition=msg.partition(), headers=msg.headers()
        )
    producer.flush(10)
    student = StudentWorker(config, "aux")
    student.start()
    run_until(
        lambda: student.counts["batches_trained"] >= batches and student.counts["duplicate"] >= batches,
        [student.step],
        60,
    )
    assert student.counts["joined"] == batches
    assert student.counts["duplicate"] == batches
    assert student.counts["missing"] == 0
    assert len(set(student.trained_batch_ids)) == len(student.trained_batch_ids) == batches
    student.close()


def test_two_students_with_different_modes_share_one_labels_topic(make_config):
    config = make_config(students=STUDENTS)
    batches = produce_synthetic(config, 5000, batch_size=250)["batches"]
    _label_everything(config, batches).close()
    students = [StudentWorker(config, s["name"]) for s in STUDENTS]
    for s in students:
        s.start()
    run_until(lambda: all(s.counts["batches_trained"] >= batches for s in students), [s.step for s in students], 60)
    for s in students:
        assert s.counts["joined"] == batches, (s.name, s.counts)
        snap = s.snapshot()["metrics"]["click"]
        # both read the same teacher labels on the same batches
        assert snap["teacher"]["cumulative"]["logloss"] is not None
    teacher_scores = [s.snapshot()["metrics"]["click"]["teacher"]["cumulative"]["logloss"] for s in students]
    assert abs(teacher_scores[0] - teacher_scores[1]) < 1e-9
    assert "aux" in students[0].snapshot()["metrics"]["click"]  # the aux head is scored too
    assert "aux" not in students[1].snapshot()["metrics"]["click"]
    for s in students:
        s.close()
    exported = Path(config.model_dir("aux"))
    assert (exported / "LATEST").exists()


def _lines(path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def _wait_started(proc, progress, seen: int, log) -> dict:
    """The first progress line of a new process: written at its first loop step."""
    deadline = time.monotonic() + 60
    while len(_lines(progress)) <= seen:
        assert proc.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, log.read_text()[-2000:]
        time.sleep(0.02)
    return _lines(progress)[seen]


def test_sigkill_at_random_points_trains_each_batch_exactly_once(make_config, tmp_path):
    # A wider student than the default so that a kill lands in the middle of training.
    slow = {**STUDENTS[0], "model": {"hidden": [512, 512], "embedding_dim": 16}}
    config = make_config(students=[slow])
    produced = produce_synthetic(config, 240 * 128, batch_size=128)
    total = produced["batches"]
    _label_everything(config, total).close()
    path = write_config(config, tmp_path / "config.yaml")
    log = tmp_path / "student.log"
    progress = config.progress_dir() / "student-aux.jsonl"
    rng = random.Random(11)  # the kill moments, reported on failure
    delays = [round(rng.uniform(0.3, 1.2), 2) for _ in range(3)]
    resumed_at = []
    for delay in delays:
        proc = spawn(["student", "--name", "aux", "--config", str(path)], log)
        resumed_at.append(_wait_started(proc, progress, len(_lines(progress)), log)["batches_trained"])
        time.sleep(delay)
        kill9(proc)
    proc = spawn(["student", "--name", "aux", "--config", str(path)], log)
    resumed_at.append(_wait_started(proc, progress, len(_lines(progress)), log)["batches_trained"])
    deadline = time.monotonic() + 90
    while _lines(progress)[-1]["batches_trained"] < total and time.monotonic() < deadline:
        time.sleep(0.3)
    assert stop(proc) == 0, log.read_text()[-3000:]
    summary = json.loads((config.progress_dir() / "student-aux.summary.json").read_text())
    context = f"kill delays {delays}, runs resumed at {resumed_at} of {total}: {summary}"
    # every kill left work behind: each run resumed from a checkpoint short of the end
    assert resumed_at[-1] < total and resumed_at == sorted(resumed_at), context
    assert summary["batches_trained"] == total, context
    assert summary["unique_batches_trained"] == total, context
    assert summary["examples_trained"] == produced["examples"], context
    from distill.core.checkpoint import Checkpointer

    _, state = Checkpointer(config.checkpoint_dir("student", "aux")).load_latest()
    assert sorted(state["trained_batch_ids"]) == sorted(example_batch_ids(config)), context
