"""The events source on the embedded broker: JSON events in, example batches out; bad events in
the DLQ with their reason; a restart goes on where the last transaction ended."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest

from distill.core import metrics as m
from distill.core.exceptions import ConfigError
from distill.core.service import Service
from distill.core.wire import Codec
from producers.events import EventsService, _Record
from producers.file import text_id
from producers.records import place
from tests.integration.producers.events_help import (
    create_topic,
    event,
    events_config,
    example_ids,
    examples,
    json_events,
    write_events,
)
from tests.integration.workers import read_all

GOOD = 600


def run_until_examples(svc: EventsService, examples_wanted: int, events_wanted: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while svc.counts["examples"] < examples_wanted or svc.counts["events"] < events_wanted:
        assert time.monotonic() < deadline, f"counts after {timeout}s: {svc.counts}"
        svc.step()


def service(cfg) -> EventsService:
    svc = EventsService(cfg, service=Service("producer", cfg.producer.producer_id))
    svc.start()
    return svc


BAD = {
    b"{not json": "undecodable",
    b"[1, 2]": "undecodable",
    json.dumps({k: v for k, v in event(10_001).items() if k != "clicked"}).encode(): "missing_field",
    json.dumps(event(10_002) | {"price": "cheap"}).encode(): "wrong_type",
    json.dumps(event(10_003) | {"ts": {"at": 1}}).encode(): "wrong_type",
    json.dumps(event(10_004) | {"dwell_s": float("nan")}).encode(): "non_finite",
}


def test_json_events_become_batches_and_bad_ones_dead_letters(make_config, unique_name):
    topic = unique_name("events")
    cfg = events_config(make_config, topic, topics={"partitions": 3})
    create_topic(cfg, topic, 3)
    good = json_events(range(GOOD))
    values = good[:300] + list(BAD) + good[300:]
    # Keyed by user, as a service would: a user's events are in order in one input partition.
    keys = [str(i % 50).encode() for i in range(300)] + [b"bad"] * len(BAD)
    keys += [str(i % 50).encode() for i in range(300, GOOD)]
    write_events(cfg, topic, values, keys=keys)
    rejected_before = m.EVENTS_REJECTED.labels(cfg.producer.producer_id, "undecodable")._value.get()

    svc = service(cfg)
    try:
        run_until_examples(svc, GOOD, len(values))
    finally:
        svc.close()

    batches = examples(cfg)
    ids = example_ids(batches)
    assert sorted(ids.tolist()) == list(range(GOOD)), "every good event once"
    assert svc.counts["rejected"] == len(BAD) and svc.counts["batches"] == len(batches)
    assert max(b.size for _, b in batches) <= cfg.producer.batch_size
    seen_user: dict[int, int] = {}
    for p, b in batches:
        assert b.categorical_names == ["user_id", "item", "context.device"] and b.task_names == ["clicked", "dwell_s"]
        for row, i in enumerate(b.example_ids.tolist()):
            e = event(i)
            assert b.categorical[row].tolist() == [e["user_id"], text_id(e["item"]), text_id(e["context"]["device"])]
            assert b.event_time_ms[row] == e["ts"]
            assert b.dense[row, 0] == np.float32(e["price"])
            assert b.labels[row].tolist() == [float(e["clicked"]), e["dwell_s"]]
            assert seen_user.setdefault(e["user_id"], p) == p, "a user's events stay on one partition"
    # A user's events keep their order (the events topic is keyed by event, not by user).
    for p in {p for p, _ in batches}:
        times = np.concatenate([b.event_time_ms for q, b in batches if q == p])
        users = np.concatenate([b.categorical[:, 0] for q, b in batches if q == p])
        for u in np.unique(users):
            assert (np.diff(times[users == u]) > 0).all()

    codec = Codec()
    letters = [codec.decode_dead_letter(x.value(), x.headers()) for x in read_all(cfg, f"{topic}.dlq")]
    assert sorted((d["payload"], d["reason"]) for d in letters) == sorted(BAD.items())
    assert all(d["source_topic"] == topic and d["worker"].startswith("events/") for d in letters)
    assert m.EVENTS_REJECTED.labels(cfg.producer.producer_id, "undecodable")._value.get() - rejected_before == 2


def test_restart_goes_on_after_the_last_transaction(make_config, unique_name):
    topic = unique_name("events")
    cfg = events_config(make_config, topic, producer={"partitioner": "round_robin"})
    create_topic(cfg, topic, 2)
    write_events(cfg, topic, json_events(range(0, 200)))
    svc = service(cfg)
    try:
        run_until_examples(svc, 200, 200)
    finally:
        svc.close()
    write_events(cfg, topic, json_events(range(200, 500)))
    again = service(cfg)
    try:
        run_until_examples(again, 300, 300)
    finally:
        again.close()
    assert again.counts["events"] == 300, "the second run reads only the new events"
    assert sorted(example_ids(examples(cfg)).tolist()) == list(range(500))


def test_a_mapping_that_does_not_match_the_config_fails_at_start(make_config, unique_name):
    topic = unique_name("events")
    with pytest.raises(ConfigError, match="features.dense"):
        EventsService(events_config(make_config, topic, events={"dense": ["price", "discount"]}))
    with pytest.raises(ConfigError, match="events.labels"):
        EventsService(events_config(make_config, topic, events={"labels": {"clicked": "clicked"}}))


def test_two_replicas_share_the_events_and_write_each_once(make_config, unique_name):
    """A second replica joins while the first is busy: the partitions it takes over are
    committed by the first before they move (on_revoke), so nothing is written twice."""
    topic = unique_name("events")
    cfg = events_config(make_config, topic, topics={"partitions": 2})
    create_topic(cfg, topic, 4)
    write_events(cfg, topic, json_events(range(0, 2000)), keys=[str(i % 97).encode() for i in range(2000)])
    first = service(cfg)
    second_cfg = cfg.model_copy(update={"producer": cfg.producer.model_copy(update={"producer_id": "replica-2"})})
    second = None
    try:
        deadline = time.monotonic() + 90
        while first.counts["examples"] == 0:
            assert time.monotonic() < deadline
            first.step()
        second = service(second_cfg)
        written = 2000
        # Events keep coming until the second replica has some (its partitions moved to it).
        while first.counts["examples"] + second.counts["examples"] < written or not second.counts["events"]:
            assert time.monotonic() < deadline, (first.counts, second.counts)
            if not second.counts["events"] or written < 4000:
                ids = range(written, written + 100)
                write_events(cfg, topic, json_events(ids), keys=[str(i % 97).encode() for i in ids])
                written += 100
            first.step()
            second.step()
    finally:
        first.close()
        if second is not None:
            second.close()
    ids = example_ids(examples(cfg))
    assert sorted(ids.tolist()) == list(range(written)), "each event once, over both replicas"
    assert second.counts["examples"] > 0, "the second replica took partitions over"


def test_a_partial_batch_goes_out_after_linger(make_config, unique_name):
    topic = unique_name("events")
    cfg = events_config(make_config, topic, producer={"batch_size": 1000, "linger_ms": 20})
    create_topic(cfg, topic, 1)
    write_events(cfg, topic, json_events(range(10)))
    svc = service(cfg)
    try:
        run_until_examples(svc, 10, 10)  # committed while the source runs: no close needed
        assert sorted(example_ids(examples(cfg, idle=0.5)).tolist()) == list(range(10))
    finally:
        svc.close()


def test_a_position_record_carries_what_the_run_has_not_read_yet(make_config, unique_name):
    # The embedded broker case of the SIGKILL storm, without the kills: a run recovered partition
    # 2's position and places an aborted-but-visible transaction delivered, then committed having
    # read only partitions 0 and 1. Its record must hand both on, or a run after it reads them again.
    svc = EventsService(events_config(make_config, unique_name("events")))
    delivered = {place(2, 960), place(2, 961)}
    svc.record = _Record(svc.pid, 5, {0: 10}, {0: 100, 1: 200, 2: 955}, sorted(delivered))
    svc.skip = set(delivered)
    svc.consumed = {0: 150, 1: 210}
    record = svc._next_record([])
    assert record.inputs == {0: 150, 1: 210, 2: 955}
    assert set(record.skip) == delivered
    _, value = record.encode()
    assert json.loads(value)["skip"] == sorted(delivered) and json.loads(value)["inputs"]["2"] == 955
