"""The arms of a sweep: a candidate teacher run exactly as the teacher worker runs it (one
learning step per batch, labels from the weights before it), its proxy student, and the
teacher-free baseline every candidate is compared with."""

from __future__ import annotations

import time

import numpy as np
import torch

from distill.core.config import Config, DistillMode, ModelConfig, StudentConfig
from distill.core.wire import ExampleBatch
from distill.learn.evaluation import ProgressiveEvaluator
from distill.learn.gate import TeacherGate
from distill.learn.step import Learner, Objective
from distill.sweep.candidates import Candidate

# A teacher's compute per example: the labelling forward pass plus a training step, counted
# as three forward passes (forward + backward).
TRAIN_PASSES = 4

# -- the models: teacher (predict, then train) and proxy students --------------------------


class _Scores:
    """Progressive metrics of one model over everything it processed and, where the halving
    compares on it, over the current slice."""

    def __init__(self, config: Config, slices: bool = True):
        self.names = [t.name for t in config.tasks]
        self.kinds = [t.type for t in config.tasks]
        self.total = ProgressiveEvaluator(self.names, self.kinds)
        self.slice = ProgressiveEvaluator(self.names, self.kinds) if slices else None

    def update(self, outputs: np.ndarray, labels: np.ndarray) -> None:
        self.total.update("main", outputs, labels)
        if self.slice is not None:
            self.slice.update("main", outputs, labels)

    def new_slice(self) -> None:
        self.slice = ProgressiveEvaluator(self.names, self.kinds)

    @staticmethod
    def get(ev: ProgressiveEvaluator | None, task: str, metric: str) -> float:
        m = ev.metrics.get((task, "main")) if ev is not None else None
        return m.cumulative().get(metric, float("nan")) if m is not None else float("nan")

    def summary(self) -> dict[str, dict[str, float]]:
        return {task: m.cumulative() for (task, _), m in self.total.metrics.items()}


class SweepTeacher:
    """The teacher worker's learning, without Kafka: ``Learner.step`` with the teacher's
    objective; the step's pre-step scores are the labels."""

    def __init__(self, config: Config, model: ModelConfig, device: torch.device):
        self.learner = Learner.build(config, model, Objective.teacher(config), device)
        self.model = self.learner.model
        self.scores = _Scores(config, slices=False)  # reported over everything it processed
        self.nan_steps = 0

    def label_then_train(self, batch: ExampleBatch) -> np.ndarray:
        scored = self.learner.step(self.learner.tensors(batch))
        assert scored is not None
        self.scores.update(scored.main, batch.labels)
        self.nan_steps += 0 if scored.stepped else 1  # the worker skips the step too
        return scored.main


class ProxyStudent:
    """The student worker's learning: ``Learner.step`` with the student's objective and gate."""

    def __init__(self, config: Config, sc: StudentConfig, mode: DistillMode, device: torch.device):
        objective = Objective.student(config, sc, mode)
        # the same seed for aux and none: the same initial shared layers
        self.learner = Learner.build(config, sc.model, objective, device, config.features.subset(sc.features))
        self.model = self.learner.model
        self.distilled = objective.distilled
        self.gate = TeacherGate.of(sc, objective.distilled, objective.kinds, mode)
        self.scores = _Scores(config)
        self.nan_steps = 0

    def step(self, batch: ExampleBatch, teacher: np.ndarray | None) -> None:
        scored = self.learner.step(self.learner.tensors(batch), teacher, self.gate.soft_weight, self.gate.fractions())
        assert scored is not None
        self.scores.update(scored.main, batch.labels)
        if teacher is not None:
            self.gate.update(scored.main, teacher, batch.labels)
        self.nan_steps += 0 if scored.stepped else 1


def proxy_student(config: Config) -> tuple[StudentConfig, str | None]:
    """The config's first ``aux`` student (its model, weight, temperature, tasks), or a default."""
    for s in config.students:
        if s.mode == "aux":
            return s, s.name
    return StudentConfig(name="proxy", mode="aux", soft_weight=1.0), None


class _ProxyScores:
    """The proxy student's progressive loss, per halving slice and in total."""

    student: ProxyStudent
    task: str
    metric: str

    def new_slice(self) -> None:
        self.student.scores.new_slice()

    def slice_loss(self) -> float:
        return _Scores.get(self.student.scores.slice, self.task, self.metric)

    def total_loss(self) -> float:
        return _Scores.get(self.student.scores.total, self.task, self.metric)


class CandidateArm(_ProxyScores):
    """A candidate teacher and the proxy student that distils from it."""

    def __init__(
        self, config: Config, candidate: Candidate, proxy: StudentConfig, device: torch.device, task: str, metric: str
    ):
        self.name, self.candidate = candidate.name, candidate
        self.teacher = SweepTeacher(config, candidate.model, device)
        self.student = ProxyStudent(config, proxy, "aux", device)
        self.task, self.metric, self.device = task, metric, device
        self.examples = 0
        self.teacher_s = 0.0
        self.student_s = 0.0

    def step(self, b: ExampleBatch) -> None:
        started = time.perf_counter()
        logits = self.teacher.label_then_train(b)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # the teacher's seconds, not queued work
        middle = time.perf_counter()
        self.student.step(b, logits)
        self.teacher_s += middle - started
        self.student_s += time.perf_counter() - middle
        self.examples += b.size

    def cost(self) -> dict[str, float]:
        flops = TRAIN_PASSES * self.teacher.model.flops_per_example
        per_1k = 1000 * self.teacher_s / self.examples if self.examples else float("nan")
        return {"gflop_per_1k": flops * 1000 / 1e9, "seconds_per_1k": per_1k}


class BaselineArm(_ProxyScores):
    """The ``none`` proxy student, shared by every candidate: trained once on the window."""

    name = "none"

    def __init__(self, config: Config, proxy: StudentConfig, device: torch.device, task: str, metric: str):
        self.student = ProxyStudent(config, proxy, "none", device)
        self.task, self.metric = task, metric
        self.examples = 0

    def step(self, b: ExampleBatch) -> None:
        self.student.step(b, None)
        self.examples += b.size

    def cost(self) -> dict[str, float]:
        return {"gflop_per_1k": 0.0, "seconds_per_1k": 0.0}
