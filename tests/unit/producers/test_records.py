"""The events mapping: the file source's value rules applied to one event at a time, each bad
event refused alone with a reason; the worked config of docs/events.md is accepted."""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path

import numpy as np
import pytest

from distill.core.config import EventsConfig, load_config
from distill.core.exceptions import ConfigError, DecodeError
from producers.events import check_mapping
from producers.file import text_id
from producers.records import Mapper, json_decoder, place, to_chunk

ROOT = Path(__file__).resolve().parents[3]
CFG = EventsConfig(
    example_id="id",
    event_time="ts",
    user="user",
    categorical=["user", "item", "ctx.device"],
    dense=["price"],
    labels={"click": "clicked", "watch": "watched"},
)
GOOD = {
    "id": 5,
    "ts": 1_750_000_000,
    "user": "u-1",
    "item": 42,
    "ctx": {"device": "ios"},
    "price": 2.5,
    "clicked": True,
    "watched": 0.25,
}


def row(record, cfg=CFG, policy="reject", tasks=("click", "watch")):
    return Mapper(cfg, list(tasks), policy).row(record, place(3, 17))


def test_values_follow_the_file_source_rules():
    r = row(GOOD)
    assert r.example_id == 5 and r.user == text_id("u-1")
    assert r.event_time_ms == 1_750_000_000_000, "epoch seconds become ms"
    assert r.categorical == [text_id("u-1"), 42, text_id("ios")]
    assert r.dense == [2.5] and r.labels == [1.0, 0.25]
    assert row(GOOD | {"item": "42"}).categorical[1] == 42, "text that is an integer is that integer"
    assert row(GOOD | {"ts": "2025-06-15T15:06:40Z"}).event_time_ms == 1_750_000_000_000
    assert row(GOOD | {"ts": 1_750_000_000_123}).event_time_ms == 1_750_000_000_123
    bare = EventsConfig(categorical=["user"], labels={"click": "clicked"})
    r = row(GOOD, bare, tasks=("click",))
    assert r.example_id == r.user == place(3, 17), "unmapped: the event's place, and the user is the id"


def test_the_labels_follow_the_tasks_order():
    assert row(GOOD, tasks=("watch", "click")).labels == [0.25, 1.0]
    with pytest.raises(ConfigError, match="events.labels"):
        Mapper(CFG, ["click"], "reject")


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"clicked": None}, "missing_field"),
        ({"ctx": {}}, "missing_field"),
        ({"price": "cheap"}, "wrong_type"),
        ({"price": [1]}, "wrong_type"),
        ({"id": 1.5}, "wrong_type"),
        ({"id": 2**70}, "wrong_type"),
        ({"ts": True}, "wrong_type"),
        ({"ts": "yesterday"}, "wrong_type"),
        ({"ts": 1e300}, "wrong_type"),
        ({"item": {"a": 1}}, "wrong_type"),
        ({"watched": float("nan")}, "non_finite"),
        ({"price": float("inf")}, "non_finite"),
    ],
)
def test_a_bad_event_is_refused_with_its_reason(change, reason):
    with pytest.raises(DecodeError) as exc:
        row(GOOD | change)
    assert exc.value.reason == reason


def test_non_finite_dense_values_follow_wire_non_finite():
    assert row(GOOD | {"price": float("nan")}, policy="zero").dense == [0.0]
    assert np.isinf(row(GOOD | {"price": float("inf")}, policy="allow").dense[0])
    with pytest.raises(DecodeError, match="non_finite"):
        row(GOOD | {"clicked": float("inf")}, policy="allow")  # labels: always finite


def test_json_decoder_refuses_what_is_not_an_object():
    decode = json_decoder()
    assert decode(json.dumps(GOOD).encode()) == GOOD
    for value, reason in (
        (b"", "empty"),
        (None, "empty"),
        (b"{", "undecodable"),
        (b"[1]", "undecodable"),
        (b"\xff\xfe", "undecodable"),
    ):
        with pytest.raises(DecodeError) as exc:
            decode(value)
        assert exc.value.reason == reason


def test_rows_become_one_chunk():
    rows = [row(GOOD | {"id": i}) for i in range(3)]
    chunk = to_chunk(rows, 3, 1, 2)
    assert chunk.example_ids.tolist() == [0, 1, 2] and chunk.categorical.shape == (3, 3)
    assert chunk.positions.tolist() == [place(3, 17)] * 3 and chunk.labels.dtype == np.float32


def test_the_worked_config_of_the_events_doc_is_accepted():
    text = (ROOT / "docs" / "events.md").read_text()
    toml = re.search(r"```toml\n(.*?)```", text, re.S).group(1)
    cfg = load_config(None, environ={}, **tomllib.loads(toml))
    check_mapping(cfg)
    event = json.loads(re.search(r"```json\n(.*?)```", text, re.S).group(1))
    r = Mapper(cfg.events, [t.name for t in cfg.tasks], "reject").row(event, 0)
    assert r.categorical == [7, text_id("sku-42"), text_id("ios")] and r.labels == [1.0, 3.2]
