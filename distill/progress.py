"""Progress files: a JSON line every few seconds and a summary on stop, per worker.

``distill up`` reads them for the live display and the report; operators can tail them.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from distill.checkpoint import atomic_write


def _clean(value: Any) -> Any:
    if isinstance(value, float):
        return None if math.isnan(value) or math.isinf(value) else round(value, 6)
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


class ProgressLog:
    def __init__(self, directory: Path, role: str, name: str, every_s: float = 1.0):
        directory.mkdir(parents=True, exist_ok=True)
        self.lines = directory / f"{role}-{name}.jsonl"
        self.summary = directory / f"{role}-{name}.summary.json"
        self.every_s = every_s
        self._last = 0.0

    def due(self) -> bool:
        return time.monotonic() - self._last >= self.every_s

    def write(self, record: dict[str, Any]) -> None:
        self._last = time.monotonic()
        with open(self.lines, "a") as f:
            f.write(json.dumps(_clean({"ts": time.time(), **record})) + "\n")

    def write_summary(self, record: dict[str, Any]) -> None:
        atomic_write(self.summary, json.dumps(_clean({"ts": time.time(), **record}), indent=2).encode())
