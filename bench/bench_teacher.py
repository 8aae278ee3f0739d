"""The teacher worker against the same model's predict+train loop on batches in memory.

The worker consumes, decodes, scores and trains each batch (``Learner.step``), publishes the
labels and commits a Kafka transaction per step; the baseline runs only ``Learner.step`` on the
same decoded batches. Both run torch on one thread, as the worker processes do. The ratio is
the share of the model's own speed the service keeps (target at least 0.95).

Two rows say where the rest goes, in the worker's own seconds (immune to the machine's drift
between the runs): the share of them spent in the model loop itself, and the CPU that ran beside
the worker's thread (the broker's and the Kafka client threads') with that thread's CPU over
its wall time (below 1: the thread waited, on the broker or for a core).

The machine is shared: five worker runs alternate with six baseline runs, and the median
round's ratio is reported with the range. The window opens when the worker's first poll returns
records (the group join and the first fetch are start-up)."""

from __future__ import annotations

import time

import torch

from bench.workers import ROUNDS, Beside, InStep, broker_stream, interleaved, one_thread, read_batches, timed_steps
from distill.learn.step import Learner, Objective
from teacher_worker.worker import TeacherWorker

EXAMPLES = 120_000


def in_memory_rate(cfg, batches) -> float:
    learner = Learner.build(cfg, cfg.teacher.model, Objective.teacher(cfg), torch.device("cpu"))
    started = time.perf_counter()
    for b in batches:
        learner.step(learner.tensors(b))
    return sum(b.size for b in batches) / (time.perf_counter() - started)


def worker_rate(cfg, beside: Beside) -> tuple[float, list[dict]]:
    teacher = TeacherWorker(cfg)
    in_step = InStep((teacher.learner, "tensors"), (teacher.learner, "step"))  # what the baseline times
    teacher.start()

    def step() -> bool:
        before = teacher.examples_trained
        teacher.step()
        return teacher.examples_trained > before

    seconds = timed_steps(step, lambda: teacher.examples_trained >= EXAMPLES, beside, teacher)
    teacher.close()
    return EXAMPLES / seconds, [*in_step.rows("teacher worker", seconds), *beside.rows("teacher worker")]


def run() -> list[dict]:
    with broker_stream(EXAMPLES) as (cfg, broker), one_thread():
        batches = read_batches(cfg)

        def fresh(round_: int):  # its own name and group: reads the stream from the start
            name = f"teacher-{round_}"
            teacher = cfg.teacher.model_copy(update={"name": name, "group_id": name})
            return worker_rate(cfg.model_copy(update={"teacher": teacher}), Beside(broker))

        worker, ratio, (low, high), base, rows = interleaved(lambda: in_memory_rate(cfg, batches), fresh)
    return [
        {
            "name": "teacher worker",
            "value": worker,
            "unit": "examples/s",
            "ratio": ratio,
            "vs": f"same model predict+train in memory (median of {ROUNDS} rounds: {low:.3f} to {high:.3f})",
        },
        {"name": "teacher model in memory", "value": base, "unit": "examples/s"},
        *rows,
    ]
