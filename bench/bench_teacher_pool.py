"""The teacher pool: labelled examples/s with one and with two labelers, and the trainer's
training rate beside the single-process teacher's.

* **labelers**: a fresh broker per run. A trainer in this process publishes version 0 (the
  default teacher model) and stops (the staleness bound is lifted: this is the labelling
  cost); N ``distill teacher --role labeler`` processes start
  (OMP_NUM_THREADS=1) and are waited for on ``/readyz``, which answers 200 once a labeler is
  connected with its checkpoint. Then the synthetic stream is produced and the rate is
  the examples over the seconds from the start of producing to the last label, counted from
  the labelers' ``/metrics``. The ratio is two labelers over one, measured one after the other
  in this run. On a machine with fewer cores than labelers + broker + producer the labelers
  compete for the CPUs and the ratio shows that, not the scaling of one GPU per labeler; the
  labelers' CPU seconds per labelled example (``/proc/<pid>/stat``, from just before the
  stream to the last label), one against two, shows whether the pool itself costs anything.
* **one transaction per poll or per ``max_transaction_seconds``**: one labeler in this process
  over a backlog, its transactions closed after each poll (``max_transaction_seconds`` below
  one poll's time) against the default 0.1 s, which takes in what the consumer holds; runs
  alternate, the ratio is the median of three pairs. The window opens at the first step that
  labelled (the group join and the first fetch are start-up).
* **trainer vs teacher**: in this process, on one stream, torch on one thread as in the worker
  processes: the trainer (one process, no torchrun, the default publishing cadence) steps until
  it trained every example; the role-both teacher until it labelled and trained every example.
  Ratio trainer over teacher, each the mean of two alternating runs.
"""

from __future__ import annotations

import re
import statistics
import tempfile
import time
import urllib.request
from pathlib import Path

import torch

from bench.bench_pipeline import Run, cpu_seconds
from bench.workers import one_thread, stream, timed_steps
from distill.local.broker import EmbeddedBroker
from teacher_worker.labeler import Labeler
from teacher_worker.ranks import Ranks
from teacher_worker.trainer import Trainer
from teacher_worker.worker import TeacherWorker

LABEL_EXAMPLES = 200_000
TRAIN_EXAMPLES = 40_000
_LABELLED = re.compile(r'^distill_teacher_examples_labeled_total\{teacher="[^"]+"\} (\S+)$', re.M)


def labelled(children) -> float:
    total = 0.0
    for child in children:
        with urllib.request.urlopen(f"http://127.0.0.1:{child.port}/metrics", timeout=2) as r:
            total += sum(float(v) for v in _LABELLED.findall(r.read().decode()))
    return total


def labelers_rate(count: int) -> tuple[float, float]:
    """(labelled examples/s, labeler CPU seconds per labelled example) with ``count`` labelers."""
    with tempfile.TemporaryDirectory() as tmp, EmbeddedBroker(log_file=Path(tmp) / "broker.log") as broker:
        # One checkpoint labels the whole stream here (the labelling cost, not freshness): no
        # staleness bound, or the labelers would wait for a trainer that has stopped.
        unbounded = {"teacher": {"pool": {"max_label_staleness_examples": 10 * LABEL_EXAMPLES}}}
        run = Run(broker, Path(tmp) / "state", LABEL_EXAMPLES, **unbounded)
        try:
            trainer = Trainer(run.local_config(), Ranks(), torch.device("cpu"))
            trainer.start()  # announces version 0
            trainer.close()
            children = [
                run.spawn("teacher", f"labeler-{i}", "--role", "labeler", "--name", f"labeler-{i}")
                for i in range(count)
            ]
            run.wait_ready(children)
            cpu = sum(cpu_seconds(c.process.pid) for c in children)
            started = time.perf_counter()
            run.produce()
            deadline = time.monotonic() + 300
            while labelled(children) < LABEL_EXAMPLES:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{count} labelers did not label the stream within 300 s")
                time.sleep(0.05)
            seconds = time.perf_counter() - started
            cpu = sum(cpu_seconds(c.process.pid) for c in children) - cpu
            return LABEL_EXAMPLES / seconds, cpu / LABEL_EXAMPLES
        finally:
            run.stop()


def labeler_rate(max_transaction_seconds: float) -> float:
    """Examples/s of one in-process labeler over a backlog of LABEL_EXAMPLES (version 0 labels
    it all), from its first step that labelled."""
    unbounded = {"pool": {"max_label_staleness_examples": 10 * LABEL_EXAMPLES}}
    with stream(LABEL_EXAMPLES, teacher={**unbounded, "max_transaction_seconds": max_transaction_seconds}) as cfg:
        trainer = Trainer(cfg, Ranks(), torch.device("cpu"))
        trainer.start()  # announces version 0
        trainer.close()
        del trainer  # its Kafka clients go while the broker is still up
        return _labelling_rate(cfg)


def _labelling_rate(cfg) -> float:
    labeler = Labeler(cfg)
    labeler.start()
    first = 0

    def step() -> bool:
        nonlocal first
        before = labeler.examples_labeled
        labeler.step()
        if not before and labeler.examples_labeled:
            first = labeler.examples_labeled  # the window opens after this step
            return False
        return labeler.examples_labeled > before

    seconds = timed_steps(step, lambda: labeler.examples_labeled >= LABEL_EXAMPLES)
    labeler.close()
    return (LABEL_EXAMPLES - first) / seconds


def training_rate(worker) -> float:
    """Examples trained per second by a started trainer or role-both teacher (from its first
    step that trained: start-up is not counted)."""

    def step() -> bool:
        before = worker.examples_trained
        worker.step()
        return worker.examples_trained > before

    seconds = timed_steps(step, lambda: worker.examples_trained >= TRAIN_EXAMPLES)
    worker.close()
    return TRAIN_EXAMPLES / seconds


def trainer_rate(cfg) -> float:
    trainer = Trainer(cfg, Ranks(), torch.device("cpu"))
    trainer.start()
    return training_rate(trainer)


def teacher_rate(cfg) -> float:
    teacher = TeacherWorker(cfg)
    teacher.start()
    return training_rate(teacher)


def run() -> list[dict]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the labeler processes run (OMP_NUM_THREADS=1)
    try:
        pairs = [(labeler_rate(1e-9), labeler_rate(0.1)) for _ in range(3)]
    finally:
        torch.set_num_threads(threads)
    per_poll, grouped = (statistics.median(side) for side in zip(*pairs, strict=True))
    grouping = statistics.median(g / p for p, g in pairs)
    one, one_cpu = labelers_rate(1)
    two, two_cpu = labelers_rate(2)
    rates: dict[str, list[float]] = {"trainer": [], "teacher": []}
    for _ in range(2):
        # No labeler commits here: the lead bound would pause the trainer for good once it
        # is max_lead_versions ahead (its staleness publishes come every 8 batches a partition).
        with stream(TRAIN_EXAMPLES, teacher={"pool": {"max_lead_versions": 10**6}}) as cfg, one_thread():
            # Its own name, so its own checkpoints: each worker reads the stream from the start.
            named = cfg.model_copy(update={"teacher": cfg.teacher.model_copy(update={"name": "trainer"})})
            rates["trainer"].append(trainer_rate(named))
            rates["teacher"].append(teacher_rate(cfg))
    trainer, teacher = (sum(v) / len(v) for v in (rates["trainer"], rates["teacher"]))
    return [
        {
            "name": "one labeler in process, a transaction per 0.1 s (the default)",
            "value": grouped,
            "unit": "examples/s",
            "ratio": grouping,
            "vs": f"a transaction per poll, {per_poll:,.0f} examples/s (median of 3 alternating pairs)",
        },
        {"name": "one labeler", "value": one, "unit": "examples/s"},
        {"name": "two labelers", "value": two, "unit": "examples/s", "ratio": two / one, "vs": "one labeler"},
        {"name": "labeler CPU per example, one labeler", "value": one_cpu * 1e6, "unit": "µs"},
        {
            "name": "labeler CPU per example, two labelers",
            "value": two_cpu * 1e6,
            "unit": "µs",
            "ratio": two_cpu / one_cpu,
            "vs": "one labeler (flat: the pool adds no work per example)",
        },
        {
            "name": "trainer (role trainer)",
            "value": trainer,
            "unit": "examples/s",
            "ratio": trainer / teacher,
            "vs": "single-process teacher (role both)",
        },
        {"name": "single-process teacher", "value": teacher, "unit": "examples/s"},
    ]
