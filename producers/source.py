"""The source interface: the column chunk and the base classes every source builds on.

A source is a finite or endless stream of examples in event-time order. Each example has a
*position* (0, 1, 2, ... in stream order) that never changes for a given source and settings;
resuming a replay means asking for the chunks from a position on.

The sources (synthetic, movielens, file) import this module; ``producers.sources`` is the
registry that builds them by name.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from distill.core.wire import ExampleBatch


@dataclass
class Chunk:
    """Consecutive examples of a stream, column by column (not yet a wire batch)."""

    positions: np.ndarray  # int64[n] stream positions
    event_time_ms: np.ndarray  # int64[n]
    example_ids: np.ndarray  # int64[n]
    users: np.ndarray  # int64[n] the partitioning key
    categorical: np.ndarray  # int64[n, k]
    dense: np.ndarray  # float32[n, d]
    labels: np.ndarray  # float32[n, t]
    truth: np.ndarray | None = None  # float32[n, t]

    def __len__(self) -> int:
        return int(self.positions.shape[0])

    def to_batch(self, batch_id: str, producer_id: str, seq: int, source: Source) -> ExampleBatch:
        """These examples as one wire batch, with ``source``'s column names."""
        return ExampleBatch(
            batch_id=batch_id,
            producer_id=producer_id,
            seq=seq,
            event_time_ms=self.event_time_ms,
            example_ids=self.example_ids,
            categorical_names=source.categorical_names,
            categorical=self.categorical,
            dense_names=source.dense_names,
            dense=self.dense,
            task_names=source.task_names,
            labels=self.labels,
            truth=self.truth,
        )

    def take(self, rows: np.ndarray | slice) -> Chunk:
        return Chunk(
            positions=self.positions[rows],
            event_time_ms=self.event_time_ms[rows],
            example_ids=self.example_ids[rows],
            users=self.users[rows],
            categorical=self.categorical[rows],
            dense=self.dense[rows],
            labels=self.labels[rows],
            truth=None if self.truth is None else self.truth[rows],
        )

    @staticmethod
    def concat(parts: list[Chunk]) -> Chunk:
        if len(parts) == 1:
            return parts[0]
        truth = None if any(p.truth is None for p in parts) else np.concatenate([p.truth for p in parts])
        return Chunk(
            positions=np.concatenate([p.positions for p in parts]),
            event_time_ms=np.concatenate([p.event_time_ms for p in parts]),
            example_ids=np.concatenate([p.example_ids for p in parts]),
            users=np.concatenate([p.users for p in parts]),
            categorical=np.concatenate([p.categorical for p in parts]),
            dense=np.concatenate([p.dense for p in parts]),
            labels=np.concatenate([p.labels for p in parts]),
            truth=truth,
        )


class Source:
    """Base of the sources. Subclasses set the column names and implement ``chunks``."""

    name: str = "source"
    categorical_names: list[str]
    dense_names: list[str]
    task_names: list[str]
    task_types: list[str]

    @property
    def total(self) -> int | None:
        """Number of examples in the stream, None when it has no end."""
        return None

    def chunks(self, start: int = 0, size: int = 1024) -> Iterator[Chunk]:
        """Examples from position ``start`` on, in order, at most ``size`` rows per chunk."""
        raise NotImplementedError

    def config_sections(self) -> dict[str, Any]:
        """The ``features`` and ``tasks`` config sections that describe this source's columns.

        Bucket sizes are not known here; a preset or the config file sets them.
        """
        return {
            "features": {
                "categorical": [{"name": n} for n in self.categorical_names],
                "dense": list(self.dense_names),
            },
            "tasks": [{"name": n, "type": t} for n, t in zip(self.task_names, self.task_types, strict=True)],
        }


class ArraySource(Source):
    """A source held in memory as columns in stream order (the replays)."""

    event_time_ms: np.ndarray
    example_ids: np.ndarray
    users: np.ndarray
    categorical: np.ndarray
    dense: np.ndarray
    labels: np.ndarray

    @property
    def total(self) -> int:
        return int(self.example_ids.shape[0])

    def chunks(self, start: int = 0, size: int = 4096) -> Iterator[Chunk]:
        for lo in range(max(0, start), self.total, size):
            hi = min(lo + size, self.total)
            yield Chunk(
                positions=np.arange(lo, hi, dtype=np.int64),
                event_time_ms=self.event_time_ms[lo:hi],
                example_ids=self.example_ids[lo:hi],
                users=self.users[lo:hi],
                categorical=self.categorical[lo:hi],
                dense=self.dense[lo:hi],
                labels=self.labels[lo:hi],
            )
