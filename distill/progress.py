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
    def __init__(self, directory: Path, role: str, name: str, every_s: float = 1.0, every_examples: int = 5000):
        directory.mkdir(parents=True, exist_ok=True)
        self.lines = directory / f"{role}-{name}.jsonl"
        self.summary = directory / f"{role}-{name}.summary.json"
        self.every_s = every_s
        # also by stream position, so that a fast worker's curve still has points
        self.every_examples = every_examples
        self._last = float("-inf")
        self._last_examples = 0

    def due(self, examples: int = 0) -> bool:
        return time.monotonic() - self._last >= self.every_s or examples - self._last_examples >= self.every_examples

    def write(self, record: dict[str, Any], examples: int = 0) -> None:
        self._last = time.monotonic()
        self._last_examples = examples
        with open(self.lines, "a") as f:
            f.write(json.dumps(_clean({"ts": time.time(), **record})) + "\n")

    def write_summary(self, record: dict[str, Any]) -> None:
        atomic_write(self.summary, json.dumps(_clean({"ts": time.time(), **record}), indent=2).encode())
