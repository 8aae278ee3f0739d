"""A resumable replay (a position file) against the embedded broker: batches go out in
transactions with the position they bring the replay to, many batches per transaction, and a
restart resumes from the positions topic, whatever the position file says.

SIGKILLs of a real producer process are in ``tests/faults/test_producer_sigkill.py``.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from producers import position, recovery
from producers.service import run_producer
from tests.integration.workers import read_all

QUIET = {"handle_signals": False, "serve_http": False}
pytestmark = pytest.mark.both_brokers


def last_record(config) -> position.Position:
    topic = recovery.positions_topic(config.topics.examples)
    mine = [m for m in read_all(config, topic) if m.key() == config.producer.producer_id.encode()]
    assert mine, f"no record of {config.producer.producer_id} in {topic}"
    return position.Position.from_json(json.loads(mine[-1].value()), topic)


def test_the_committed_position_covers_every_batch_and_many_batches_share_a_transaction(
    make_config, read_back, tmp_path
):
    cfg = make_config(topics={"partitions": 3}, synthetic={"examples": 30_000})
    result = run_producer(cfg, "synthetic", position_file=tmp_path / "p.json", batch_size=100, **QUIET)
    n = result["batches"]
    assert result["examples"] == 30_000 and n >= 300
    assert 1 <= result["transactions"] <= n / 10, result

    stored = last_record(cfg)
    assert stored.delivered.watermark == 30_000 and stored.next_seq == n and stored.batches == n
    out = read_back(cfg, n)
    ends = {p: max(o for q, o, _ in out.batches if q == p) + 1 for p in range(3)}
    assert stored.offsets == ends  # where a restart reads the examples topic on from
    # The file is a copy of the last committed record.
    assert position.load(tmp_path / "p.json", "synthetic", "x").delivered.watermark == 30_000


def test_a_restart_resumes_from_the_topic_not_the_file(make_config, read_back, tmp_path):
    cfg = make_config(topics={"partitions": 2}, synthetic={"examples": 6_000})
    pos_file = tmp_path / "p.json"
    first = run_producer(cfg, "synthetic", position_file=pos_file, max_examples=2_500, batch_size=256, **QUIET)
    # A stale cache (as after a crash within its one-second cadence) and a missing one.
    position.save(pos_file, position.Position("synthetic", "x"))
    second = run_producer(cfg, "synthetic", position_file=pos_file, max_examples=2_000, batch_size=256, **QUIET)
    pos_file.unlink()
    third = run_producer(cfg, "synthetic", position_file=pos_file, batch_size=256, **QUIET)
    assert [first["examples"], second["examples"], third["examples"]] == [2_500, 2_000, 1_500]
    assert third["position"] == 6_000 and third["stopped"] == "end_of_data"

    out = read_back(cfg, first["batches"] + second["batches"] + third["batches"])
    assert np.array_equal(np.sort(out.ids), np.arange(6_000))  # no gap, no repeat
    assert sorted(b.seq for _, _, b in out.batches) == list(range(len(out.batches)))
    out.assert_time_order_per_partition()
    out.assert_users_stay_on_one_partition()


def test_a_file_without_a_topic_record_is_still_honoured(make_config, read_back, tmp_path):
    """The file is the fallback when the positions topic has no record of this producer (a
    file written before there was a positions topic)."""
    cfg = make_config(topics={"partitions": 2}, synthetic={"examples": 3_000})
    stored = position.Position("synthetic", "old", next_seq=7)
    stored.delivered.add(np.arange(1_000))
    position.save(tmp_path / "p.json", stored)
    result = run_producer(cfg, "synthetic", position_file=tmp_path / "p.json", batch_size=500, **QUIET)
    assert result["examples"] == 2_000 and result["position"] == 3_000
    out = read_back(cfg, result["batches"])
    assert np.array_equal(np.sort(out.ids), np.arange(1_000, 3_000))
    assert min(b.seq for _, _, b in out.batches) == 7
