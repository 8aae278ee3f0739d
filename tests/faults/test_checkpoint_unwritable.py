"""A student whose checkpoint directory becomes unwritable: it keeps training, reports the
failures, never commits offsets past the last durable checkpoint, and catches up once the
directory is writable again.

Tests run as root here, where ``chmod 0o500`` blocks nothing: the directory is made immutable
with ``chattr +i`` instead (no new file, no rename inside it, even for root). As another user,
``chmod 0o500`` is used.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time

import pytest
from confluent_kafka import TopicPartition

from distill.core.checkpoint import Checkpointer
from distill.core.kafka import Clients
from tests.faults.conftest import check_books, good_examples
from tests.integration.workers import produce_synthetic, write_config

STUDENT = {"name": "s1", "label_wait_s": 0.2, "checkpoint": {"every_batches": 3, "every_seconds": 0.5}}


def _lock(path, on: bool) -> None:
    if os.geteuid() != 0:
        path.chmod(0o500 if on else 0o755)
        return
    done = subprocess.run(["chattr", "+i" if on else "-i", str(path)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot make a directory read-only as root here (chattr: {done.stderr.strip()})")


def _committed(config) -> dict[int, int]:
    consumer = Clients(config.kafka, "offsets-check").consumer(config.student("s1").group_id)
    try:
        tps = consumer.committed(
            [TopicPartition(config.topics.examples, p) for p in range(config.topics.partitions)], 10
        )
    finally:
        consumer.close()
    return {tp.partition: tp.offset for tp in tps}


def test_unwritable_checkpoint_dir_holds_the_commits_back(make_config, workers, tmp_path):
    if os.geteuid() == 0 and shutil.which("chattr") is None:
        pytest.skip("running as root without chattr: no way to make a directory unwritable")
    config = make_config(topics={"partitions": 2}, students=[STUDENT])
    path = write_config(config, tmp_path / "config.yaml")
    total = produce_synthetic(config, 8 * 128, batch_size=128)["examples"]
    student = workers(["student", "--name", "s1", "--config", str(path)], tmp_path / "student.log")
    trained = lambda: student.metric("distill_student_examples_trained_total")  # noqa: E731
    student.wait(lambda: trained() >= total, "first round", 60)
    ckpts = Checkpointer(config.checkpoint_dir("student", "s1"))
    student.wait(
        lambda: ckpts.versions() and ckpts.load_latest()[1]["counts"]["examples_trained"] >= total,
        "checkpoint of round 1",
        20,
    )
    student.wait(lambda: all(o >= 0 for o in _committed(config).values()), "first commit", 20)

    _lock(ckpts.dir, True)
    try:
        version, state = ckpts.load_latest()
        durable = {p: o["examples"] for p, o in state["offsets"].items()}
        total += produce_synthetic(config, 8 * 128, batch_size=128)["examples"]
        student.wait(lambda: trained() >= total, "second round trained without checkpoints", 60)
        student.wait(lambda: student.metric("distill_student_checkpoint_failures_total") >= 2, "failures counted", 20)
        time.sleep(1.0)  # more failed attempts: none may commit
        committed = _committed(config)
        assert ckpts.load_latest()[0] == version, "a checkpoint was written into an immutable directory?"
        assert committed == durable, (
            f"committed {committed} but the last durable checkpoint (v{version}) holds {durable}"
        )
        assert student.get("/healthz")[0] == 200
        assert "checkpoint failed" in student.log.read_text()
    finally:
        _lock(ckpts.dir, False)

    student.wait(lambda: ckpts.load_latest()[0] > version, "a checkpoint once writable again", 20)
    ends = dict.fromkeys(range(config.topics.partitions), 0)
    for p, o, _n in good_examples(config).values():
        ends[p] = max(ends[p], o + 1)
    student.wait(lambda: _committed(config) == ends, f"commits caught up to {ends}", 20)
    failures = student.metric("distill_student_checkpoint_failures_total")
    assert student.stop() == 0, student.tail()
    check_books(config, ["s1"], total, f"{failures:.0f} failed checkpoints", teacher=False)
