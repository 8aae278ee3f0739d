"""The out-of-sample rule: which checkpoint labels a batch, and what the labelers may still need."""

from __future__ import annotations

from teacher_worker.out_of_sample import lead_batches, newest_eligible, oldest_needed

# version -> per-partition trained-through offsets, as a trainer publishes them
HISTORY = [
    (0, {}),
    (1, {0: 5, 1: 2}),
    (2, {0: 9, 1: 2}),
    (3, {0: 9, 1: 7}),
]


def test_newest_checkpoint_that_never_trained_on_the_batch():
    assert newest_eligible(HISTORY, 0, 4) == 0  # versions 1.. trained on offset 4 of partition 0
    assert newest_eligible(HISTORY, 0, 5) == 1
    assert newest_eligible(HISTORY, 0, 100) == 3
    assert newest_eligible(HISTORY, 1, 6) == 2  # version 3 trained on offset 6 of partition 1
    assert newest_eligible(HISTORY, 2, 0) == 3  # never trained on partition 2: the newest


def test_nothing_eligible_when_every_kept_checkpoint_trained_on_it():
    assert newest_eligible(HISTORY[2:], 0, 4) is None
    assert newest_eligible([], 0, 4) is None


def test_every_eligible_checkpoint_is_out_of_sample():
    for partition in (0, 1, 2):
        for offset in range(12):
            i = newest_eligible(HISTORY, partition, offset)
            assert HISTORY[i][1].get(partition, 0) <= offset
            newer = HISTORY[i + 1 :]
            assert all(wm.get(partition, 0) > offset for _, wm in newer)


def test_oldest_needed_is_the_minimum_over_partitions():
    assert oldest_needed(HISTORY, {0: 9, 1: 7}, [0, 1]) == 3  # caught up
    assert oldest_needed(HISTORY, {0: 9, 1: 3}, [0, 1]) == 2  # partition 1 still needs version 2
    assert oldest_needed(HISTORY, {}, [0, 1]) == 0  # nothing committed: version 0
    assert oldest_needed(HISTORY, {}, [2]) == 3  # a partition never trained on needs only the newest
    assert oldest_needed(HISTORY[2:], {0: 1}, [0]) == 2  # behind every kept one: the oldest kept
    assert oldest_needed([], {}, [0]) is None


def test_lead_in_batches():
    assert lead_batches({0: 9, 1: 7}, {0: 4, 1: 7}) == 5
    assert lead_batches({0: 9}, {}) == 9
    assert lead_batches({0: 3}, {0: 8}) == 0  # labelers ahead of the last checkpoint: no lead
