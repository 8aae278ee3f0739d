"""Progress files: a JSON line every few seconds and a summary on stop, per worker.

``distill up`` reads them for the live display and the report; operators can tail them
(``tail -F``: the file is rotated). A line a second is about 109 MB a day for a student, so
``<role>-<name>.jsonl`` is rotated to ``.jsonl.1`` (and ``.1`` to ``.2``) when it reaches
``MAX_BYTES``: a worker keeps at most ``(KEEP + 1) * MAX_BYTES`` of progress. ``history``
reads a file with its rotated ones, oldest first.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from distill.core.files import atomic_write

MAX_BYTES = 16 * 1024 * 1024  # about 3.5 hours of a student's lines
KEEP = 2  # rotated files kept: .1 and .2


def rotated(path: Path, i: int) -> Path:
    return path.with_name(f"{path.name}.{i}")


def history(path: Path) -> Iterator[dict[str, Any]]:
    """Every record of a progress file and its rotated files, oldest first. A line being
    written (no newline yet) is skipped; a record met twice during a rotation (``.1`` and the
    current file are one file for a moment) is given once, by its timestamp."""
    olds = []
    for p in path.parent.glob(f"{path.name}.*"):
        suffix = p.name[len(path.name) + 1 :]
        if suffix.isdigit():
            olds.append((int(suffix), p))
    last_ts = float("-inf")
    for p in [p for _, p in sorted(olds, reverse=True)] + [path]:
        try:
            data = p.read_bytes()
        except FileNotFoundError:  # rotated away meanwhile
            continue
        before = last_ts  # what an older file already gave
        for line in data.split(b"\n")[:-1]:  # the last piece is empty or a line being written
            try:
                record = json.loads(line)
            except ValueError:
                continue
            ts = record.get("ts")
            if isinstance(ts, (int, float)):
                if ts <= before:
                    continue
                last_ts = max(last_ts, ts)
            yield record


def clean_json(value: Any, digits: int | None = None) -> Any:
    """``value`` made safe for strict JSON: NaN and infinities become None, dict keys strings,
    tuples lists; floats are rounded to ``digits`` decimals unless it is None."""
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return None
        return value if digits is None else round(value, digits)
    if isinstance(value, dict):
        return {str(k): clean_json(v, digits) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [clean_json(v, digits) for v in value]
    return value


class ProgressLog:
    def __init__(
        self,
        directory: Path,
        role: str,
        name: str,
        every_s: float = 1.0,
        every_examples: int = 5000,
        min_interval_s: float = 0.5,
        max_bytes: int = MAX_BYTES,
        keep: int = KEEP,
    ):
        directory.mkdir(parents=True, exist_ok=True)
        self.lines = directory / f"{role}-{name}.jsonl"
        self.summary = directory / f"{role}-{name}.summary.json"
        self.max_bytes, self.keep = max_bytes, keep
        self.every_s = every_s
        # also by stream position, so that a fast worker's curve still has points, but at most
        # every min_interval_s: a line's snapshot costs a millisecond or more, which a
        # worker at 200k examples/s would otherwise pay 40 times a second
        self.every_examples = every_examples
        self.min_interval_s = min_interval_s
        self._last = float("-inf")
        self._last_examples = 0

    def due(self, examples: int = 0) -> bool:
        since = time.monotonic() - self._last
        return since >= self.every_s or (
            since >= self.min_interval_s and examples - self._last_examples >= self.every_examples
        )

    def write(self, record: dict[str, Any], examples: int = 0) -> None:
        self._last = time.monotonic()
        self._last_examples = examples
        line = (json.dumps(clean_json({"ts": time.time(), **record}, digits=6)) + "\n").encode()
        try:
            size = self.lines.stat().st_size  # a restarted worker appends to its old file
        except FileNotFoundError:
            size = 0
        if size and size + len(line) > self.max_bytes:
            self._rotate(line)
            return
        # One write(2) of the whole line on an O_APPEND descriptor: a reader never sees half.
        fd = os.open(self.lines, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line)
        finally:
            os.close(fd)

    def _rotate(self, first_line: bytes) -> None:
        """.1 -> .2 ..., the current file -> .1, and a new current file holding ``first_line``.
        The current file never goes missing or empty, so that a reader of its last line (the
        live view of ``distill up``) always finds one: it is hard-linked to .1, then replaced
        by the new file in one rename."""
        for i in range(self.keep - 1, 0, -1):
            if rotated(self.lines, i).exists():
                os.replace(rotated(self.lines, i), rotated(self.lines, i + 1))
        fresh = self.lines.with_name(self.lines.name + ".new")
        fresh.write_bytes(first_line)
        if self.keep:
            link = self.lines.with_name(self.lines.name + ".link")
            link.unlink(missing_ok=True)  # left by a crash in the middle of a rotation
            try:
                os.link(self.lines, link)
                os.replace(link, rotated(self.lines, 1))
            except OSError:  # no hard links on this volume: a moment without a current file
                os.replace(self.lines, rotated(self.lines, 1))
        os.replace(fresh, self.lines)

    def write_summary(self, record: dict[str, Any]) -> None:
        atomic_write(self.summary, json.dumps(clean_json({"ts": time.time(), **record}, digits=6), indent=2).encode())
