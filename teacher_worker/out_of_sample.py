"""The out-of-sample rule of the teacher pool, as plain functions of watermarks.

A checkpoint's watermark maps a partition to the offset it trained through (it trained on the
offsets below it). A batch at (partition p, offset o) may be labelled only by a checkpoint
whose watermark for p is at most o, and the labelers take the newest such one. The trainer
bounds its lead so that the oldest checkpoint a labeler may still need stays published.

``history`` is always a sequence of ``(version, watermark)`` in increasing version order.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

History = Sequence[tuple[int, Mapping[int, int]]]


def newest_eligible(history: History, partition: int, offset: int) -> int | None:
    """Index in ``history`` of the newest checkpoint that never trained on (partition, offset)."""
    for i in range(len(history) - 1, -1, -1):
        if history[i][1].get(partition, 0) <= offset:
            return i
    return None


def oldest_needed(history: History, positions: Mapping[int, int], partitions: Iterable[int]) -> int | None:
    """The oldest version a labeler may still need: per partition, the newest checkpoint
    eligible at the labelers' position (their committed offset, 0 when none), and the
    minimum of those. None when nothing was published yet."""
    if not history:
        return None
    needed = []
    for p in partitions:
        i = newest_eligible(history, p, positions.get(p, 0))
        # Nothing eligible: the labelers are behind every kept checkpoint; the oldest is needed.
        needed.append(history[0 if i is None else i][0])
    return min(needed, default=history[-1][0])


def lead_batches(trained_through: Mapping[int, int], positions: Mapping[int, int]) -> int:
    """Example batches trained on that the labelers have not labelled yet."""
    return sum(max(0, o - positions.get(p, 0)) for p, o in trained_through.items())
