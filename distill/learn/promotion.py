"""The promotion rule: a student's new version is served only if it is no worse than the
teacher-free baseline.

The figure is the windowed progressive (predict-before-train) loss of the serving head, per
task: log loss for a binary task, RMSE for a regression task. A student is promoted when, on
every task it is compared on, its figure is at most ``(1 + margin)`` times the baseline's (the
``none`` student's newest export, read from the model root that all students share).

Without a baseline figure (no ``none`` student runs, or it has exported none yet) there is
nothing to compare against and the version is promoted: the rule only holds back what is
measured to be worse. The baseline itself is always promoted. A student with no figure of its
own yet (its window is still empty) is held back.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Decision:
    promote: bool
    reason: str


def figures(snapshot: dict[str, Any], task_types: dict[str, str]) -> dict[str, float]:
    """{task: windowed loss of the main head} from an evaluator snapshot; tasks without a
    figure yet are left out."""
    out: dict[str, float] = {}
    for task, kind in task_types.items():
        windowed = snapshot.get(task, {}).get("main", {}).get("windowed", {})
        value = windowed.get("logloss" if kind == "binary" else "rmse")
        if isinstance(value, (int, float)) and value == value:  # not None, not NaN
            out[task] = float(value)
    return out


def decide(
    mine: dict[str, float],
    baseline: dict[str, float] | None,
    tasks: list[str] | None,
    margin: float,
) -> Decision:
    """Promote or hold back a version with figures ``mine``, compared on ``tasks`` (None:
    every task the baseline has a figure on)."""
    if not baseline:
        return Decision(True, "no baseline figure to compare against (no `none` student export)")
    compared = [t for t in (tasks or list(baseline)) if t in baseline]
    if not compared:
        return Decision(True, f"the baseline has no figure on {tasks}")
    missing = [t for t in compared if t not in mine]
    if missing:
        return Decision(False, f"no windowed figure of its own yet on {missing}")
    worse = [t for t in compared if mine[t] > baseline[t] * (1 + margin)]
    parts = ", ".join(f"{t} {mine[t]:.5f} vs {baseline[t]:.5f}" for t in compared)
    if worse:
        return Decision(False, f"worse than the baseline by more than {margin:.1%} on {worse}: {parts}")
    return Decision(True, f"no worse than the baseline (margin {margin:.1%}): {parts}")
