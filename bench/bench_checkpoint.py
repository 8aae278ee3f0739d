"""What a checkpoint costs the training thread, against doing all of it there.

Student: ``export_serving_model`` writes ``model.pt`` (TorchScript), ``model.pt2``
(torch.export), ``serving.pt`` and the metadata of one version. A student worker keeps its
``ServingGraphs``: traced at its first export, filled with the new weights at each later one.
The baseline traces both graphs at every export, as every export did before.

Teacher: ``TeacherWorker.checkpoint`` serializes the state on the training thread and leaves
hashing, the write and the fsyncs to its checkpoint thread. The baseline does the whole write
on the training thread (``Checkpointer.save``), as the teacher did before.

Default models, one torch thread, the two ways alternating; each ratio is the baseline's time
over the new way's (medians of the rounds).
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import torch

from distill.core.config import load_config
from distill.learn.export import ServingGraphs, export_serving_model
from distill.learn.step import Learner, Objective
from teacher_worker.worker import TeacherWorker

ROUNDS = 5


def _row(name: str, new: list[float], old: list[float], old_name: str) -> dict:
    n, o = statistics.median(new), statistics.median(old)
    return {
        "name": name,
        "value": 1000 * n,
        "unit": "ms",
        "ratio": o / n,
        "vs": f"{old_name}, {1000 * o:.0f} ms (medians of {ROUNDS} alternating runs)",
    }


def student_export(tmp: str) -> dict:
    cfg = load_config(None, environ={}, state_dir=tmp, students=[{"name": "aux", "mode": "aux"}])
    sc = cfg.student("aux")
    model = Learner.build(cfg, sc.model, Objective.student(cfg, sc), torch.device("cpu")).model
    graphs = ServingGraphs()
    version = 0

    def export(kept: ServingGraphs | None) -> float:
        nonlocal version
        version += 1
        started = time.perf_counter()
        export_serving_model(model, cfg.features, cfg.tasks, sc.model, Path(tmp) / "aux", version, graphs=kept)
        return time.perf_counter() - started

    export(graphs)  # the worker's first export: traces its graphs (and warms torch up)
    traced, refilled = [], []
    for _ in range(ROUNDS):
        traced.append(export(None))
        refilled.append(export(graphs))
    name = "student export, graphs traced once (default student model)"
    return _row(name, refilled, traced, "traced at every export")


def teacher_checkpoint(tmp: str) -> dict:
    # no broker: the worker's clients are made in start(), which the checkpoint does not need
    cfg = load_config(None, environ={}, state_dir=tmp, kafka={"bootstrap_servers": "127.0.0.1:1"})
    teacher = TeacherWorker(cfg)
    beside, whole = [], []
    try:
        for r in range(ROUNDS + 1):  # the first round warms up
            started = time.perf_counter()
            teacher.checkpoint()
            on_thread = time.perf_counter() - started
            teacher.checkpoint_written()  # the next write starts on a quiet disk, as the baseline's
            state = {"version": 1000 + r, **teacher.learner.state_dict(), "evaluator": teacher.evaluator.state_dict()}
            started = time.perf_counter()
            teacher.checkpointer.save(1000 + r, state)
            if r:
                beside.append(on_thread)
                whole.append(time.perf_counter() - started)
    finally:
        teacher.checkpoint_writer.shutdown()
        teacher.publisher.shutdown()
    return _row(
        "teacher checkpoint on its training thread, write on the checkpoint thread (default teacher model)",
        beside,
        whole,
        "the whole write on the training thread",
    )


def run() -> list[dict]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            return [student_export(tmp), teacher_checkpoint(tmp)]
    finally:
        torch.set_num_threads(threads)
