"""The per-partition join of examples and teacher labels: pure logic, explicit clocks, no sleeps."""

from __future__ import annotations

import numpy as np
import pytest

from distill.core.wire import ExampleBatch, LabelBatch, ids_checksum
from student_worker.join import PartitionJoin

WAIT = 5.0


@pytest.fixture
def examples(make_batch):
    """``examples(seq)`` -> the ExampleBatch with batch id ``test-producer-<seq>``."""

    def make(seq: int) -> ExampleBatch:
        return make_batch(n=4, seq=seq)

    return make


def label_for(batch: ExampleBatch, source_offset: int, version: int = 1) -> LabelBatch:
    return LabelBatch(
        batch_id=batch.batch_id,
        example_ids_checksum=ids_checksum(batch.example_ids),
        source_partition=0,
        source_offset=source_offset,
        teacher_version=version,
        watermark=source_offset,
        task_names=list(batch.task_names),
        logits=np.full((batch.size, len(batch.task_names)), float(version), dtype=np.float32),
    )


def new_join(next_offset: int = 0, max_pending: int = 8, label_wait_s: float | None = None) -> PartitionJoin:
    return PartitionJoin(
        partition=0,
        next_offset=next_offset,
        label_wait_s=WAIT if label_wait_s is None else label_wait_s,
        max_pending=max_pending,
    )


def outcomes(ready) -> list[tuple[str, int]]:
    return [(r.outcome, r.examples.offset) for r in ready]


# -- joining -----------------------------------------------------------------------------------


def test_examples_then_label_join(examples):
    join = new_join()
    b = examples(0)
    assert join.add_examples(b, offset=0, now=0.0)
    assert join.pop_ready(now=1.0) == []  # waits for its label
    assert join.add_label(label_for(b, 0), offset=100, now=2.0, message="raw") is None
    ready = join.pop_ready(now=2.0)
    assert outcomes(ready) == [("joined", 0)]
    assert ready[0].examples.batch is b
    assert ready[0].label.batch.batch_id == b.batch_id
    assert ready[0].label.offset == 100 and ready[0].label.message == "raw"
    assert join.next_offset == 1
    assert join.labels == {} and not join.examples


def test_label_then_examples_join(examples):
    join = new_join()
    b = examples(0)
    assert join.add_label(label_for(b, 0), offset=7, now=0.0) is None
    assert join.pop_ready(now=100.0) == []  # a label alone is never ready
    assert join.add_examples(b, offset=0, now=100.0)
    ready = join.pop_ready(now=100.0)  # no wait at all: the label is already there
    assert outcomes(ready) == [("joined", 0)]
    assert ready[0].label.offset == 7
    assert join.next_offset == 1


def test_a_label_for_a_later_batch_means_the_head_label_will_not_come(examples):
    """One teacher labels a partition in offset order: once b1's label is there, b0's never
    will be, so b0 trains on hard labels at once instead of waiting label_wait."""
    join = new_join()
    b0, b1, b2 = examples(0), examples(1), examples(2)
    for off, b in enumerate((b0, b1, b2)):
        join.add_examples(b, off, now=0.0)
    join.add_label(label_for(b1, 1), 51, now=0.5)
    join.add_label(label_for(b2, 2), 52, now=0.5)
    assert outcomes(join.pop_ready(now=0.5)) == [("missing", 0), ("joined", 1), ("joined", 2)]
    assert join.next_offset == 3
    assert join.add_label(label_for(b0, 0), 50, now=1.5) == "late"


def test_a_slow_teacher_is_waited_for_while_its_labels_flow(examples):
    join = new_join(label_wait_s=1.0)
    b0, b1 = examples(0), examples(1)
    join.add_examples(b0, 0, now=0.0)
    join.add_examples(b1, 1, now=0.0)
    join.add_label(label_for(b0, 0), 50, now=0.9)
    assert outcomes(join.pop_ready(now=0.9)) == [("joined", 0)]
    # b1 arrived 1.5 s ago, but a label came 0.6 s ago: the teacher is alive, keep waiting
    assert join.pop_ready(now=1.5) == []
    assert outcomes(join.pop_ready(now=2.0)) == [("missing", 1)]  # labels stopped for label_wait


# -- missing -----------------------------------------------------------------------------------


def test_label_wait_timeout_makes_missing(examples):
    join = new_join()
    b0, b1 = examples(0), examples(1)
    join.add_examples(b0, 0, now=10.0)
    join.add_examples(b1, 1, now=12.0)
    assert join.pop_ready(now=10.0 + WAIT - 0.001) == []
    ready = join.pop_ready(now=10.0 + WAIT)
    assert outcomes(ready) == [("missing", 0)]  # b1 has waited only 3 s
    assert ready[0].label is None
    assert join.next_offset == 1
    assert outcomes(join.pop_ready(now=12.0 + WAIT)) == [("missing", 1)]
    assert join.next_offset == 2


def test_timed_out_head_releases_labelled_batches_behind_it(examples):
    join = new_join()
    b0, b1 = examples(0), examples(1)
    join.add_examples(b0, 0, now=0.0)
    join.add_examples(b1, 1, now=4.0)
    join.add_label(label_for(b1, 1), 9, now=4.0)
    assert outcomes(join.pop_ready(now=WAIT)) == [("missing", 0), ("joined", 1)]


def test_zero_label_wait_never_waits(examples):
    join = PartitionJoin(0, 0, label_wait_s=0.0, max_pending=4)
    join.add_examples(examples(0), 0, now=3.0)
    assert outcomes(join.pop_ready(now=3.0)) == [("missing", 0)]


def test_buffer_bound_forces_missing(examples):
    max_pending = 2
    join = new_join(max_pending=max_pending)
    for off in range(2 * max_pending):
        join.add_examples(examples(off), off, now=0.0)
    assert join.examples_full
    assert join.pop_ready(now=0.0) == []  # at the bound: still waiting
    join.add_examples(examples(4), 4, now=0.0)  # one more than 2 * max_pending
    assert outcomes(join.pop_ready(now=0.0)) == [("missing", 0)]  # exactly down to the bound
    assert len(join.examples) == 2 * max_pending
    for off in (5, 6):
        join.add_examples(examples(off), off, now=0.0)
    assert outcomes(join.pop_ready(now=0.0)) == [("missing", 1), ("missing", 2)]
    assert [p.offset for p in join.examples] == [3, 4, 5, 6]


def test_drain_returns_everything_pending(examples):
    join = new_join()
    b0, b1 = examples(0), examples(1)
    join.add_examples(b0, 0, now=0.0)
    join.add_examples(b1, 1, now=0.0)
    join.add_label(label_for(b1, 1), 3, now=0.0)
    assert outcomes(join.drain()) == [("missing", 0), ("joined", 1)]
    assert join.next_offset == 2 and not join.examples


# -- late and duplicate ------------------------------------------------------------------------


def test_label_after_its_batch_trained_without_one_is_late(examples):
    join = new_join()
    b = examples(0)
    join.add_examples(b, 0, now=0.0)
    assert outcomes(join.pop_ready(now=WAIT)) == [("missing", 0)]
    assert join.add_label(label_for(b, 0), 20, now=WAIT + 1) == "late"
    assert join.labels == {}


def test_label_behind_the_position_without_history_is_late(examples):
    # e.g. after a restart from a checkpoint at offset 10: the batch at 3 was trained long ago
    join = new_join(next_offset=10)
    assert join.add_label(label_for(examples(3), 3), 40, now=0.0) == "late"
    assert join.labels == {}


def test_second_label_for_a_buffered_batch_is_duplicate(examples):
    join = new_join()
    b = examples(0)
    assert join.add_label(label_for(b, 0, version=1), 10, now=0.0) is None
    assert join.add_label(label_for(b, 0, version=2), 11, now=0.0) == "duplicate"
    join.add_examples(b, 0, now=0.0)
    ready = join.pop_ready(now=0.0)
    assert outcomes(ready) == [("joined", 0)]
    assert ready[0].label.offset == 10  # the first label is the one that joins
    assert ready[0].label.batch.teacher_version == 1


def test_second_label_for_a_joined_batch_is_duplicate(examples):
    join = new_join()
    b0, b1 = examples(0), examples(1)
    join.add_examples(b0, 0, now=0.0)
    join.add_label(label_for(b0, 0), 10, now=0.0)
    assert outcomes(join.pop_ready(now=0.0)) == [("joined", 0)]
    assert join.add_label(label_for(b0, 0), 11, now=1.0) == "duplicate"
    # still told apart after more batches went by
    join.add_examples(b1, 1, now=1.0)
    assert outcomes(join.pop_ready(now=1.0 + WAIT)) == [("missing", 1)]
    assert join.add_label(label_for(b0, 0), 12, now=9.0) == "duplicate"
    assert join.add_label(label_for(b1, 1), 13, now=9.0) == "late"


# -- offsets -----------------------------------------------------------------------------------


def test_replayed_examples_below_next_offset_are_ignored(examples):
    join = new_join(next_offset=10)
    assert not join.add_examples(examples(5), 5, now=0.0)
    assert not join.add_examples(examples(9), 9, now=0.0)
    assert not join.examples
    assert join.add_examples(examples(10), 10, now=0.0)
    assert not join.add_examples(examples(10), 10, now=0.0)  # the same offset again while pending
    assert [p.offset for p in join.examples] == [10]
    assert outcomes(join.pop_ready(now=WAIT)) == [("missing", 10)]
    assert not join.add_examples(examples(10), 10, now=WAIT)  # already trained
    assert join.add_examples(examples(11), 11, now=WAIT)


def test_skip_moves_past_a_dead_lettered_batch(examples):
    join = new_join(next_offset=4)
    join.skip(4)
    assert join.next_offset == 5
    assert not join.add_examples(examples(4), 4, now=0.0)
    join.skip(5)
    join.skip(6)
    assert join.next_offset == 7
    join.skip(2)  # an old offset never moves the position back
    assert join.next_offset == 7


def test_skip_with_examples_pending_ahead_of_it(examples):
    join = new_join()
    b0 = examples(0)
    join.add_examples(b0, 0, now=0.0)
    join.skip(1)  # the batch at 1 went to the DLQ while 0 waits for its label
    assert join.next_offset == 0  # 0 is not trained yet: the position must not pass it
    join.add_label(label_for(b0, 0), 30, now=1.0)
    assert outcomes(join.pop_ready(now=1.0)) == [("joined", 0)]
    assert join.next_offset == 2  # past 0 and the dead-lettered 1
    assert not join.add_examples(examples(1), 1, now=1.0)


def test_skip_between_pending_batches(examples):
    join = new_join()
    b0, b2 = examples(0), examples(2)
    join.add_examples(b0, 0, now=0.0)
    join.skip(1)
    join.add_examples(b2, 2, now=0.0)
    assert outcomes(join.pop_ready(now=WAIT)) == [("missing", 0), ("missing", 2)]
    assert join.next_offset == 3


def test_label_resume_offset_is_the_oldest_buffered_label(examples):
    join = new_join()
    assert join.label_resume_offset(position=77) == 77  # nothing buffered
    b0, b1, b2 = examples(0), examples(1), examples(2)
    join.add_label(label_for(b1, 1), 21, now=0.0)
    join.add_label(label_for(b0, 0), 20, now=0.0)
    join.add_label(label_for(b2, 2), 25, now=0.0)
    assert join.label_resume_offset(position=26) == 20
    join.add_examples(b0, 0, now=0.0)
    assert outcomes(join.pop_ready(now=0.0)) == [("joined", 0)]
    assert join.label_resume_offset(position=26) == 21
    for off, b in ((1, b1), (2, b2)):
        join.add_examples(b, off, now=0.0)
    join.pop_ready(now=0.0)
    assert join.label_resume_offset(position=26) == 26


def test_labels_falling_behind_the_position_are_dropped(examples):
    join = new_join()
    b0, b1, b2 = examples(0), examples(1), examples(2)
    orphan = label_for(b1, 1)  # its example batch will be dead-lettered
    join.add_label(label_for(b0, 0), 10, now=0.0)
    join.add_label(orphan, 11, now=0.0)
    join.add_label(label_for(b2, 2), 12, now=0.0)
    assert join.labels_full is False and len(join.labels) == 3
    join.add_examples(b0, 0, now=0.0)
    join.skip(1)
    join.add_examples(b2, 2, now=0.0)
    assert outcomes(join.pop_ready(now=0.0)) == [("joined", 0), ("joined", 2)]
    assert join.labels == {}  # the orphan can never join: not kept forever
    assert join.label_resume_offset(position=13) == 13


def test_labels_behind_a_missing_batch_are_dropped_too(examples):
    join = new_join()
    b0, b1 = examples(0), examples(1)
    stale = label_for(examples(9), 0)  # a label whose batch id never shows up at offset 0
    join.add_label(stale, 5, now=0.0)
    join.add_label(label_for(b1, 1), 6, now=0.0)
    join.add_examples(b0, 0, now=0.0)
    assert outcomes(join.pop_ready(now=WAIT)) == [("missing", 0)]
    assert set(join.labels) == {b1.batch_id}
    assert join.label_resume_offset(position=7) == 6


def test_full_flags(examples):
    join = new_join(max_pending=2)
    assert not join.examples_full and not join.labels_full
    join.add_examples(examples(0), 0, now=0.0)
    join.add_examples(examples(1), 1, now=0.0)
    assert join.examples_full
    join.add_label(label_for(examples(5), 5), 1, now=0.0)
    join.add_label(label_for(examples(6), 6), 2, now=0.0)
    assert join.labels_full


def test_a_label_is_checked_against_its_pending_batch_wherever_it_waits(examples):
    join = new_join()
    b0, b1 = examples(0), examples(1)
    join.add_examples(b0, 0, now=0.0)
    join.add_examples(b1, 1, now=0.0)
    wrong = label_for(b1, 1)
    wrong.example_ids_checksum += 1
    assert join.add_label(wrong, 20, now=0.0) == "mismatch"  # behind the head, still found
    assert join.labels == {}
    assert outcomes(join.pop_ready(now=WAIT)) == [("missing", 0), ("missing", 1)]
    assert join.add_label(wrong, 21, now=WAIT) == "late"  # trained: no longer pending
