"""The worker benches time a worker from its first records: the group join and the first fetch
are start-up, not a cost of each batch. The worker and its baseline take turns in slices."""

import time

import pytest

from bench.workers import side_by_side, timed_steps


class JoiningWorker:
    """A worker's ``poll`` as a bench sees it: it waits (up to ``timeout``) while the group is
    joined and the first fetch is on its way, then returns a record at every call."""

    def __init__(self, join_s: float):
        self.records_from = time.perf_counter() + join_s

    def poll(self, max_messages: int, timeout: float) -> list[str]:
        wait = self.records_from - time.perf_counter()
        if wait > 0:
            time.sleep(min(wait, timeout))
        return ["record"] if time.perf_counter() >= self.records_from else []


def ten_steps_of_5_ms(worker: JoiningWorker):
    """A worker's step (poll, then 5 ms of work per record) and its end: ten records trained."""
    trained: list[str] = []

    def step() -> bool:
        records = worker.poll(1, 5.0)  # through the worker's attribute, as the real steps poll
        time.sleep(0.005)
        trained.extend(records)
        return bool(records)

    return step, lambda: len(trained) >= 10


def test_the_window_opens_when_the_first_poll_returns_records():
    worker = JoiningWorker(join_s=1.0)
    step, done = ten_steps_of_5_ms(worker)
    seconds = timed_steps(step, done, worker=worker)
    assert 0.045 <= seconds < 0.9  # the ten steps, not the first poll's wait of a second


def test_without_a_worker_the_window_opens_at_the_first_step_that_did_work():
    worker = JoiningWorker(join_s=1.0)
    step, done = ten_steps_of_5_ms(worker)
    seconds = timed_steps(step, done)
    assert seconds >= 1.0  # that step's poll waited for the first records


class SteppingWorker(JoiningWorker):
    """A worker with a ``step``: a poll, then 2 ms of work per record; it logs its steps."""

    def __init__(self, join_s: float, log: list[str]):
        super().__init__(join_s)
        self.log, self.trained = log, 0

    def step(self) -> bool:
        records = self.poll(1, 0.1)  # polls that wait during the join
        time.sleep(0.002)
        self.trained += len(records)
        self.log.append("worker" if records else "joining")
        return True


def test_the_worker_and_its_baseline_take_turns_from_the_first_records():
    log: list[str] = []
    worker = SteppingWorker(join_s=0.5, log=log)

    batches: list[int] = []

    def base_step(i: int) -> int:  # twice the worker's speed: 1 ms an example
        time.sleep(0.001)
        log.append("base")
        batches.append(i)
        return 1

    def done() -> bool:
        return worker.trained >= 100

    measured = side_by_side(worker, lambda: worker.trained, base_step, 3, done, slice_s=0.05)
    assert batches == [i % 3 for i in range(len(batches))]  # the baseline's batches in turn, again and again
    assert measured.worker_examples == 100
    assert 0.2 <= measured.worker_s < 0.45  # its hundred steps, not the join's half second
    first = log.index("worker")
    assert first >= 3 and log[:first] == ["joining"] * first  # no baseline during the join
    sides = [side for i, side in enumerate(log) if side != "joining" and (i == 0 or log[i - 1] != side)]
    assert sides[:4] == ["worker", "base", "worker", "base"] and len(sides) >= 6  # slices, in turns
    assert measured.base_s == pytest.approx(0.05 * sides.count("base"), rel=0.5)
    assert 0.3 < measured.ratio < 0.75  # about 0.5: 2 ms against 1 ms an example
