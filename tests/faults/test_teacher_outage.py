"""The teacher stopped for a while: students keep training on hard labels (missing counted,
label coverage drops) and distil again once it is back (joined grows)."""

from __future__ import annotations

import pytest

from tests.faults.conftest import check_books, summary
from tests.integration.workers import produce_synthetic, write_config

# label_wait_s: long enough for a label behind a fetch wait (100 ms; librdkafka's own is 500 ms)
STUDENT = {"name": "s1", "label_wait_s": 1.0, "checkpoint": {"every_batches": 5, "every_seconds": 1.0}}


@pytest.mark.both_brokers  # the teacher's group leaves and rejoins; its transactions restart
def test_students_train_on_hard_labels_while_the_teacher_is_away(make_config, workers, tmp_path):
    config = make_config(topics={"partitions": 2}, students=[STUDENT])
    path = write_config(config, tmp_path / "config.yaml")
    r1 = produce_synthetic(config, 8 * 128, batch_size=128)
    teacher = workers(["teacher", "--config", str(path)], tmp_path / "teacher.log")
    teacher.wait_ready()  # round 1 is labelled: the student must not outrun a teacher still starting
    student = workers(["student", "--name", "s1", "--config", str(path)], tmp_path / "student.log")
    joined = lambda: student.metric("distill_student_join_total", outcome="joined")  # noqa: E731
    missing = lambda: student.metric("distill_student_join_total", outcome="missing")  # noqa: E731
    trained = lambda: student.metric("distill_student_batches_trained_total")  # noqa: E731
    student.wait(lambda: trained() >= r1["batches"], "round 1", 60)
    j1, m1 = joined(), missing()
    assert j1 >= r1["batches"] - 2, f"teacher up, yet only {j1} of {r1['batches']} joined ({m1} missing)"
    coverage_up = student.metric("distill_student_label_coverage")

    assert teacher.stop() == 0, teacher.tail()
    r2 = produce_synthetic(config, 8 * 128, batch_size=128)
    student.wait(lambda: trained() >= r1["batches"] + r2["batches"], "round 2 without the teacher", 60)
    assert missing() - m1 == r2["batches"] and joined() == j1, (joined(), missing())
    coverage_down = student.metric("distill_student_label_coverage")
    assert coverage_down < coverage_up, (coverage_up, coverage_down)
    assert student.get("/readyz")[0] == 200  # a student without a teacher is still ready

    teacher = workers(["teacher", "--config", str(path)], tmp_path / "teacher.log")
    teacher.wait_ready()
    r3 = produce_synthetic(config, 8 * 128, batch_size=128)
    total = r1["batches"] + r2["batches"] + r3["batches"]
    student.wait(lambda: trained() >= total and joined() - j1 >= r3["batches"] - 2, "round 3 distilled again", 60)
    assert student.metric("distill_student_label_coverage") > coverage_down
    assert teacher.stop() == 0, teacher.tail()
    assert student.stop() == 0, student.tail()
    check_books(config, ["s1"], r1["examples"] + r2["examples"] + r3["examples"], "teacher away for round 2")
    s = summary(config, "s1")
    assert s["late"] >= r2["batches"] - 2, s  # round 2's labels came after training: dropped as late
