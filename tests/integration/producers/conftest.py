"""Helpers of the producer tests: read every batch of the examples topic back, decoded.

The embedded broker and ``make_config`` come from ``tests/conftest.py``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pytest

from distill.core.config import Config
from distill.core.wire import Codec, ExampleBatch


@dataclass
class Produced:
    """The batches of the examples topic, each with its partition and offset."""

    batches: list[tuple[int, int, ExampleBatch]]

    @property
    def ids(self) -> np.ndarray:
        return np.concatenate([b.example_ids for _, _, b in self.batches])

    def by_partition(self) -> dict[int, list[ExampleBatch]]:
        out: dict[int, list[ExampleBatch]] = {}
        for p, _, b in sorted(self.batches, key=lambda x: (x[0], x[1])):
            out.setdefault(p, []).append(b)
        return out

    def assert_time_order_per_partition(self) -> None:
        for p, batches in self.by_partition().items():
            times = np.concatenate([b.event_time_ms for b in batches])
            assert (np.diff(times) >= 0).all(), f"event time goes back in partition {p}"

    def assert_users_stay_on_one_partition(self, user_column: str = "user_id") -> None:
        seen: dict[int, int] = {}
        for p, _, b in self.batches:
            users = np.unique(b.categorical[:, b.categorical_names.index(user_column)])
            for u in users.tolist():
                assert seen.setdefault(u, p) == p, f"user {u} on partitions {seen[u]} and {p}"


@pytest.fixture
def read_back(make_consumer, consume) -> Callable[..., Produced]:
    """``read_back(config, n_batches)``: exactly that many batches, then nothing more."""
    codec = Codec()

    def read(config: Config, n_batches: int, timeout: float = 20.0) -> Produced:
        consumer = make_consumer(config, [config.topics.examples])
        msgs = consume(consumer, n_batches, timeout=timeout)
        extra = consumer.poll(0.3)
        assert extra is None, "more batches than the producer reported"
        return Produced([(m.partition(), m.offset(), codec.decode_examples(m.value(), m.headers())) for m in msgs])

    return read
