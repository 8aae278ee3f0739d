"""Broker failover on a 3-broker Apache Kafka cluster (KRaft; replication factor 3,
``min.insync.replicas=2``, the workers' ``acks=all``): while a producer (a resumable replay,
transactional), a teacher and two students run as real processes, the leader of the examples
partitions is SIGKILLed and later restarted, then the leader of the labels partitions.

Audited from outside once everything stopped (``check_books``): every example batch has exactly
one label from its own position, and each student trained each batch exactly once with nothing
pending.

A teacher whose loop stops (``/healthz`` 503: librdkafka's ``send_offsets_to_transaction`` can
block past its timeout when the group coordinator dies mid-transaction, confluentinc/librdkafka
#5456) is killed and started again, as the pods' liveness probe does (deploy/k8s
``pod-defaults.yaml``); the students' label wait covers that restart. (A student is not
restarted: its trained-examples counter, which says when it is done, starts at 0 in a new
process.) A producer that exits is started again, as its pod would be: a transaction held open
past its ``transaction.timeout.ms`` (15 s) through a failover on a loaded machine is aborted by
the broker, which fences the producer (seen once in a full ``make test``); the restarted replay
resumes from its committed position, so the audit still finds every batch exactly once.

The longest stall of each role (the longest time its progress counter stood still while it had
work) is printed; it is a measurement, not asserted (the machine is shared).
"""

from __future__ import annotations

import os
import threading
import time

import pytest
from confluent_kafka.admin import AdminClient

from distill.core.kafka import Clients, ensure_topics
from tests.faults.conftest import check_books, summary
from tests.integration.workers import write_config
from tests.kafka.apache import ApacheKafka, unavailable

pytestmark = pytest.mark.apache

EXAMPLES = 400 * 128
RATE = 800  # examples/s: the replay lasts through both failovers
BATCH = 128  # at most: the rate limiter sends what it has every linger
DOWN_S = 6.0  # how long a killed broker stays down
SMALL = {"hidden": [32], "embedding_dim": 8, "cross_layers": 0}
STUDENTS = [
    {"name": name, "mode": mode, "label_wait_s": 150.0, "checkpoint": {"every_batches": 10, "every_seconds": 2.0}}
    for name, mode in (("aux", "aux"), ("none", "none"))
]


@pytest.fixture
def cluster(tmp_path):
    reason = unavailable()
    if reason:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true and Apache Kafka cannot run: {reason}")
        pytest.skip(reason)
    with ApacheKafka(brokers=3, root=tmp_path / "kafka") as kafka:
        kafka.warm_up()
        yield kafka


class Progress:
    """Samples each worker's progress counter from /metrics in a thread: the longest time it
    stood still (from its first step until it reached ``done``)."""

    def __init__(self, counters: dict[str, tuple[object, str, float]]):
        self.counters = counters  # role -> (Worker, metric name, value when done)
        self.samples: dict[str, list[tuple[float, float]]] = {role: [] for role in counters}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Progress:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        while not self._stop.wait(0.25):
            for role, (worker, name, _) in self.counters.items():
                try:
                    self.samples[role].append((time.monotonic(), worker.metric(name)))
                except AssertionError:  # /metrics not up (yet)
                    pass

    def longest_stall(self, role: str) -> float:
        done = self.counters[role][2]
        longest, since, last = 0.0, None, None
        for t, v in self.samples[role]:
            if last is None or v > last:
                if since is not None:
                    longest = max(longest, t - since)
                since, last = t, v
            if v >= done:
                break
        return longest


def leader(admin: AdminClient, topic: str, partition: int = 0) -> int:
    return admin.list_topics(timeout=10).topics[topic].partitions[partition].leader


def wait_in_sync(admin: AdminClient, topics: list[str], timeout: float = 90.0) -> None:
    """Every partition of ``topics`` has all 3 replicas in sync again."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        meta = admin.list_topics(timeout=10).topics
        if all(len(p.isrs) == 3 for t in topics for p in meta[t].partitions.values()):
            return
        time.sleep(0.5)
    raise AssertionError(f"replicas of {topics} not back in sync within {timeout}s")


def revive(name: str, w, restarted: list[str]) -> bool:
    """Start a worker that exited again, as its pod's restart policy does; True if it had."""
    if w.alive():
        return False
    restarted.append(f"{name} (exited {w.proc.returncode})")
    w.start()
    return True


def supervise(workers: dict, restartable: set[str], done, timeout: float, restarted: list[str]) -> None:
    """Until ``done()``: restart (SIGKILL, then start) one of ``restartable`` whose /healthz
    answers 503, as a liveness probe does; the producer is started again when it exits; every
    other worker must stay alive. Appends the restarts to ``restarted``."""
    deadline = time.monotonic() + timeout
    while not done():
        for name, w in workers.items():
            if name == "producer":
                revive(name, w, restarted)
                continue
            assert w.alive(), f"{name} exited ({w.proc.returncode}):\n{w.tail()}"
            if name in restartable and w.get("/healthz")[0] == 503:
                restarted.append(name)
                w.kill()
                w.start()
        assert time.monotonic() < deadline, f"not done within {timeout}s; restarted {restarted}"
        time.sleep(1.0)


@pytest.mark.timeout(600)  # two failovers while three workers run on a shared machine
def test_leader_failover_keeps_every_batch_labelled_and_trained_once(cluster, make_config, workers, tmp_path):
    config = make_config(
        kafka={"bootstrap_servers": cluster.bootstrap, "extra": {}},
        topics={"partitions": 2, "replication_factor": 3},
        teacher={"model": SMALL, "max_batches_per_step": 8},
        students=STUDENTS,
        synthetic={"examples": EXAMPLES},  # the replay's end is a position: a restart ends there too
    )
    path = write_config(config, tmp_path / "config.yaml")
    ensure_topics(config, Clients(config.kafka, "admin").admin(), seconds=60)  # students wait for none
    admin = AdminClient({"bootstrap.servers": cluster.bootstrap, "log_level": 0})
    produce = ["produce", "synthetic", "--config", str(path), "--rate", str(RATE), "--batch-size", str(BATCH)]
    produce += ["--position-file", str(tmp_path / "position.json"), "--hold"]
    teacher = workers(["teacher", "--config", str(path)], tmp_path / "teacher.log")
    students = {
        s["name"]: workers(["student", "--name", s["name"], "--config", str(path)], tmp_path / f"{s['name']}.log")
        for s in STUDENTS
    }
    for w in (teacher, *students.values()):
        w.wait_ready(120)  # then the replay: it must still run when the brokers fail
    producer = workers(produce, tmp_path / "producer.log")
    counters = {
        "producer": (producer, "distill_producer_examples_total", EXAMPLES),
        "teacher": (teacher, "distill_teacher_examples_labeled_total", EXAMPLES),
    } | {f"student {n}": (w, "distill_student_examples_trained_total", EXAMPLES) for n, w in students.items()}
    kills, restarted = [], []
    with Progress(counters) as progress:
        for w in students.values():
            w.wait(lambda w=w: w.metric("distill_student_batches_trained_total") >= 3, "students under way", 60)
        for topic in (config.topics.examples, config.topics.labels):
            node = leader(admin, topic) - 1  # node ids are 1-based
            if revive("producer", producer, restarted):
                producer.wait_ready(120)  # its metrics come back with it
            sent = producer.metric("distill_producer_examples_total")
            assert sent < EXAMPLES, f"the replay ended before the failover of {topic}'s leader"
            kills.append((topic, node + 1, int(sent)))
            cluster.stop_node(node, kill=True)
            time.sleep(DOWN_S)
            assert all(w.alive() for w in (teacher, *students.values())), "a worker exited"
            cluster.start_node(node)
            cluster.wait_ready()
            wait_in_sync(admin, [config.topics.examples, config.topics.labels])
        trained = "distill_student_examples_trained_total"
        supervise(
            {"producer": producer, "teacher": teacher, **students},
            {"teacher"},
            lambda: all(w.metric(trained) >= EXAMPLES for w in students.values()),
            300,
            restarted,
        )
    stalls = {role: round(progress.longest_stall(role), 1) for role in counters}
    print(f"\nfailover: killed (topic, node, examples sent by then) {kills} for {DOWN_S}s each")
    print(f"failover: longest stall per role (s): {stalls}; restarted: {restarted}")
    # A fence is what one failover may cost the producer; more restarts would be a crash loop.
    producer_restarts = [r for r in restarted if r.startswith("producer")]
    assert len(producer_restarts) <= len(kills), f"the producer kept exiting: {restarted}\n{producer.tail()}"

    for w in (producer, teacher, *students.values()):
        assert w.stop() == 0, w.tail()
    check_books(config, [s["name"] for s in STUDENTS], EXAMPLES, f"failover {kills}, stalls {stalls}")
    for name in students:
        s = summary(config, name)
        assert s["missing"] == 0 and s["joined"] == s["batches_trained"], f"student {name} trained without labels: {s}"
