"""Progressive validation: every batch is scored before the model trains on it.

Per task and head: AUC and log loss (binary), RMSE (regression) and calibration (mean
prediction / mean label), both cumulative (over the whole stream) and windowed (the last
``window`` examples). Updates are per batch and vectorised.
"""

from __future__ import annotations

import numpy as np

from distill.core.config import TaskType

_BINS = 4096
_EPS = 1e-7


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(x, -60, 60)))


def auc_from_histograms(pos: np.ndarray, neg: np.ndarray) -> float:
    """AUC from score histograms (ties within a bin count one half)."""
    n_pos, n_neg = pos.sum(), neg.sum()
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    neg_below = np.cumsum(neg) - neg
    return float(((pos * (neg_below + 0.5 * neg)).sum()) / (n_pos * n_neg))


def auc_exact(scores: np.ndarray, labels: np.ndarray) -> float:
    """Mann-Whitney AUC with tied scores at their average rank. One sort: the ties are the runs
    of equal values in the sorted scores (the window's AUC is computed at every progress line)."""
    pos = labels > 0.5
    n = len(labels)
    n_pos = int(pos.sum())
    n_neg = n - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(scores)  # not stable: tied scores share one rank anyway
    sorted_scores = scores[order]
    first = np.flatnonzero(np.r_[True, sorted_scores[1:] != sorted_scores[:-1]])
    counts = np.diff(np.r_[first, n])
    ranks = np.empty(n, dtype=np.float64)
    ranks[order] = np.repeat(first + (counts - 1) / 2.0 + 1, counts)
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


class TaskMetrics:
    """Streaming metrics of one task and one head. ``update`` takes raw outputs (logits for
    binary tasks) and the hard labels of one batch."""

    def __init__(self, kind: TaskType, window: int = 20_000):
        self.kind = kind
        self.window = window
        self.count = 0
        self.sum_loss = 0.0  # log loss (binary) or squared error (regression)
        self.sum_pred = 0.0
        self.sum_label = 0.0
        self.pos = np.zeros(_BINS, dtype=np.int64)
        self.neg = np.zeros(_BINS, dtype=np.int64)
        self._ring_pred = np.zeros(window, dtype=np.float64)
        self._ring_label = np.zeros(window, dtype=np.float64)
        self._ring_n = 0
        self._ring_at = 0

    def update(self, output: np.ndarray, label: np.ndarray) -> None:
        output = output.astype(np.float64, copy=False)
        label = label.astype(np.float64, copy=False)
        if output.size == 0:
            return
        if self.kind == "binary":
            pred = _sigmoid(output)
            p = np.clip(pred, _EPS, 1 - _EPS)
            self.sum_loss += float(-(label * np.log(p) + (1 - label) * np.log(1 - p)).sum())
            bins = np.minimum((pred * _BINS).astype(np.int64), _BINS - 1)
            positive = label > 0.5
            self.pos += np.bincount(bins[positive], minlength=_BINS)
            self.neg += np.bincount(bins[~positive], minlength=_BINS)
        else:
            pred = output
            self.sum_loss += float(((pred - label) ** 2).sum())
        self.count += output.size
        self.sum_pred += float(pred.sum())
        self.sum_label += float(label.sum())
        self._push(pred, label)

    def _push(self, pred: np.ndarray, label: np.ndarray) -> None:
        n = min(len(pred), self.window)
        pred, label = pred[-n:], label[-n:]
        end = self._ring_at + n
        if end <= self.window:
            self._ring_pred[self._ring_at : end] = pred
            self._ring_label[self._ring_at : end] = label
        else:
            split = self.window - self._ring_at
            self._ring_pred[self._ring_at :] = pred[:split]
            self._ring_label[self._ring_at :] = label[:split]
            self._ring_pred[: n - split] = pred[split:]
            self._ring_label[: n - split] = label[split:]
        self._ring_at = end % self.window
        self._ring_n = min(self.window, self._ring_n + n)

    def _summary(
        self, count: int, sum_loss: float, sum_pred: float, sum_label: float, auc: float | None
    ) -> dict[str, float]:
        if count == 0:
            return {}
        calibration = sum_pred / sum_label if sum_label != 0 else float("nan")
        if self.kind == "binary":
            return {
                "auc": auc if auc is not None else float("nan"),
                "logloss": sum_loss / count,
                "calibration": calibration,
            }
        return {"rmse": float(np.sqrt(sum_loss / count)), "calibration": calibration}

    def cumulative(self) -> dict[str, float]:
        auc = auc_from_histograms(self.pos, self.neg) if self.kind == "binary" else None
        return self._summary(self.count, self.sum_loss, self.sum_pred, self.sum_label, auc)

    def windowed(self) -> dict[str, float]:
        pred, label = self._ring_pred[: self._ring_n], self._ring_label[: self._ring_n]
        if self.kind == "binary":
            p = np.clip(pred, _EPS, 1 - _EPS)
            loss = float(-(label * np.log(p) + (1 - label) * np.log(1 - p)).sum())
            auc = auc_exact(pred, label)
        else:
            loss, auc = float(((pred - label) ** 2).sum()), None
        return self._summary(self._ring_n, loss, float(pred.sum()), float(label.sum()), auc)

    def state_dict(self) -> dict:
        return {k: v for k, v in vars(self).items()}

    def load_state_dict(self, state: dict) -> None:
        vars(self).update(state)


class ProgressiveEvaluator:
    """Metrics for every (task, head) pair; heads are e.g. ``main``, ``aux``, ``teacher``."""

    def __init__(self, task_names: list[str], kinds: list[TaskType], window: int = 20_000):
        self.task_names = task_names
        self.kinds = kinds
        self.window = window
        self.metrics: dict[tuple[str, str], TaskMetrics] = {}

    def update(self, head: str, outputs: np.ndarray, labels: np.ndarray, tasks: list[int] | None = None) -> None:
        """``outputs[:, j]`` belongs to task ``tasks[j]`` (all tasks in order by default)."""
        for j, i in enumerate(tasks if tasks is not None else range(len(self.task_names))):
            key = (self.task_names[i], head)
            if key not in self.metrics:
                self.metrics[key] = TaskMetrics(self.kinds[i], self.window)
            self.metrics[key].update(outputs[:, j], labels[:, i])

    def snapshot(self) -> dict[str, dict[str, dict[str, dict[str, float]]]]:
        """{task: {head: {"cumulative": {...}, "windowed": {...}}}}"""
        out: dict = {}
        for (task, head), m in self.metrics.items():
            out.setdefault(task, {})[head] = {"cumulative": m.cumulative(), "windowed": m.windowed()}
        return out

    @staticmethod
    def values(snapshot: dict) -> list[tuple[str, str, str, str, float]]:
        """Every figure of a ``snapshot()`` as (task, head, metric, window, value): what the
        workers export as gauges."""
        return [
            (task, head, metric, window, value)
            for task, heads in snapshot.items()
            for head, windows in heads.items()
            for window, values in windows.items()
            for metric, value in values.items()
        ]

    def state_dict(self) -> dict:
        return {f"{t}|{h}": m.state_dict() for (t, h), m in self.metrics.items()}

    def load_state_dict(self, state: dict) -> None:
        for key, s in state.items():
            task, head = key.split("|")
            m = TaskMetrics(s["kind"], s["window"])
            m.load_state_dict(s)
            self.metrics[(task, head)] = m
