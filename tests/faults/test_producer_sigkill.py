"""A replaying producer SIGKILLed at random points and restarted each time: every source
position is in the examples topic exactly once.

The producer runs as a real process (``distill produce synthetic --position-file``) against the
embedded broker over TCP. It is killed at a random moment after it turns ready, at least
``KILLS`` times, then runs to the end of the data. The examples topic is then read
read_committed and nothing is de-duplicated: each position 0..N-1 must appear once.

The embedded broker shows aborted transactions to read_committed readers, so this count
includes the batches of every transaction a kill cut short. It is still exact, with no
de-duplication by batch id, because recovery counts whatever a reader can see as delivered
(``producers.recovery``). On Apache Kafka those batches are hidden and sent again instead.
"""

from __future__ import annotations

import json
import random
import time

import numpy as np
import pytest

from distill.core.wire import Codec
from tests.integration.workers import read_all, write_config

EXAMPLES = 60_000
RATE = 8_000  # examples/s: the replay lasts long enough for the kills
KILLS = 6


@pytest.mark.both_brokers
def test_sigkill_during_replay_sends_every_position_exactly_once(make_config, workers, tmp_path):
    cfg = make_config(topics={"partitions": 4}, synthetic={"examples": EXAMPLES})
    path = write_config(cfg, tmp_path / "config.yaml")
    args = ["produce", "synthetic", "--config", str(path), "--rate", str(RATE), "--batch-size", "256"]
    args += ["--linger-ms", "20", "--position-file", str(tmp_path / "position.json")]
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    log = tmp_path / "producer.log"
    context = f"seed {seed}"

    for kill in range(KILLS):
        producer = workers(args, log)
        producer.wait_ready(timeout=30)
        time.sleep(rng.uniform(0.0, 1.0))
        assert producer.alive(), f"{context}: the replay ended before kill {kill + 1}:\n{producer.tail()}"
        producer.proc.kill()
        producer.proc.wait(10)

    last = workers(args, log)
    last.proc.wait(60)
    assert last.proc.returncode == 0, f"{context}:\n{last.tail()}"
    summary = next(r for r in map(_json, reversed(log.read_text().splitlines())) if "stopped" in r)
    assert summary["stopped"] == "end_of_data" and summary["position"] == EXAMPLES, summary

    codec = Codec()
    batches = [codec.decode_examples(m.value(), m.headers()) for m in read_all(cfg, cfg.topics.examples)]
    ids = np.concatenate([b.example_ids for b in batches])  # the synthetic source's ids are its positions
    counts = np.bincount(ids, minlength=EXAMPLES)
    repeated, missing = int((counts > 1).sum()), int((counts == 0).sum())
    assert (repeated, missing) == (0, 0), f"{context}: {repeated} positions repeated, {missing} missing"
    batch_ids = [b.batch_id for b in batches]
    assert len(set(batch_ids)) == len(batch_ids), f"{context}: a batch id appears twice"
    # The kills cut into the replay: it took several runs (each run's batch ids differ).
    assert len({i.rsplit("-", 2)[-2] for i in batch_ids}) >= 3, context


def _json(line: str) -> dict:
    try:
        return json.loads(line)
    except ValueError:
        return {}
