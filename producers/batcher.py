"""Accepted examples on their way to becoming example batches: one buffer per partition of the
examples topic (by user: a user's events stay on one partition, in stream order) or one buffer
sent round robin; a buffer that is full or has lingered becomes one encoded batch.

Both producers (the replay service and the events source) batch this way; what happens to a
batch next (a transaction, or straight to the client) is theirs.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import numpy as np

from distill.core import metrics as m
from distill.core.wire import Codec
from producers import recovery
from producers.source import Chunk, Source
from producers.transaction import Sent


def user_partition(users: np.ndarray, partitions: int) -> np.ndarray:
    """Stable partition of each user: a 64-bit mix (murmur3 finaliser) then modulo.

    The same user id lands on the same partition in every process and run (Python's ``hash``
    would not), and consecutive ids spread evenly.
    """
    x = users.astype(np.uint64)
    x ^= x >> np.uint64(33)
    x *= np.uint64(0xFF51AFD7ED558CCD)
    x ^= x >> np.uint64(33)
    x *= np.uint64(0xC4CEB9FE1A85EC53)
    x ^= x >> np.uint64(33)
    return (x % np.uint64(partitions)).astype(np.int64)


class Buffer:
    """Accepted examples waiting to become one batch."""

    def __init__(self) -> None:
        self.pieces: list[Chunk] = []
        self.rows = 0
        self.since = 0.0  # when its oldest example was accepted

    def add(self, piece: Chunk, now: float) -> None:
        if not self.rows:
            self.since = now
        self.pieces.append(piece)
        self.rows += len(piece)

    def take(self, n: int) -> Chunk:
        whole = Chunk.concat(self.pieces)
        head, rest = whole.take(slice(0, n)), whole.take(slice(n, None))
        self.pieces = [rest] if len(rest) else []
        self.rows = len(rest)
        return head


class Batcher:
    """The buffers of one producer, and the batches made from them (ids, sequence numbers,
    encoding, the recovery headers). ``layout`` sets the partitions before the first ``add``."""

    def __init__(self, producer_id: str, source: Source, codec: Codec, *, by_user: bool, size: int, linger_s: float):
        self.producer_id = producer_id
        self.source = source  # the column names the batches carry
        self.codec = codec
        self.by_user = by_user
        self.size = size
        self.linger_s = linger_s
        self.partitions = 0
        self.buffers: list[Buffer] = []
        self.next_seq = 0
        # Batch ids must never repeat across runs (readers de-duplicate by them): each run gets
        # its own token; a resumed producer continues its sequence too.
        self.run_token = uuid.uuid4().hex[:8]
        self._rr_next = 0

    def layout(self, partitions: int) -> None:
        self.partitions = partitions
        self.buffers = [Buffer() for _ in range(partitions if self.by_user else 1)]

    @property
    def rows(self) -> int:
        return sum(b.rows for b in self.buffers)

    def oldest(self) -> float | None:
        """When the oldest buffered example was accepted (None: nothing is buffered)."""
        return min((b.since for b in self.buffers if b.rows), default=None)

    def add(self, part: Chunk, now: float) -> None:
        if len(self.buffers) == 1:
            self.buffers[0].add(part, now)
            return
        which = user_partition(part.users, self.partitions)
        # A stable sort keeps stream (event-time) order inside each partition.
        # (int16 keys: numpy's stable sort is then a radix sort.)
        order = np.argsort(which.astype(np.int16 if self.partitions < 2**15 else np.int64), kind="stable")
        bounds = np.cumsum(np.bincount(which, minlength=self.partitions))
        lo = 0
        for p, hi in enumerate(bounds):
            if hi > lo:
                self.buffers[p].add(part.take(order[lo:hi]), now)
            lo = int(hi)

    def clear(self) -> None:
        for buf in self.buffers:
            buf.pieces, buf.rows = [], 0

    def ready(self, now: float, *, lingered: bool = True, force: bool = False) -> Iterator[Sent]:
        """The batches due: every full one, then (``lingered``) each partial one whose oldest
        example waited ``linger_s``, or (``force``) every partial one."""
        for p, buf in enumerate(self.buffers):
            while buf.rows >= self.size:
                yield self._batch(buf.take(self.size), p)
            if buf.rows and (force or (lingered and now - buf.since >= self.linger_s)):
                yield self._batch(buf.take(buf.rows), p)

    def _batch(self, chunk: Chunk, buffer_index: int) -> Sent:
        if len(self.buffers) == 1:
            partition = self._rr_next % self.partitions
            self._rr_next += 1
        else:
            partition = buffer_index
        seq = self.next_seq
        self.next_seq += 1
        pid = self.producer_id
        batch = chunk.to_batch(f"{pid}-{self.run_token}-{seq}", pid, seq, self.source)
        try:
            value, headers = self.codec.encode_examples(batch)
        except Exception:
            m.PRODUCER_ERRORS.labels(pid, self.source.name).inc()
            raise
        return Sent(
            partition=partition,
            key=batch.batch_id.encode(),
            value=value,
            headers=headers + recovery.batch_headers(pid, seq, chunk.positions),
            positions=chunk.positions,
            newest_ms=int(chunk.event_time_ms.max()),
        )
