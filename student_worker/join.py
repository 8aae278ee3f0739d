"""Per-partition merge of the ordered example and label streams by batch id.

Pure logic, no Kafka: the worker feeds it decoded batches and takes back what is ready to
train, in example-offset order. Outcomes:
  joined    the label arrived (before or after its examples) in time;
  missing   hard labels only, because the label cannot come any more (a label for a later
            batch of the partition arrived: one teacher labels a partition in offset order),
            or labels stopped flowing for ``label_wait_s`` (the wait counts from the later of
            the batch's arrival and the last label seen, so a teacher that is slow but alive
            is waited for, while a stopped one costs ``label_wait_s`` once), or the buffer
            bound was hit;
  late      a label for a batch already trained without one: dropped;
  duplicate a second label for the same batch (a teacher replay after a crash): dropped.
"""

from __future__ import annotations

import heapq
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Any

from distill.core.wire import ExampleBatch, LabelBatch

_RECENT = 4096  # trained batch ids remembered per partition, to tell late from duplicate


def label_matches(label: LabelBatch, batch: ExampleBatch) -> bool:
    """Same size and the same example ids (by checksum): the label belongs to this batch."""
    return label.size == batch.size and label.example_ids_checksum == batch.example_ids_checksum


@dataclass
class PendingExamples:
    batch: ExampleBatch
    offset: int
    arrived: float


@dataclass
class BufferedLabel:
    batch: LabelBatch
    offset: int
    arrived: float
    message: Any = None  # the raw message, for the DLQ if the label does not match its batch
    matched: bool = False  # checked against its example batch on arrival (else when trained)


@dataclass
class Ready:
    examples: PendingExamples
    label: BufferedLabel | None

    @property
    def outcome(self) -> str:
        return "joined" if self.label is not None else "missing"


class PartitionJoin:
    def __init__(self, partition: int, next_offset: int, label_wait_s: float, max_pending: int):
        self.partition = partition
        self.next_offset = next_offset  # next example offset to train
        self.label_wait_s = label_wait_s
        self.max_pending = max_pending
        self.examples: deque[PendingExamples] = deque()
        self._pending: dict[str, PendingExamples] = {}  # the same, by batch id (a label finds its batch)
        self.labels: dict[str, BufferedLabel] = {}
        # (source offset, batch id) of every label buffered, some already gone: pruning labels
        # that can no longer join costs O(log n) per trained batch, not a scan of all of them
        self._by_offset: list[tuple[int, str]] = []
        self.recent: OrderedDict[str, bool] = OrderedDict()  # batch id -> trained with a label
        self._skipped_to = next_offset  # past dead-lettered example batches
        self.label_high = -1  # highest example offset a label has arrived for
        self.last_label_at = float("-inf")  # when the partition's last label arrived

    def skip(self, offset: int) -> None:
        """An example batch at ``offset`` went to the DLQ: nothing to train, but move past it."""
        self._skipped_to = max(self._skipped_to, offset + 1)
        if not self.examples:
            self.next_offset = max(self.next_offset, self._skipped_to)

    def add_examples(self, batch: ExampleBatch, offset: int, now: float) -> bool:
        """False when the batch was already trained (a replay below the resume offset)."""
        if offset < self.next_offset or (self.examples and offset <= self.examples[-1].offset):
            return False
        pending = PendingExamples(batch, offset, now)
        self.examples.append(pending)
        self._pending[batch.batch_id] = pending
        return True

    def add_label(self, label: LabelBatch, offset: int, now: float, message: Any = None) -> str | None:
        """Buffer a label; returns 'late' or 'duplicate' when it is dropped instead, 'mismatch'
        when its example batch is pending and the ids differ (not buffered: it must not turn
        the real label away as a duplicate)."""
        pending = self._pending.get(label.batch_id)
        if pending is not None and not label_matches(label, pending.batch):
            return "mismatch"
        self.last_label_at = max(self.last_label_at, now)
        self.label_high = max(self.label_high, label.source_offset)
        if label.batch_id in self.recent:
            return "duplicate" if self.recent[label.batch_id] else "late"
        if label.batch_id in self.labels:
            return "duplicate"
        if label.source_offset < self.next_offset:
            return "late"
        self.labels[label.batch_id] = BufferedLabel(label, offset, now, message, matched=pending is not None)
        heapq.heappush(self._by_offset, (label.source_offset, label.batch_id))
        return None

    def pop_ready(self, now: float, teacher_seen_at: float = float("-inf")) -> list[Ready]:
        """Batches ready to train, in offset order. ``teacher_seen_at``: when a label last
        arrived on any partition (a teacher may serve one partition's backlog before another)."""
        ready: list[Ready] = []
        while self.examples:
            head = self.examples[0]
            label = self.labels.pop(head.batch.batch_id, None)
            if label is None and not self._give_up(head, now, teacher_seen_at):
                break
            self.examples.popleft()
            self._pending.pop(head.batch.batch_id, None)
            ready.append(Ready(head, label))
            self._trained(head, label is not None)
        if not self.examples:
            self.next_offset = max(self.next_offset, self._skipped_to)
        return ready

    def _give_up(self, head: PendingExamples, now: float, teacher_seen_at: float) -> bool:
        if len(self.examples) > 2 * self.max_pending:
            return True
        if self.label_high > head.offset:
            return True
        return now - max(head.arrived, self.last_label_at, teacher_seen_at) >= self.label_wait_s

    def drain(self) -> list[Ready]:
        """Everything pending, labelled or not (used before handing a partition back)."""
        return self.pop_ready(float("inf"))

    def _trained(self, head: PendingExamples, joined: bool) -> None:
        self.next_offset = head.offset + 1
        self.recent[head.batch.batch_id] = joined
        if len(self.recent) > _RECENT:
            self.recent.popitem(last=False)
        # labels for batches before the new position can never join now
        while self._by_offset and self._by_offset[0][0] < self.next_offset:
            source_offset, batch_id = heapq.heappop(self._by_offset)
            buffered = self.labels.get(batch_id)
            if buffered is not None and buffered.batch.source_offset == source_offset:
                del self.labels[batch_id]

    def label_resume_offset(self, position: int) -> int:
        """Where to re-read labels after a restart: the oldest label still buffered."""
        return min((bl.offset for bl in self.labels.values()), default=position)

    @property
    def examples_full(self) -> bool:
        return len(self.examples) >= self.max_pending

    @property
    def labels_full(self) -> bool:
        return len(self.labels) >= self.max_pending
