"""Chunks in the synthetic source's layout, for the producers' unit tests."""

from __future__ import annotations

import numpy as np

from producers.source import Chunk


def chunk(n: int, start: int = 0, step_ms: int = 100) -> Chunk:
    pos = np.arange(start, start + n, dtype=np.int64)
    return Chunk(
        positions=pos,
        event_time_ms=pos * step_ms,
        example_ids=pos,
        users=pos % 7,
        categorical=np.zeros((n, 3), np.int64),
        dense=np.zeros((n, 8), np.float32),
        labels=np.zeros((n, 2), np.float32),
    )
