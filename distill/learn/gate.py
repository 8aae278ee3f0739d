"""The teacher-quality gate: a student distils a task only as far as its teacher leads it.

A label helps only if it knows more than the student. Each student already scores, on the same
batches and before it trains on them, its own serving head and the teacher's labels. The gate
keeps an exponentially weighted mean of both losses per distilled task and sets that task's
soft weight to

    soft_weight * clip(lead / margin, 0, 1),   lead = (student loss - label loss) / student loss

so a teacher that trails (an untrained, tiny or stale one) teaches nothing, and one that leads by
at least ``margin`` teaches with the configured weight. The weight for a batch is computed from
earlier batches only. Log loss for binary tasks, squared error for regression ones.
"""

from __future__ import annotations

import numpy as np

from distill.core.config import GateConfig, StudentConfig, TaskType

_EPS = 1e-7


def batch_loss(outputs: np.ndarray, labels: np.ndarray, kind: TaskType) -> float:
    """Mean log loss of logits (binary) or mean squared error of values (regression)."""
    outputs = outputs.astype(np.float64)
    labels = labels.astype(np.float64)
    if kind == "binary":
        p = np.clip(1.0 / (1.0 + np.exp(-outputs)), _EPS, 1 - _EPS)
        return float(-np.mean(labels * np.log(p) + (1 - labels) * np.log(1 - p)))
    return float(np.mean((outputs - labels) ** 2))


class TeacherGate:
    def __init__(
        self, config: GateConfig, soft_weight: float, distilled: list[int], kinds: list[TaskType], aux: bool = True
    ):
        self.config = config
        self.aux = aux  # the open start applies to aux mode only
        self.soft_weight = soft_weight
        self.distilled = distilled
        self.kinds = kinds
        n = len(distilled)
        self.student_loss = np.zeros(n)  # exponentially weighted; 0 with weight 0: nothing seen
        self.label_loss = np.zeros(n)
        self.seen = np.zeros(n)  # the sum of the weights, to correct the start-up bias
        self.examples = 0  # with a joined label

    @classmethod
    def of(cls, sc: StudentConfig, distilled: list[int], kinds: list[TaskType], mode: str | None = None) -> TeacherGate:
        """The gate of a student (``mode`` overrides the student's own, as the sweep's arms do)."""
        return cls(sc.gate, sc.soft_weight, distilled, kinds, aux=(mode or sc.mode) == "aux")

    def weights(self) -> list[float]:
        """The soft weight in effect of each distilled task for the next batch."""
        return [self.soft_weight * f for f in self.fractions()]

    def fractions(self) -> list[float]:
        """The share of the soft weight each distilled task gets for the next batch."""
        if not self.config.enabled:
            return [1.0] * len(self.distilled)
        # aux mode, early on: the benefit of the doubt, unless the labels already trail
        shift = 1.0 if self.aux and self.examples < self.config.open_for_examples else 0.0
        out = []
        for j in range(len(self.distilled)):
            if self.seen[j] <= 0:
                out.append(0.0)  # no evidence yet
                continue
            student, label = self.student_loss[j] / self.seen[j], self.label_loss[j] / self.seen[j]
            lead = (student - label) / max(student, _EPS)
            out.append(min(max(float(lead / self.config.margin + shift), 0.0), 1.0))  # np.clip: 10x the time
        return out

    def leads(self) -> list[float]:
        """The smoothed relative lead of the labels over the serving head, per distilled task."""
        return [
            float((s - t) / max(s, _EPS)) if n > 0 else float("nan")
            for s, t, n in zip(self.student_loss, self.label_loss, self.seen, strict=True)
        ]

    def update(self, main: np.ndarray, teacher: np.ndarray, labels: np.ndarray) -> None:
        """One batch with a joined label: the serving head's pre-step outputs, the teacher's
        labels and the hard labels, all [n, tasks] in the targets' units."""
        n = labels.shape[0]
        self.examples += n
        decay = 0.5 ** (n / self.config.half_life_examples)
        for j, i in enumerate(self.distilled):
            s = batch_loss(main[:, i], labels[:, i], self.kinds[i])
            t = batch_loss(teacher[:, i], labels[:, i], self.kinds[i])
            self.student_loss[j] = decay * self.student_loss[j] + (1 - decay) * s
            self.label_loss[j] = decay * self.label_loss[j] + (1 - decay) * t
            self.seen[j] = decay * self.seen[j] + (1 - decay)

    def state_dict(self) -> dict:
        return {
            "student_loss": self.student_loss.tolist(),
            "label_loss": self.label_loss.tolist(),
            "seen": self.seen.tolist(),
        }

    def load_state_dict(self, state: dict) -> None:
        if state and len(state.get("seen", [])) == len(self.distilled):
            self.student_loss = np.array(state["student_loss"], dtype=np.float64)
            self.label_loss = np.array(state["label_loss"], dtype=np.float64)
            self.seen = np.array(state["seen"], dtype=np.float64)
            self.examples = int(state.get("examples", 0))
