"""The live terminal view of ``distill up`` (rich): rates, lag, coverage, progressive metrics."""

from __future__ import annotations

import time
from typing import Any

from rich.console import Console
from rich.live import Live
from rich.table import Table


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


class LiveView:
    def __init__(self, pipeline: Any):
        self.pipeline = pipeline
        self.console = Console()
        self.live = Live(console=self.console, refresh_per_second=2, transient=False)
        self.started = time.monotonic()
        binary = [t.name for t in pipeline.config.tasks if t.type == "binary"]
        self.task = binary[0] if binary else pipeline.config.tasks[0].name
        self.metric = "logloss" if binary else "rmse"

    def start(self) -> None:
        self.live.start()

    def stop(self) -> None:
        self.live.stop()

    def update(self, status: dict[str, dict]) -> None:
        table = Table(
            title=f"online-distill  {time.monotonic() - self.started:5.0f}s  "
            f"(progressive {self.task} {self.metric} / AUC; Ctrl-C stops)"
        )
        for col in ("process", "examples", "ex/s", "coverage", "join j/m/l/d", "AUC", self.metric, "state"):
            table.add_column(col, justify="right" if col not in ("process", "state") else "left")
        for child in self.pipeline.children:
            s = status.get(f"{child.role}:{child.name}", {})
            head = "main"
            values = s.get("metrics", {}).get(self.task, {}).get(head, {}).get("windowed", {})
            examples = (
                s.get("examples_trained")
                if child.role == "student"
                else (
                    s.get("examples_labeled", s.get("examples_trained"))
                    if child.role == "teacher"
                    else s.get("examples")
                )
            )
            join = "-"
            if child.role == "student":
                join = "/".join(_fmt(s.get(k, 0)) for k in ("joined", "missing", "late", "duplicate"))
            state = "running" if child.poll() is None else f"exited {child.exit_code}"
            kind = child.extra.get("mode") or child.extra.get("teacher_role")
            table.add_row(
                f"{child.role} {child.name}" + (f" ({kind})" if kind else ""),
                _fmt(examples),
                _fmt(s.get("examples_per_s") or s.get("rate"), 0),
                _fmt(s.get("coverage"), 2),
                join,
                _fmt(values.get("auc")),
                _fmt(values.get(self.metric)),
                state,
            )
        self.live.update(table)
