"""Avro events in the Schema Registry wire format, written by Confluent's own AvroSerializer
(what a Java, Go or Python service uses), read by the events source through the registry:
two schema versions in one topic, resolved to the reader schema; an incompatible version is
refused by the registry; unknown schema ids and broken bodies go to the DLQ.

The registry is ``tests/registry/server.py`` over real HTTP (Apicurio's jars cannot be
resolved here; see that module)."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
from confluent_kafka.schema_registry import SchemaRegistryClient, SchemaRegistryError
from confluent_kafka.schema_registry.avro import AvroSerializer
from confluent_kafka.serialization import MessageField, SerializationContext

from distill.core.service import Service
from distill.core.wire import Codec
from producers.events import EventsService
from tests.integration.producers.events_help import LAYOUT, create_topic, event, events_config, examples, write_events
from tests.integration.workers import read_all
from tests.registry.server import RegistryServer

V1 = {
    "type": "record",
    "name": "Impression",
    "namespace": "shop.events",
    "fields": [
        {"name": "event_id", "type": "long"},
        {"name": "ts", "type": "long"},
        {"name": "user_id", "type": "long"},
        {"name": "item", "type": "string"},
        {
            "name": "context",
            "type": {"type": "record", "name": "Context", "fields": [{"name": "device", "type": "string"}]},
        },
        {"name": "price", "type": "double"},
        {"name": "clicked", "type": "boolean"},
        {"name": "dwell_s", "type": "double"},
    ],
}
# v2 adds a discount with a default: BACKWARD compatible, and v1 events read as discount 0.
V2 = V1 | {"fields": [*V1["fields"], {"name": "discount", "type": "double", "default": 0.0}]}
# v3 adds a field without a default: a v1 event cannot be read with it.
V3 = V1 | {"fields": [*V1["fields"], {"name": "coupon", "type": "string"}]}


@pytest.fixture
def registry():
    with RegistryServer() as server:
        yield server


def serializer(url: str, schema: dict) -> AvroSerializer:
    return AvroSerializer(SchemaRegistryClient({"url": url}), json.dumps(schema))


def test_avro_events_of_two_schema_versions(make_config, unique_name, registry, tmp_path):
    topic = unique_name("events")
    reader = tmp_path / "impression.v2.avsc"
    reader.write_text(json.dumps(V2))
    features = {"categorical": LAYOUT["features"]["categorical"], "dense": ["price", "discount"]}
    cfg = events_config(
        make_config,
        topic,
        features=features,
        events={
            "format": "avro",
            "dense": ["price", "discount"],
            "schema_registry": {"url": registry.url, "reader_schema": str(reader)},
        },
    )
    create_topic(cfg, topic, 2)
    ctx = SerializationContext(topic, MessageField.VALUE)
    v1, v2 = serializer(registry.url, V1), serializer(registry.url, V2)
    values = [v1(event(i), ctx) for i in range(0, 150)]
    values += [v2(event(i) | {"discount": i / 1000}, ctx) for i in range(150, 300)]
    ids = {int.from_bytes(v[1:5], "big") for v in values}
    assert len(ids) == 2 and registry.registry.subjects[f"{topic}-value"] == sorted(ids)
    with pytest.raises(SchemaRegistryError) as refused:
        serializer(registry.url, V3)(event(0) | {"coupon": "x"}, ctx)
    assert refused.value.http_status_code == 409

    unknown = b"\x00" + (999).to_bytes(4, "big") + values[0][5:]
    bad = {unknown: "unknown_schema", values[0][:9]: "undecodable", json.dumps(event(1)).encode(): "undecodable"}
    write_events(cfg, topic, values + list(bad))

    svc = EventsService(cfg, service=Service("producer", cfg.producer.producer_id))
    svc.start()
    try:
        deadline = time.monotonic() + 60
        while svc.counts["examples"] < 300 or svc.counts["events"] < 303:
            assert time.monotonic() < deadline, svc.counts
            svc.step()
    finally:
        svc.close()

    batches = examples(cfg)
    got = {int(i): b.dense[r] for _, b in batches for r, i in enumerate(b.example_ids)}
    assert sorted(got) == list(range(300))
    for i, dense in got.items():
        assert dense.tolist() == [np.float32(event(i)["price"]), np.float32(0.0 if i < 150 else i / 1000)]
    # Each writer schema was fetched from the registry by its id, once.
    fetched = [p for method, p in registry.registry.requests if method == "GET" and p.startswith("/schemas/ids/")]
    assert sorted(fetched) == sorted({f"/schemas/ids/{i}" for i in ids} | {"/schemas/ids/999"})

    codec = Codec()
    letters = [codec.decode_dead_letter(m.value(), m.headers()) for m in read_all(cfg, f"{topic}.dlq")]
    assert sorted((d["payload"], d["reason"]) for d in letters) == sorted(bad.items())


def test_an_unreachable_registry_fails_the_start_naming_it(make_config, unique_name, monkeypatch):
    from distill.core.exceptions import BrokerError
    from distill.local.broker import free_port
    from producers import events

    monkeypatch.setattr(events, "REGISTRY_WAIT_S", 1.0)
    topic = unique_name("events")
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    cfg = events_config(make_config, topic, events={"format": "avro", "schema_registry": {"url": url}})
    create_topic(cfg, topic, 1)
    with pytest.raises(BrokerError, match=f"schema registry at {url}.*unreachable"):
        EventsService(cfg, service=Service("producer", cfg.producer.producer_id)).start()
