"""A broker stall longer than the session timeout (SIGSTOP, then SIGCONT): workers go not
ready, retry, and recover without a restart and without training anything twice."""

from __future__ import annotations

import time

from distill.local.broker import EmbeddedBroker
from tests.conftest import TEST_SESSION_TIMEOUT_MS
from tests.faults.conftest import FAST_STUDENT, check_books, summary
from tests.integration.workers import produce_synthetic, write_config

STALL_S = 2 * TEST_SESSION_TIMEOUT_MS / 1000  # well past the session timeout


def test_stall_longer_than_the_session_timeout(make_config, workers, tmp_path):
    with EmbeddedBroker(log_file=tmp_path / "own-broker.log") as broker:
        config = make_config(
            kafka={"bootstrap_servers": broker.bootstrap},
            students=[{"name": "s1", **FAST_STUDENT, "label_wait_s": 30.0}],
        )
        path = write_config(config, tmp_path / "config.yaml")
        total = produce_synthetic(config, 10 * 128, batch_size=128)["examples"]
        teacher = workers(["teacher", "--config", str(path)], tmp_path / "teacher.log")
        student = workers(["student", "--name", "s1", "--config", str(path)], tmp_path / "student.log")
        student.wait(lambda: student.metric("distill_student_examples_trained_total") >= total, "first round", 90)
        teacher.wait_ready()
        student.wait_ready()
        total += produce_synthetic(config, 10 * 128, batch_size=128)["examples"]

        broker.pause()
        seen = {"teacher": set(), "student": set()}
        try:
            until = time.monotonic() + STALL_S
            while time.monotonic() < until:
                for name, w in (("teacher", teacher), ("student", student)):
                    assert w.alive(), f"{name} exited during the stall:\n{w.tail()}"
                    seen[name].add(w.get("/readyz")[0])
                time.sleep(0.2)
        finally:
            broker.resume()
        stalled = dict(seen)
        assert 503 in stalled["teacher"] and 503 in stalled["student"], f"/readyz during a {STALL_S}s stall: {stalled}"
        assert all(200 in w.get("/healthz")[:1] for w in (teacher, student))  # alive, not restarted

        teacher.wait_ready(90)
        student.wait_ready(90)
        student.wait(lambda: student.metric("distill_student_examples_trained_total") >= total, "recovery", 90)
        assert teacher.stop() == 0, teacher.tail()
        assert student.stop() == 0, student.tail()
        context = f"stall {STALL_S}s, /readyz codes during it {stalled}"
        check_books(config, ["s1"], total, context)
        s = summary(config, "s1")
        assert s["missing"] == 0 and s["joined"] == s["batches_trained"], f"{context}: {s}"
