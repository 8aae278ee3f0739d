"""The worker benches time a worker from its first records: the group join and the first fetch
are start-up, not a cost of each batch."""

import time

from bench.workers import timed_steps


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
