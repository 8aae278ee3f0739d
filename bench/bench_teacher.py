"""The teacher worker against the same model's predict+train loop on batches in memory.

The worker consumes, decodes, scores and trains each batch (``Learner.step``), publishes the
labels and commits a Kafka transaction per step; the baseline runs only ``Learner.step`` on the
same decoded batches. Both run torch on one thread, as the worker processes do. The ratio is
the share of the model's own speed the service keeps (target at least 0.95).

Each of the rounds is a fresh worker reading the stream from the start, timed side by side with
a fresh baseline model (``bench.workers.side_by_side``); ``InStep`` and ``Beside`` add the rows
that say where the rest of the teacher's time goes."""

from __future__ import annotations

import torch

from bench.workers import ROUNDS, Beside, InStep, Round, broker_stream, one_thread, read_batches, report, side_by_side
from distill.core.config import Config
from distill.core.wire import ExampleBatch
from distill.learn.step import Learner, Objective
from teacher_worker.worker import TeacherWorker

EXAMPLES = 120_000


def one_round(cfg: Config, batches: list[ExampleBatch], beside: Beside) -> tuple[Round, list[dict]]:
    learner = Learner.build(cfg, cfg.teacher.model, Objective.teacher(cfg), torch.device("cpu"))
    InStep((learner, "tensors"), (learner, "step"))  # as in the worker: the timing costs both sides

    def base_step(i: int) -> int:
        learner.step(learner.tensors(batches[i]))
        return batches[i].size

    teacher = TeacherWorker(cfg)
    in_step = InStep((teacher.learner, "tensors"), (teacher.learner, "step"))  # what the baseline times
    teacher.start()
    measured = side_by_side(
        teacher,
        lambda: teacher.examples_trained,
        base_step,
        len(batches),
        lambda: teacher.examples_trained >= EXAMPLES,
        beside,
    )
    teacher.close()
    return measured, [*in_step.rows("teacher worker", measured), *beside.rows("teacher worker")]


def run() -> list[dict]:
    with broker_stream(EXAMPLES) as (cfg, broker), one_thread():
        batches = read_batches(cfg)
        rounds = []
        for r in range(ROUNDS):
            name = f"teacher-{r}"  # its own name and group: reads the stream from the start
            teacher = cfg.teacher.model_copy(update={"name": name, "group_id": name})
            rounds.append(one_round(cfg.model_copy(update={"teacher": teacher}), batches, Beside(broker)))
    return report(rounds, "teacher worker", "teacher model in memory", "same model predict+train")
