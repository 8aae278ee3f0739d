"""The teacher worker against the same model's predict+train loop on batches in memory.

The worker consumes, decodes, scores and trains each batch (``Learner.step``), publishes the
labels and commits a Kafka transaction per step; the baseline runs only ``Learner.step`` on the
same decoded batches. Both run torch on one thread, as the worker processes do. The ratio is
the share of the model's own speed the service keeps (target at least 0.95).

The machine is shared and its speed drifts within seconds, so the two take turns in slices of
half a second (``bench.workers.side_by_side``): each round is a fresh worker reading the stream
from the start beside a fresh baseline model, and the median round's ratio is reported with
the range.

Three rows say where the rest goes: the share of the worker's own seconds spent in the model
loop, that loop's speed in the worker over in memory (their product is the ratio), and the CPU
that ran beside the worker's thread (the broker's and the Kafka client threads') with that
thread's CPU over its wall time (below 1: the thread waited, on the broker or for a core)."""

from __future__ import annotations

import torch

from bench.workers import (
    ROUNDS,
    SLICE_S,
    Beside,
    InStep,
    Round,
    broker_stream,
    cycle_steps,
    median_round,
    one_thread,
    read_batches,
    side_by_side,
)
from distill.core.config import Config
from distill.core.wire import ExampleBatch
from distill.learn.step import Learner, Objective
from teacher_worker.worker import TeacherWorker

EXAMPLES = 120_000


def one_round(cfg: Config, batches: list[ExampleBatch], beside: Beside) -> tuple[Round, list[dict]]:
    learner = Learner.build(cfg, cfg.teacher.model, Objective.teacher(cfg), torch.device("cpu"))

    def base_step(i: int) -> int:
        learner.step(learner.tensors(batches[i]))
        return batches[i].size

    teacher = TeacherWorker(cfg)
    in_step = InStep((teacher.learner, "tensors"), (teacher.learner, "step"))  # what the baseline times
    teacher.start()
    measured = side_by_side(
        teacher,
        lambda: teacher.examples_trained,
        cycle_steps(base_step, len(batches)),
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
        (median, rows), (low, high) = median_round(rounds)
    return [
        {
            "name": "teacher worker",
            "value": median.worker_rate,
            "unit": "examples/s",
            "ratio": median.ratio,
            "vs": f"same model predict+train in memory, in alternating {SLICE_S} s slices "
            f"(median of {ROUNDS} rounds: {low:.3f} to {high:.3f})",
        },
        {"name": "teacher model in memory", "value": median.base_rate, "unit": "examples/s"},
        *rows,
    ]
