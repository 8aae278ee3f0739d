"""Shared set-up of the worker benchmarks: a broker, a produced synthetic stream, timing."""

from __future__ import annotations

import gc
import logging
import os
import tempfile
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import torch

from distill.core.config import Config, load_config
from distill.core.kafka import Clients, local_profile, partition_count
from distill.core.wire import Codec, ExampleBatch
from distill.core.worker import Worker
from distill.local.broker import EmbeddedBroker
from producers.service import run_producer


@contextmanager
def stream(examples: int, partitions: int = 4, **overrides):
    """A broker with ``examples`` synthetic examples produced; yields the config."""
    with broker_stream(examples, partitions, **overrides) as (cfg, _broker):
        yield cfg


@contextmanager
def broker_stream(examples: int, partitions: int = 4, **overrides):
    """``stream``, yielding (config, the embedded broker)."""
    for name in ("distill", "producers", "teacher_worker", "student_worker"):
        logging.getLogger(name).setLevel(logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp, EmbeddedBroker(log_file=Path(tmp) / "broker.log") as broker:
        cfg = load_config(
            None,
            environ={},
            state_dir=tmp,
            kafka={"bootstrap_servers": broker.bootstrap, "extra": local_profile({})},  # as `distill up` runs it
            topics={"partitions": partitions},
            synthetic={"examples": examples},
            **overrides,
        )
        run_producer(cfg, "synthetic", handle_signals=False, serve_http=False, max_examples=examples)
        try:
            yield cfg, broker
        finally:
            # The closed workers' Kafka clients go while the broker is still there: collected
            # after it, they log a reconnection error a second each until they are.
            gc.collect()


@contextmanager
def one_thread():
    """Torch on one thread, as in the worker processes (``distill up`` starts them with
    OMP_NUM_THREADS=1): both sides of a ratio then run as in production, and a second thread
    does not wait on a core that a Kafka client thread or another process holds."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def read_batches(cfg: Config) -> list[ExampleBatch]:
    from confluent_kafka import TopicPartition

    clients = Clients(cfg.kafka, "bench-reader")
    consumer = clients.consumer(f"bench-{time.monotonic_ns()}")
    n = partition_count(clients.admin(), cfg.topics.examples)
    consumer.assign([TopicPartition(cfg.topics.examples, p, 0) for p in range(n)])
    codec, out, quiet = Codec(), [], time.monotonic()
    while time.monotonic() - quiet < 1.0:
        for msg in consumer.consume(1000, 0.2):
            if msg.error() is None:
                out.append(codec.decode_examples(msg.value(), msg.headers()))
                quiet = time.monotonic()
    consumer.close()
    return out


ROUNDS = 5


def interleaved(base: Callable[[], float], worker: Callable[[int], tuple[float, list[dict]]], rounds: int = ROUNDS):
    """Worker runs between runs of the in-memory baseline. Each round's ratio is the worker's
    rate over the mean of the baseline runs on either side of it, so the machine's drift
    within a run cancels; the median round is reported, with the range of the ratios.

    ``worker(round)`` returns (examples/s, rows of that round). Returns (median round's rate,
    median ratio, (lowest, highest) ratio, mean baseline rate, median round's rows)."""
    bases = [base()]
    results = []
    for r in range(rounds):
        rate, rows = worker(r)
        bases.append(base())
        results.append((rate / ((bases[-2] + bases[-1]) / 2), rate, rows))
    results.sort(key=lambda x: x[0])
    ratio, rate, rows = results[len(results) // 2]
    return rate, ratio, (results[0][0], results[-1][0]), sum(bases) / len(bases), rows


def timed_steps(step, done, beside: Beside | None = None, worker: Worker | None = None) -> float:
    """Seconds from the start of the window to ``done()``. With ``worker``, the window opens
    when its first poll returns records; else at the start of the first step that did work.
    The group join and the first fetch after the assignment (about 0.1 s on the embedded
    broker, a few percent of a run) are start-up, not a cost of each batch. ``beside``
    counts from the same moment."""
    window = Window(beside)
    if worker is not None:
        window.opens_at_first_records(worker)
    while not done():
        before = time.perf_counter()
        if step() and window.started is None:
            window.open(before)
    if beside is not None and window.started is not None:
        beside.stop()
    return time.perf_counter() - (window.started or time.perf_counter())


class Window:
    """When a timed run starts: at the first records a worker's poll returns, or at a step."""

    def __init__(self, beside: Beside | None):
        self.beside = beside
        self.started: float | None = None

    def open(self, at: float) -> None:
        self.started = at
        if self.beside is not None:
            self.beside.start()

    def opens_at_first_records(self, worker: Worker) -> None:
        poll = worker.poll

        def first_poll(*args, **kwargs):
            records = poll(*args, **kwargs)
            if records and self.started is None:
                self.open(time.perf_counter())
            return records

        worker.poll = first_poll  # type: ignore[method-assign]


class Beside:
    """CPU seconds spent beside this thread while a worker runs in it: the broker process's and
    this process's other threads' (the Kafka clients', the HTTP server's). On a machine with
    few cores they compete with the training thread, whose wall time per step then exceeds
    its CPU time."""

    def __init__(self, broker: EmbeddedBroker):
        assert broker.process is not None
        self.broker_pid = broker.process.pid

    def start(self) -> None:
        self._start = self._now()

    def stop(self) -> None:
        end = self._now()
        self.wall, self.thread, self.process, self.broker = (b - a for a, b in zip(self._start, end, strict=True))

    def _now(self) -> tuple[float, float, float, float]:
        return time.perf_counter(), time.thread_time(), time.process_time(), cpu_seconds(self.broker_pid)

    def rows(self, worker: str) -> list[dict]:
        clients = self.process - self.thread
        return [
            {
                "name": f"{worker}: CPU beside its thread (broker + client threads)",
                "value": (self.broker + clients) / self.wall,
                "unit": "cores",
                "ratio": self.thread / self.wall,
                "vs": "its own thread's CPU over wall time",
            }
        ]


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (every thread), from /proc/<pid>/stat."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class InStep:
    """Wall seconds a worker spends inside the given methods of its objects (its model's
    learning step, the student's gate): wrapped on the instances, measured in the same
    seconds as the worker's rate, so the machine's drift between two runs cancels out."""

    def __init__(self, *methods: tuple[object, str]):
        self.seconds = 0.0
        self.cpu = 0.0  # the thread's CPU seconds in them: below the wall seconds, it waited
        for owner, name in methods:
            setattr(owner, name, self._timed(getattr(owner, name)))

    def _timed(self, method):
        def timed(*args, **kwargs):
            started, cpu = time.perf_counter(), time.thread_time()
            try:
                return method(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - started
                self.cpu += time.thread_time() - cpu

        return timed

    def rows(self, worker: str, seconds: float) -> list[dict]:
        return [
            {
                "name": f"{worker}: share of its time in the model loop",
                "value": self.seconds,
                "unit": "s",
                "ratio": self.seconds / seconds,
                "vs": f"its {seconds:.2f} s (the rest: consume, decode, join, publish, metrics)",
            },
            {
                "name": f"{worker}: its thread's CPU in the model loop",
                "value": self.cpu,
                "unit": "s",
                "ratio": self.cpu / self.seconds if self.seconds else None,
                "vs": "the loop's wall seconds (below 1: it waited for the GIL or a core)",
            },
        ]
