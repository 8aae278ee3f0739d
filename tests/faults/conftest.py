"""Helpers for the fault scenarios: real worker processes with their HTTP endpoints, metrics
scraped from ``/metrics``, and the books (every example batch labelled, every student trained
each batch exactly once, nothing pending) checked at the end."""

from __future__ import annotations

import json
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from distill.core.checkpoint import Checkpointer
from distill.core.config import Config
from distill.local.broker import free_port
from tests.integration.workers import spawn, stop

FORGED = b"forged"  # key prefix of label messages a test injects
# Prometheus's default scrape_timeout: on 2 cores shared with three brokers and the other
# workers, a worker's HTTP thread has answered /metrics later than 2 s (the GIL, a core)
SCRAPE_TIMEOUT_S = 10.0
FAST_STUDENT = {"label_wait_s": 1.0, "checkpoint": {"every_batches": 5, "every_seconds": 1.0}}


def http_get(port: int, path: str, timeout: float = 2.0) -> tuple[int, str]:
    """(status, body); (0, why) when nothing answers."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except (OSError, urllib.error.URLError) as exc:
        return 0, str(exc)


def scrape(port: int) -> dict[tuple[str, tuple], float]:
    """Every sample of /metrics: {(name, sorted label items): value}."""
    code, body = http_get(port, "/metrics", SCRAPE_TIMEOUT_S)
    assert code == 200, f"/metrics on port {port} answered {code}: {body[:300]}"
    out = {}
    for family in text_string_to_metric_families(body):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def metric(port: int, name: str, **labels: str) -> float:
    """Sum of the samples called ``name`` whose labels include ``labels`` (0 when none)."""
    want = set(labels.items())
    return sum(v for (n, ls), v in scrape(port).items() if n == name and want <= set(ls))


@dataclass
class Worker:
    """A ``python -m distill`` process with its metrics port and log file."""

    args: list[str]
    log: Path
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen | None = None

    def start(self) -> Worker:
        self.proc = spawn([*self.args, "--metrics-port", str(self.port)], self.log)
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def tail(self, n: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-n:] if self.log.exists() else "(no log)"

    def get(self, path: str) -> tuple[int, str]:
        return http_get(self.port, path)

    def wait(self, predicate, what: str, timeout: float = 60.0, interval: float = 0.2):
        """Poll ``predicate()`` until truthy; the worker must stay alive meanwhile."""
        deadline = time.monotonic() + timeout
        while True:
            assert self.alive(), (
                f"{self.args[0]} exited ({self.proc.returncode}) while waiting for {what}:\n{self.tail()}"
            )
            value = predicate()
            if value:
                return value
            assert time.monotonic() < deadline, f"{what}: not reached within {timeout}s\n{self.tail()}"
            time.sleep(interval)

    def wait_ready(self, timeout: float = 60.0) -> None:
        self.wait(lambda: self.get("/readyz")[0] == 200, "/readyz 200", timeout)

    def metric(self, name: str, **labels: str) -> float:
        """0 while the HTTP server is not up yet (the process is still importing)."""
        if self.get("/healthz")[0] == 0:
            return 0.0
        return metric(self.port, name, **labels)

    def stop(self, timeout: float = 60) -> int:
        assert self.alive(), f"{self.args[0]} had already exited ({self.proc.returncode}):\n{self.tail()}"
        return stop(self.proc, timeout)

    def kill(self) -> None:
        if self.alive():
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture
def workers():
    """Start workers with ``workers(args, log)``; any still running at the end is killed."""
    made: list[Worker] = []

    def make(args: list[str], log: Path) -> Worker:
        w = Worker(args, log).start()
        made.append(w)
        return w

    yield make
    for w in made:
        w.kill()


def summary(config: Config, student: str) -> dict:
    return json.loads((config.progress_dir() / f"student-{student}.summary.json").read_text())


def last_progress(config: Config, role: str, name: str) -> dict:
    path = config.progress_dir() / f"{role}-{name}.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return json.loads(lines[-1]) if lines else {}


def check_books(config: Config, students: list[str], examples: int, context: str = "", teacher: bool = True) -> dict:
    """After the workers stopped: every good example batch has exactly one distinct label
    (copies are the same source batch), and each student trained each good batch once, with
    nothing pending. Returns the good batch ids by id -> partition/offset."""
    from distill.core.exceptions import DecodeError
    from distill.core.wire import Codec
    from tests.integration.workers import read_all

    batches = good_examples(config)
    codec = Codec()
    labelled: dict[str, set] = {}
    for m in read_all(config, config.topics.labels):
        try:
            lb = codec.decode_labels(m.value(), m.headers())
        except DecodeError:
            continue  # injected garbage: the student dead-letters it
        if (m.key() or b"").startswith(FORGED):
            continue  # a label injected by a test, not the teacher's
        labelled.setdefault(lb.batch_id, set()).add((lb.source_partition, lb.source_offset))
    if not teacher:
        labelled = {bid: {(p, o)} for bid, (p, o, _) in batches.items()}
    unlabelled = set(batches) - set(labelled)
    assert not unlabelled, f"{context}: {len(unlabelled)} batches never labelled, e.g. {sorted(unlabelled)[:3]}"
    assert set(labelled) == set(batches), (
        f"{context}: labels for unknown batches {sorted(set(labelled) - set(batches))[:3]}"
    )
    assert all(len(v) == 1 for v in labelled.values()), f"{context}: a batch id labelled from two sources"
    for bid, (p, o, _) in batches.items():
        assert labelled[bid] == {(p, o)}, f"{context}: {bid} labelled as {labelled[bid]}, it is at {(p, o)}"
    for name in students:
        s = summary(config, name)
        keys = (
            "batches_trained",
            "unique_batches_trained",
            "examples_trained",
            "joined",
            "missing",
            "late",
            "duplicate",
            "pending",
        )
        where = f"{context}: student {name}: { {k: s.get(k) for k in keys} }"
        assert s["batches_trained"] == s["unique_batches_trained"] == len(batches), where
        assert s["examples_trained"] == examples, where
        assert s["pending"] == 0, where
        _, state = Checkpointer(config.checkpoint_dir("student", name)).load_latest()
        trained = state["trained_batch_ids"]
        assert len(trained) == len(set(trained)) and set(trained) == set(batches), where
    return batches


def good_examples(config: Config) -> dict[str, tuple[int, int, int]]:
    """batch id -> (partition, offset, size) of every example batch a worker would accept."""
    from distill.core.exceptions import DecodeError
    from distill.core.wire import Codec
    from tests.integration.workers import read_all

    codec = Codec(config.wire.non_finite, config.wire.max_message_bytes)
    out = {}
    for m in read_all(config, config.topics.examples):
        try:
            b = codec.decode_examples(m.value(), m.headers())
        except DecodeError:
            continue
        out[b.batch_id] = (m.partition(), m.offset(), b.size)
    return out


def dead_letters(config: Config, topic: str) -> list[dict]:
    from distill.core.kafka import Clients, partition_count
    from distill.core.wire import Codec
    from tests.integration.workers import read_all

    if not partition_count(Clients(config.kafka, "dlq-check").admin(), topic):
        return []
    codec = Codec()
    return [codec.decode_dead_letter(m.value(), m.headers()) for m in read_all(config, topic, idle=1.0)]
