"""The student worker against the same model's distillation loop on batches in memory.

The stream is labelled by a teacher first; then an `aux` student consumes both topics, joins,
scores and trains. The baseline runs the same model's forward, aux loss and step on the same
decoded batches with the same teacher logits. Both run torch on one thread, as the worker
processes do. Target ratio at least 0.95.

Two rows say where the rest goes, in the worker's own seconds (immune to the machine's drift
between the runs): the share of them spent in the model loop itself, and the CPU that ran beside
the worker's thread (the broker's and the Kafka client threads') with that thread's CPU over
its wall time (below 1: the thread waited, on the broker or for a core).

The machine is shared: five worker runs alternate with six baseline runs, and the median
round's ratio is reported with the range. The window opens when the worker's first poll returns
records (the group join and the first fetch are start-up)."""

from __future__ import annotations

import time

import numpy as np
import torch

from bench.workers import ROUNDS, Beside, InStep, broker_stream, interleaved, one_thread, read_batches, timed_steps
from distill.learn.gate import TeacherGate
from distill.learn.step import Learner, Objective
from student_worker.worker import StudentWorker
from teacher_worker.worker import TeacherWorker

EXAMPLES = 240_000


def in_memory_rate(cfg, batches, logits) -> float:
    sc = cfg.student("aux-0")
    learner = Learner.build(cfg, sc.model, Objective.student(cfg, sc), torch.device("cpu"))
    kinds = [t.type for t in cfg.tasks]
    gate = TeacherGate.of(sc, learner.objective.distilled, kinds)
    started = time.perf_counter()
    for b, t in zip(batches, logits, strict=True):
        scored = learner.step(learner.tensors(b), t, sc.soft_weight, gate.fractions())
        gate.update(scored.main, t, b.labels)
    return sum(b.size for b in batches) / (time.perf_counter() - started)


def worker_rate(cfg, name: str, beside: Beside) -> tuple[float, list[dict]]:
    student = StudentWorker(cfg, name)
    in_step = InStep((student.learner, "tensors"), (student.learner, "step"), (student.gate, "update"))  # as in memory
    student.start()

    def step() -> bool:
        before = student.counts["examples_trained"]
        student.step()
        return student.counts["examples_trained"] > before

    seconds = timed_steps(step, lambda: student.counts["examples_trained"] >= EXAMPLES, beside, student)
    student.close()
    return EXAMPLES / seconds, [*in_step.rows("student worker", seconds), *beside.rows("student worker")]


def run() -> list[dict]:
    # one aux student per round, each with its own group: each reads both topics from the start
    students = [{"name": f"aux-{r}", "mode": "aux", "soft_weight": 1.0} for r in range(ROUNDS)]
    with broker_stream(EXAMPLES, students=students) as (cfg, broker), one_thread():
        teacher = TeacherWorker(cfg)
        teacher.start()
        while teacher.examples_trained < EXAMPLES:
            teacher.step()
        teacher.close()
        del teacher  # its clients go with the broker still there (broker_stream collects them)
        batches = read_batches(cfg)
        logits = [np.zeros((b.size, 2), dtype=np.float32) + 0.1 for b in batches]
        worker, ratio, (low, high), base, rows = interleaved(
            lambda: in_memory_rate(cfg, batches, logits),
            lambda r: worker_rate(cfg, f"aux-{r}", Beside(broker)),
        )
    return [
        {
            "name": "student worker (aux)",
            "value": worker,
            "unit": "examples/s",
            "ratio": ratio,
            "vs": f"same model distillation loop in memory (median of {ROUNDS} rounds: {low:.3f} to {high:.3f})",
        },
        {"name": "student model in memory (aux)", "value": base, "unit": "examples/s"},
        *rows,
    ]
