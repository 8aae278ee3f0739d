"""The student worker against the same model's distillation loop on batches in memory.

The stream is labelled by a teacher first; then an `aux` student consumes both topics, joins,
scores and trains. The baseline runs the same model's forward, aux loss and step on the same
decoded batches with the same teacher logits. Both run torch on one thread, as the worker
processes do. Target ratio at least 0.95.

Each of the rounds is a fresh student reading both topics from the start, timed side by side
with a fresh baseline model (``bench.workers.side_by_side``); ``InStep`` and ``Beside`` add the
rows that say where the rest of the student's time goes."""

from __future__ import annotations

import numpy as np
import torch

from bench.workers import ROUNDS, Beside, InStep, Round, broker_stream, one_thread, read_batches, report, side_by_side
from distill.core.config import Config
from distill.core.wire import ExampleBatch
from distill.learn.gate import TeacherGate
from distill.learn.step import Learner, Objective
from student_worker.worker import StudentWorker
from teacher_worker.worker import TeacherWorker

EXAMPLES = 240_000


def one_round(cfg: Config, name: str, batches: list[ExampleBatch], beside: Beside) -> tuple[Round, list[dict]]:
    sc = cfg.student(name)
    learner = Learner.build(cfg, sc.model, Objective.student(cfg, sc), torch.device("cpu"))
    gate = TeacherGate.of(sc, learner.objective.distilled, [t.type for t in cfg.tasks])
    logits = [np.zeros((b.size, 2), dtype=np.float32) + 0.1 for b in batches]
    InStep((learner, "tensors"), (learner, "step"), (gate, "update"))  # as in the worker: the timing costs both sides

    def base_step(i: int) -> int:
        b, t = batches[i], logits[i]
        scored = learner.step(learner.tensors(b), t, sc.soft_weight, gate.fractions())
        gate.update(scored.main, t, b.labels)
        return b.size

    student = StudentWorker(cfg, name)
    in_step = InStep((student.learner, "tensors"), (student.learner, "step"), (student.gate, "update"))  # as in memory
    student.start()
    measured = side_by_side(
        student,
        lambda: student.counts["examples_trained"],
        base_step,
        len(batches),
        lambda: student.counts["examples_trained"] >= EXAMPLES,
        beside,
    )
    student.close()
    return measured, [*in_step.rows("student worker", measured), *beside.rows("student worker")]


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
        rounds = [one_round(cfg, f"aux-{r}", batches, Beside(broker)) for r in range(ROUNDS)]
    return report(rounds, "student worker (aux)", "student model in memory (aux)", "same model distillation loop")
