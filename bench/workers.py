"""Shared set-up of the worker benchmarks: a broker, a produced synthetic stream, timing."""

from __future__ import annotations

import gc
import logging
import os
import tempfile
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
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
SLICE_S = 0.5


@dataclass
class Round:
    """One worker run timed side by side with the in-memory baseline: each side's examples and
    seconds, summed over its slices."""

    worker_examples: int = 0
    worker_s: float = 0.0
    base_examples: int = 0
    base_s: float = 0.0

    @property
    def worker_rate(self) -> float:
        return self.worker_examples / self.worker_s

    @property
    def base_rate(self) -> float:
        return self.base_examples / self.base_s

    @property
    def ratio(self) -> float:
        return self.worker_rate / self.base_rate


def side_by_side(
    worker: Worker,
    trained: Callable[[], int],
    base_step: Callable[[int], int],
    batches: int,
    done: Callable[[], bool],
    beside: Beside | None = None,
    slice_s: float = SLICE_S,
) -> Round:
    """Run ``worker`` until ``done()``, alternating ``slice_s`` of its steps with ``slice_s`` of
    the baseline's: ``base_step(i)`` trains batch i of ``batches`` in memory (in turn, then from
    the first again) and returns its examples. The machine's speed drifts by 10 to 20% within
    seconds on a shared host: whole runs taking turns left that in the ratio, slices of half a
    second cancel it. ``trained()`` counts the worker's examples. Its start-up (the group join,
    the first fetch) is left out: the slices begin when its first poll returns records. Its
    Kafka client threads run on through the baseline's slices (they hardly use a core: the
    ``beside`` row); a teacher's last transaction of a slice commits during the next baseline
    slice, a millisecond of a 500 ms slice. ``beside`` counts the worker's slices only."""
    window = Window(None)
    window.opens_at_first_records(worker)
    while window.started is None and not done():
        worker.step()
    measured, position = Round(), 0
    side_started, examples_before = window.started or time.perf_counter(), 0
    if beside is not None:
        beside.start()
    while not done():
        worker.step()
        now = time.perf_counter()
        if now - side_started < slice_s and not done():
            continue
        if beside is not None:
            beside.stop()
        measured.worker_s += now - side_started
        measured.worker_examples += trained() - examples_before
        base_started = time.perf_counter()
        while time.perf_counter() - base_started < slice_s:
            measured.base_examples += base_step(position)
            position = (position + 1) % batches
        measured.base_s += time.perf_counter() - base_started
        side_started, examples_before = time.perf_counter(), trained()
        if beside is not None:
            beside.start()
    return measured


def report(rounds: list[tuple[Round, list[dict]]], worker: str, model: str, loop: str) -> list[dict]:
    """The rows of the median round (by ratio): the worker's rate against ``loop`` in memory,
    the baseline's rate as ``model``, then that round's own rows; the range of the ratios."""
    ordered = sorted(rounds, key=lambda r: r[0].ratio)
    median, rows = ordered[len(ordered) // 2]
    low, high = ordered[0][0].ratio, ordered[-1][0].ratio
    return [
        {
            "name": worker,
            "value": median.worker_rate,
            "unit": "examples/s",
            "ratio": median.ratio,
            "vs": f"{loop} in memory, in alternating {SLICE_S} s slices "
            f"(median of {len(rounds)} rounds: {low:.3f} to {high:.3f})",
        },
        {"name": model, "value": median.base_rate, "unit": "examples/s"},
        *rows,
    ]


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
        self.wall = self.thread = self.process = self.broker = 0.0

    def start(self) -> None:
        self._start = self._now()

    def stop(self) -> None:
        """Adds the seconds since ``start``: a run counted in several pieces sums them."""
        wall, thread, process, broker = (b - a for a, b in zip(self._start, self._now(), strict=True))
        self.wall += wall
        self.thread += thread
        self.process += process
        self.broker += broker

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
    seconds as the worker's rate, so the machine's drift cancels out. The benches wrap the
    baseline's methods too, so that the timing's own cost (a few microseconds a call) is paid
    on both sides of the ratio."""

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

    def rows(self, worker: str, measured: Round) -> list[dict]:
        """The worker's ratio to the baseline is the product of the first two rows' ratios: the
        share of its seconds in the model loop, and that loop's speed in the worker over its
        speed in memory (the same seconds, slice by slice)."""
        seconds = measured.worker_s
        loop_rate = measured.worker_examples / self.seconds if self.seconds else 0.0
        return [
            {
                "name": f"{worker}: share of its time in the model loop",
                "value": self.seconds,
                "unit": "s",
                "ratio": self.seconds / seconds,
                "vs": f"its {seconds:.2f} s (the rest: consume, decode, join, publish, metrics)",
            },
            {
                "name": f"{worker}: its model loop's speed",
                "value": loop_rate,
                "unit": "examples/s",
                "ratio": loop_rate / measured.base_rate,
                "vs": "the same loop in memory, in the slices between (below 1: the caches the worker's other "
                "work left it, the GIL, a core)",
            },
            {
                "name": f"{worker}: its thread's CPU in the model loop",
                "value": self.cpu,
                "unit": "s",
                "ratio": self.cpu / self.seconds if self.seconds else None,
                "vs": "the loop's wall seconds (below 1: it waited for the GIL or a core)",
            },
        ]
