"""The whole pipeline on the embedded broker, teacher and students as separate processes.

Each run gets a fresh embedded broker and starts ``python -m distill teacher`` and
``python -m distill student --name ...`` children as ``distill up`` does (OMP_NUM_THREADS=1),
each waited for on ``/readyz``. Counts come with their timestamps from the workers' progress
files (``<state_dir>/progress/*.jsonl``), the teacher's CPU time from ``/proc/<pid>/stat``
(utime + stime of all its threads). Absolute numbers depend on the machine and on whatever
else runs on it; on two cores, the workers and the broker compete for the same CPUs. Rows:

* **transport ceiling**: ``model.kind = "null"`` for the teacher (decode, publish zero
  logits, commit the transaction; no forward pass, no training) and for the demo's three
  students (decode, join, count, checkpoint, commit; no forward pass, training or
  evaluation; checkpoints at the default cadence, every 30 s, so none within the run: every
  1,000 batches, the former default, held the ceiling at about 170 k examples/s), over a
  backlog of 3 M examples produced before the workers start (at about 0.5 M examples/s a
  shorter one leaves too few progress lines for a steady window). The rate is the slowest
  student's steady rate: the examples it counted between its first and its last progress line
  written while still busy (and after the backlog was complete), over the seconds between
  them; start-up, group joins and the idle tail are not counted. The producer is not part of
  it: one producer process makes about 0.5 M examples/s (bench_producer). Every run on the
  embedded broker has the client settings ``distill up`` gives it (``LOCAL_PROFILE``,
  ``fetch.wait.max.ms = 25``: the embedded broker does not answer a waiting fetch when data
  arrives, so with librdkafka's default of 500 a consumer that resumes a paused partition, or
  waits for the next message, stalls). The second row repeats it with two config-only changes
  (``kafka.extra = {"fetch.wait.max.ms": 10}``, ``teacher.max_batches_per_step = 64``).
* **demo models**: the same with the default config's real models.
* **teacher CPU per labelled example, 1 and 4 students** (real models, one broker, one
  teacher process): the teacher and one student are started and ready, then the synthetic
  stream is produced; its end-to-end rate (the student's steady rate, as above) is the
  "sustainable rate" of a teacher and one student. Then the phases, each producing the stream
  again, alternate one student with four (three more started before the stream, catching up on
  the topic while it is produced, killed after it), with three things held equal so that what
  differs is the number of students (the teacher's CPU per example moved by up to 40% between
  runs without them):

  - the teacher on a core of its own, the broker, the students and this process (the
    producer) on the others;
  - those other cores saturated in every phase: four students catching up fill them, and in
    the phases with one a spinning process does (``spinning``);
  - no teacher checkpoint (one would fall in some phases and not others; ``bench checkpoint``
    measures it).

  Each phase takes the teacher's CPU from just before the stream to its last progress line
  written while busy, over the examples labelled in between; each four-student phase's ratio
  is against the one-student phases on either side of it. Label sharing keeps it near 1.
* **label delay p50/p99 at half and at a quarter of the sustainable rate**: a producer process at ``--rate``
  (with a linger long enough for full micro-batches, as in the run that measured the rate),
  the teacher process and one student stepped in this process; the delays are the student's
  observations of ``distill_student_label_delay_seconds`` (label arrival minus example
  arrival at the student, 0 when the label came first), kept exactly rather than read back
  from the histogram's buckets; the first second (the teacher's first steps) is left out.
  Once with the local profile's client settings, once with ``fetch.wait.max.ms = 10``.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from distill.core.config import Config, load_config
from distill.core.kafka import Clients, ensure_topics, local_profile
from distill.local.broker import EmbeddedBroker, free_port
from distill.local.up import Child
from producers.service import run_producer

PARTITIONS = 4
NULL_EXAMPLES = 3_000_000
REAL_EXAMPLES = 200_000
CPU_EXAMPLES = 100_000
CPU_ROUNDS = 5
DELAY_SECONDS = 6.0
WARM_UP_S = 1.0
SESSION_TIMEOUT_MS = 3000  # group joins take about half of it on the embedded broker
DEMO_STUDENTS = [s.name for s in Config().students]
# A null model computes nothing; its unused weights are tiny so that checkpoints cost nothing.
NULL_MODEL = {"kind": "null", "embedding_dim": 1, "hidden": [1], "cross_layers": 0}
FAST_FETCH = {"kafka": {"extra": {"fetch.wait.max.ms": 10}}}
TUNED = {**FAST_FETCH, "teacher": {"max_batches_per_step": 64}}
TUNED_NAME = "fetch.wait.max.ms=10, max_batches_per_step=64"
CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (every thread), from /proc/<pid>/stat."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def busy(pids: list[int]) -> float:
    return sum(cpu_seconds(pid) for pid in pids)


def merge(base: dict[str, Any], *overs: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for over in overs:
        for key, value in over.items():
            both = isinstance(value, dict) and isinstance(out.get(key), dict)
            out[key] = merge(out[key], value) if both else value
    return out


def _failed(child: Child) -> RuntimeError:
    return RuntimeError(f"{child.role} {child.name} exited with {child.exit_code}:\n{child.tail()}")


class Run:
    """A config on one broker and its worker processes; ``stop()`` ends them."""

    def __init__(self, broker: Any, state: Path, examples: int, **overrides: Any):
        base = {
            "state_dir": str(state),
            "topics": {"partitions": PARTITIONS},
            "kafka": {
                "bootstrap_servers": broker.bootstrap,
                "session_timeout_ms": SESSION_TIMEOUT_MS,
                # the client settings `distill up` gives the embedded broker's clients
                "extra": local_profile({}) if isinstance(broker, EmbeddedBroker) else {},
            },
            "synthetic": {"examples": examples},
        }
        self.broker = broker
        self.config = load_config(None, environ={}, **merge(base, overrides))
        self.examples = examples
        state.mkdir(parents=True, exist_ok=True)
        self.config_path = state / "config.yaml"
        dump = self.config.model_dump(mode="json")
        self.config_path.write_text(yaml.safe_dump(dump, sort_keys=False))
        ensure_topics(self.config, Clients(self.local_config().kafka, "bench").admin(), seconds=30)
        self.children: list[Child] = []
        self.env = dict(os.environ, OMP_NUM_THREADS="1")
        self.env.pop("DISTILL_CONFIG", None)

    def local_config(self) -> Config:
        """The config for clients in this process: the consumer settings of ``kafka.extra``
        stay, librdkafka's warnings that they do not apply to producers go."""
        config = self.config.model_copy(deep=True)
        if config.kafka.extra:
            config.kafka.extra = {**config.kafka.extra, "log_level": 3}
        return config

    def spawn(self, role: str, name: str, *args: str) -> Child:
        port = free_port()
        cmd = [
            sys.executable,
            "-m",
            "distill",
            role,
            *args,
            "--config",
            str(self.config_path),
            "--metrics-port",
            str(port),
        ]
        child = Child(role, name, cmd, port, self.config.state_dir / "logs" / f"{role}-{name}.log")
        child.start(self.env)
        self.children.append(child)
        return child

    def start_workers(self, students: list[str] | None = None) -> Child:
        """The teacher and the given students (default: every configured one), once ready."""
        teacher = self.spawn("teacher", self.config.teacher.name)
        for name in [s.name for s in self.config.students] if students is None else students:
            self.spawn("student", name, "--name", name)
        self.wait_ready(self.children)
        return teacher

    def wait_ready(self, children: list[Child], timeout: float = 90.0) -> None:
        deadline = time.monotonic() + timeout
        pending = list(children)
        while pending:
            for child in list(pending):
                if child.poll() is not None:
                    raise _failed(child)
                try:
                    url = f"http://127.0.0.1:{child.port}/readyz"
                    with urllib.request.urlopen(url, timeout=1) as r:
                        if r.status == 200:
                            pending.remove(child)
                except (urllib.error.URLError, OSError):
                    pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"not ready after {timeout:.0f}s: {[c.name for c in pending]}")
            time.sleep(0.1)

    def produce(self) -> dict:
        return run_producer(
            self.local_config(), "synthetic", handle_signals=False, serve_http=False, max_examples=self.examples
        )

    def lines(self, role: str, name: str) -> list[dict]:
        path = self.config.progress_dir() / f"{role}-{name}.jsonl"
        try:
            text = path.read_text()
        except OSError:
            return []
        out = []
        for line in text.splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:  # being written
                pass
        return out

    def counted(self, name: str) -> int:
        lines = self.lines("student", name)
        return lines[-1]["examples_trained"] if lines else 0

    def wait_students(self, students: list[str], target: int | None = None, timeout: float = 120.0) -> None:
        target = self.examples if target is None else target
        deadline = time.monotonic() + timeout
        while not all(self.counted(s) >= target for s in students):
            for child in self.children:
                if child.poll() not in (None, 0):
                    raise _failed(child)
            if time.monotonic() > deadline:
                counts = {s: self.counted(s) for s in students}
                raise RuntimeError(f"not all of {target} examples trained: {counts}")
            time.sleep(0.05)

    def steady_rate(self, student: str, since: float = 0.0) -> float:
        """Examples/s between the first and the last progress line written while still busy
        (and at ``since`` or later, a Unix time)."""
        busy = [
            (x["ts"], x["examples_trained"])
            for x in self.lines("student", student)
            if 0 < x["examples_trained"] < self.examples and x["ts"] >= since
        ]
        if len(busy) < 2:
            raise RuntimeError(f"student {student}: {len(busy)} progress lines while busy; produce more examples")
        (t0, n0), (t1, n1) = busy[0], busy[-1]
        return (n1 - n0) / (t1 - t0)

    def stop(self) -> None:
        for child in self.children:  # nothing of theirs is needed any more: no graceful stop
            if child.process is not None and child.process.poll() is None:
                child.process.kill()
        for child in self.children:
            child.wait(timeout=30)
        gc.collect()  # in-process clients go before the broker, which they would log about


def embedded_broker(tmp: Path) -> EmbeddedBroker:
    return EmbeddedBroker(log_file=tmp / "broker.log")


def broker_pids(broker: Any) -> list[int]:
    """The broker's processes: the embedded broker's one, or each Apache Kafka node's."""
    processes = getattr(broker, "processes", None) or [broker.process]
    return [p.pid for p in processes if p is not None]


@contextmanager
def fresh_run(examples: int, *overrides: dict[str, Any], broker_of: Callable[[Path], Any] = embedded_broker):
    """A ``Run`` on a fresh broker: ``broker_of(folder)`` makes it (a context manager with
    ``bootstrap``), by default the embedded one."""
    for name in ("distill", "producers", "teacher_worker", "student_worker"):
        logging.getLogger(name).setLevel(logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp, broker_of(Path(tmp)) as broker:
        run = Run(broker, Path(tmp) / "state", examples, **merge({}, *overrides))
        try:
            yield run
        finally:
            run.stop()


def end_to_end(
    examples: int,
    *overrides: dict[str, Any],
    cpu: dict[str, float] | None = None,
    broker_of: Callable[[Path], Any] = embedded_broker,
) -> float:
    """The teacher and the demo's students on a backlog: the slowest student's steady rate,
    on a backlog produced before they start.

    ``cpu``: filled with each process's CPU seconds (broker, teacher, students) from the
    moment every worker is ready to the last example trained, and ``"wall"``, those seconds."""
    with fresh_run(examples, *overrides, broker_of=broker_of) as run:
        # the whole backlog first: workers started beside the producer could keep up with it
        # (on Apache Kafka they did), and then no steady window is left after it completes
        run.produce()
        produced = time.time()
        teacher = run.spawn("teacher", run.config.teacher.name)
        students = [run.spawn("student", s, "--name", s) for s in DEMO_STUDENTS]
        run.wait_ready([teacher, *students])
        pids = {"broker": broker_pids(run.broker), **{f"{c.role} {c.name}": [c.process.pid] for c in run.children}}
        before, started = {k: busy(ps) for k, ps in pids.items()}, time.monotonic()
        run.wait_students(DEMO_STUDENTS)
        if cpu is not None:
            cpu.update({k: busy(ps) - before[k] for k, ps in pids.items()})
            cpu["wall"] = time.monotonic() - started
        return min(run.steady_rate(s, since=produced) for s in DEMO_STUDENTS)


def cpu_rows(cpu: dict[str, float]) -> list[dict]:
    """Where the transport ceiling's CPU goes: the cores busy over the run, and each process's
    share of them (the broker's share is what no worker change can take back)."""
    wall = cpu.pop("wall")
    total = sum(cpu.values())
    cores = os.cpu_count() or 1
    rows = [
        {
            "name": "transport ceiling: CPU busy, all processes",
            "value": total / wall,
            "unit": "cores",
            "ratio": total / wall / cores,
            "vs": f"the machine's {cores} cores",
        }
    ]
    for name, seconds in sorted(cpu.items(), key=lambda kv: -kv[1]):
        rows.append(
            {
                "name": f"transport ceiling: CPU share of the {name}",
                "value": 100 * seconds / total,
                "unit": "%",
            }
        )
    return rows


def pin(pid: int, cpus: set[int]) -> None:
    """Every thread of a process onto ``cpus``; the threads it starts later inherit it."""
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            os.sched_setaffinity(int(task), cpus)
        except ProcessLookupError:  # a thread that has just ended
            pass


@contextmanager
def spinning(cpus: set[int]):
    """A process spinning on each of ``cpus`` while the block runs: a core whose neighbours are
    busy runs slower on a shared machine, whatever they run (the in-memory teacher loop by about
    7% here), so the phases with one student keep the other cores as busy as four students do."""
    spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in cpus]
    try:
        for spinner, cpu in zip(spinners, sorted(cpus), strict=True):
            pin(spinner.pid, {cpu})
        yield
    finally:
        for spinner in spinners:
            spinner.kill()
            spinner.wait()


def teacher_cpu_per_example(run: Run, teacher: Child, before: int) -> float:
    """Produce the stream (once more) and return the teacher's CPU seconds per example it
    labels; ``before``: the examples it had labelled until now."""
    pid = teacher.process.pid
    target = before + run.examples
    seen = len(run.lines("teacher", teacher.name))
    start = cpu_seconds(pid)
    run.produce()
    readings: list[tuple[int, float]] = []  # (labelled, as of a progress line; CPU then)
    deadline = time.monotonic() + 120
    while not readings or readings[-1][0] < target:
        lines = run.lines("teacher", teacher.name)
        if len(lines) > seen:
            readings.append((lines[-1]["examples_labeled"], cpu_seconds(pid)))
            seen = len(lines)
        if teacher.poll() is not None:
            raise _failed(teacher)
        if time.monotonic() > deadline:
            raise RuntimeError(f"teacher labelled {readings[-1:]}, not {target}")
        time.sleep(0.005)
    # The last line written while busy if it covers most of the stream (no idle tail).
    busy = [r for r in readings if before + run.examples / 2 <= r[0] < target]
    labelled, cpu = busy[-1] if busy else readings[-1]
    return (cpu - start) / (labelled - before)


def label_sharing() -> tuple[list[float], list[float], float]:
    """(teacher CPU s/example in each phase with 1 student, in each with 4, end-to-end rate
    of the teacher and 1 student): the first stream gives the rate, then ``CPU_ROUNDS`` phases
    with four students alternate with ``CPU_ROUNDS + 1`` with one, as the module says."""
    names = [f"s{i}" for i in range(4)]
    # A checkpoint falls in some phases and not in others (bench checkpoint measures its cost).
    never = {"teacher": {"checkpoint": {"every_seconds": 1e9}}}
    with fresh_run(CPU_EXAMPLES, {"students": [{"name": n} for n in names]}, never) as run:
        teacher = run.start_workers(names[:1])
        run.produce()
        run.wait_students(names[:1])
        rate = run.steady_rate(names[0])
        own = {0}
        rest = set(range(1, os.cpu_count() or 1)) or own
        pin(teacher.process.pid, own)
        for pid in [*broker_pids(run.broker), *(c.process.pid for c in run.children if c is not teacher)]:
            pin(pid, rest)
        mine = os.sched_getaffinity(0)
        os.sched_setaffinity(0, rest)  # the producer's threads and the students inherit it
        try:
            labelled = run.examples
            with spinning(rest):
                ones = [teacher_cpu_per_example(run, teacher, labelled)]
            fours: list[float] = []
            for _ in range(CPU_ROUNDS):
                labelled += run.examples
                more = [run.spawn("student", n, "--name", n) for n in names[1:]]
                run.wait_ready(more)  # on the cores of this thread, which they inherit
                fours.append(teacher_cpu_per_example(run, teacher, labelled))
                labelled += run.examples
                for child in more:
                    child.process.kill()
                    child.wait(timeout=30)
                    run.children.remove(child)
                with spinning(rest):
                    ones.append(teacher_cpu_per_example(run, teacher, labelled))
        finally:
            os.sched_setaffinity(0, mine)
        return ones, fours, rate


def label_delays(rate: float, *overrides: dict[str, Any]) -> tuple[np.ndarray, dict]:
    """The teacher as a process, a producer process at ``rate``, one student in this process."""
    import torch

    from distill.core import metrics as m
    from student_worker.worker import StudentWorker

    examples = int(rate * DELAY_SECONDS)
    # Full micro-batches, as in the run that measured the rate: with the default linger (50 ms)
    # a slow stream comes in small batches, and the teacher's cost is mostly per batch.
    batch = Config().producer.batch_size
    linger_ms = 2 * 1000 * batch * PARTITIONS / rate
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the worker processes
    histogram = m.STUDENT_LABEL_DELAY.labels("s0")
    observe = histogram.observe
    delays: list[tuple[float, float]] = []  # (when, delay)

    def record(value: float) -> None:
        delays.append((time.monotonic(), value))
        observe(value)

    histogram.observe = record  # what the student observes, kept exactly as well
    try:
        first = {"students": [{"name": "s0"}], "producer": {"linger_ms": linger_ms}}
        with fresh_run(examples, first, *overrides) as run:
            run.start_workers([])
            student = StudentWorker(run.local_config(), "s0")
            student.start()
            deadline = time.monotonic() + 60
            while not student.joins:  # the group join
                student.step()
                if time.monotonic() > deadline:
                    raise RuntimeError("student not assigned within 60 s")
            producer = run.spawn(
                "produce", "producer", "synthetic", "--examples", str(examples), "--rate", f"{rate:.0f}"
            )
            deadline = time.monotonic() + DELAY_SECONDS * 5 + 30
            while student.counts["examples_trained"] < examples:
                student.step()
                if producer.poll() not in (None, 0):
                    raise _failed(producer)
                if time.monotonic() > deadline:
                    trained = student.counts["examples_trained"]
                    raise RuntimeError(f"student trained {trained} of {examples} examples")
            counts = dict(student.counts)
            student.close()
            del student
    finally:
        del histogram.observe
        torch.set_num_threads(threads)
    if not delays:
        raise RuntimeError(f"no batch was joined with its label: {counts}")
    warm = delays[0][0] + WARM_UP_S  # the teacher's first steps (allocations) are not counted
    return np.array([d for t, d in delays if t >= warm]), counts


def run() -> list[dict]:
    students = len(DEMO_STUDENTS)
    null = {"teacher": {"model": NULL_MODEL}, "students": [{"name": n, "model": NULL_MODEL} for n in DEMO_STUDENTS]}
    cpu: dict[str, float] = {}
    ceiling = end_to_end(NULL_EXAMPLES, null, cpu=cpu)
    tuned = end_to_end(NULL_EXAMPLES, null, TUNED)
    real = end_to_end(REAL_EXAMPLES)
    ones, fours, rate1 = label_sharing()
    # each phase with four students against the phases with one on either side of it
    ratios = sorted(f / ((a + b) / 2) for f, a, b in zip(fours, ones, ones[1:], strict=False))
    low, mid, high = ratios[0], float(np.median(ratios)), ratios[-1]
    half = rate1 / 2
    aim = "aim: 1,000,000 examples/s"
    return [
        {
            "name": f"transport ceiling: null teacher + {students} null students, end to end",
            "value": ceiling,
            "unit": "examples/s",
            "ratio": ceiling / 1e6,
            "vs": aim,
        },
        *cpu_rows(cpu),
        {
            "name": f"transport ceiling, client settings {TUNED_NAME}",
            "value": tuned,
            "unit": "examples/s",
            "ratio": tuned / 1e6,
            "vs": aim,
        },
        {
            "name": f"demo models: teacher + {students} students, end to end",
            "value": real,
            "unit": "examples/s",
            "ratio": real / ceiling,
            "vs": "null models (transport ceiling)",
        },
        {
            "name": f"teacher CPU per labelled example, 1 student (median of {len(ones)} phases, on a core of its own)",
            "value": float(np.median(ones)) * 1e6,
            "unit": "CPU us/example",
        },
        {
            "name": f"teacher CPU per labelled example, 4 students (median of {len(fours)} phases between them;"
            f" ratios {low:.3f} to {high:.3f})",
            "value": float(np.median(fours)) * 1e6,
            "unit": "CPU us/example",
            "ratio": mid,
            "vs": "1 student, the phases on either side (flat: 1)",
        },
        {"name": "sustainable rate: teacher + 1 student, end to end", "value": rate1, "unit": "examples/s"},
        *delay_rows(half, "half the sustainable rate"),
        *delay_rows(half, "the same, fetch.wait.max.ms=10", FAST_FETCH),
        # with a student and a producer in the same 2 cores, half the rate can already be the
        # teacher's limit: the delay is then a standing backlog, so a quarter is measured too
        *delay_rows(rate1 / 4, "a quarter of the sustainable rate"),
    ]


def delay_rows(rate: float, what: str, *overrides: dict[str, Any]) -> list[dict]:
    delays, counts = label_delays(rate, *overrides)
    p50, p99 = np.percentile(delays, [50, 99]) * 1000
    at = f"at {rate:,.0f} examples/s ({what})"
    unjoined = counts["batches_trained"] - counts["joined"]
    of = f", {len(delays)} batches" + (f", {unjoined} without a label" if unjoined else "")
    return [
        {"name": f"label delay p50 {at}", "value": p50, "unit": "ms"},
        {"name": f"label delay p99 {at}{of}", "value": p99, "unit": "ms"},
    ]
