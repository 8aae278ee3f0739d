"""Bad configuration fails fast, naming the problem; an unreachable broker is waited for."""

from __future__ import annotations

import subprocess
import sys
import time

from confluent_kafka.admin import NewTopic

from distill.core.kafka import Clients
from distill.local.broker import free_port
from tests.faults.conftest import Worker
from tests.integration.workers import write_config


def _distill(*args: str, timeout: float = 60, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "distill", *args], capture_output=True, text=True, timeout=timeout, env=env
    )


def test_unknown_keys_and_wrong_types_name_the_field(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text(
        '[kafka]\nbootstrap_servers = "x:1"\nsession_timout_ms = 3000\n\n'
        '[topics]\npartitions = "four"\n\n[teacher]\ndevice = "tpu"\n'
    )
    started = time.monotonic()
    done = _distill("teacher", "--config", str(bad))
    took = time.monotonic() - started
    assert done.returncode == 2, done
    err = done.stderr
    assert "kafka.session_timout_ms: unknown key" in err, err
    assert "topics.partitions" in err and "integer" in err, err
    assert "teacher.device" in err and "'tpu'" in err, err
    assert took < 20, f"took {took:.1f}s to refuse a bad config"


def test_partition_counts_that_differ_stop_the_teacher(make_config, tmp_path):
    config = make_config(topics={"partitions": 2})
    admin = Clients(config.kafka, "setup").admin()
    for f in admin.create_topics([NewTopic(config.topics.examples, 3), NewTopic(config.topics.labels, 2)]).values():
        f.result(10)
    path = write_config(config, tmp_path / "config.yaml")
    started = time.monotonic()
    done = _distill("teacher", "--config", str(path), timeout=60)
    took = time.monotonic() - started
    assert done.returncode != 0, done
    assert f"{config.topics.examples!r} has 3 partitions but {config.topics.labels!r} has 2" in done.stderr, (
        done.stderr[-2000:]
    )
    assert took < 30, f"took {took:.1f}s"
    done = _distill("student", "--name", "aux", "--config", str(path), timeout=60)
    assert done.returncode != 0 and "has 3 partitions" in done.stderr, done.stderr[-2000:]


def test_unreachable_broker_is_waited_for_not_ready_and_stops_cleanly(make_config, tmp_path):
    closed = free_port()  # nothing listens there
    config = make_config(kafka={"bootstrap_servers": f"127.0.0.1:{closed}"})
    path = write_config(config, tmp_path / "config.yaml")
    teacher = Worker(["teacher", "--config", str(path)], tmp_path / "teacher.log").start()
    try:
        teacher.wait(lambda: teacher.get("/healthz")[0] == 200, "/healthz while the broker is away", 30)
        codes = set()
        until = time.monotonic() + 4
        while time.monotonic() < until:
            assert teacher.alive(), teacher.tail()
            codes.add((teacher.get("/healthz")[0], teacher.get("/readyz")[0]))
            time.sleep(0.3)
        assert codes == {(200, 503)}, f"(healthz, readyz) seen: {codes}\n{teacher.tail()}"
        assert "connecting to the broker failed" in teacher.log.read_text(), teacher.tail()
        assert teacher.stop(30) == 0, teacher.tail()
    finally:
        teacher.kill()
