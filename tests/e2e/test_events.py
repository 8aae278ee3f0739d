"""A service's Avro events through the whole pipeline: `distill produce events` (reading them
through a Schema Registry), `distill teacher` and `distill student`, each a real process on the
embedded broker. Every good event is trained on once, every batch labelled once; the bad
events are in the DLQ and nothing else is touched."""

from __future__ import annotations

import json
import time

from confluent_kafka.schema_registry import SchemaRegistryClient
from confluent_kafka.schema_registry.avro import AvroSerializer
from confluent_kafka.serialization import MessageField, SerializationContext

from distill.core.kafka import Clients, partition_count
from distill.core.wire import Codec
from distill.local.broker import free_port
from tests.integration.producers.events_help import create_topic, event, events_config, write_events
from tests.integration.producers.test_events_avro import V1, V2
from tests.integration.workers import read_all, spawn, stop, write_config
from tests.registry.server import RegistryServer

EVENTS = 1_500


def _read(cfg, topic: str) -> list:
    """The topic's committed messages; none while the source has not created it yet."""
    if not partition_count(Clients(cfg.kafka, "test-admin").admin(), topic):
        return []
    return read_all(cfg, topic, idle=0.5)


def _last(path) -> dict:
    lines = path.read_text().splitlines() if path.exists() else []
    return json.loads(lines[-1]) if lines else {}


def test_avro_events_are_labelled_and_trained_on_once(make_config, unique_name, tmp_path):
    topic = unique_name("events")
    with RegistryServer() as registry:
        reader = tmp_path / "impression.avsc"
        reader.write_text(json.dumps(V2))
        cfg = events_config(
            make_config,
            topic,
            features={"categorical": [{"name": "user_id"}, {"name": "item"}, {"name": "context.device"}], "dense": []},
            events={
                "format": "avro",
                "dense": [],
                "schema_registry": {"url": registry.url, "reader_schema": str(reader)},
            },
            students=[{"name": "aux", "mode": "aux", "label_wait_s": 1.0, "checkpoint": {"every_seconds": 1.0}}],
            producer={"batch_size": 100},
        )
        create_topic(cfg, topic, 2)
        ctx = SerializationContext(topic, MessageField.VALUE)
        client = SchemaRegistryClient({"url": registry.url})
        v1, v2 = AvroSerializer(client, json.dumps(V1)), AvroSerializer(client, json.dumps(V2))
        values = [(v1 if i % 2 else v2)(event(i), ctx) for i in range(EVENTS)]
        bad = [b"\x00\x00\x00\x03\xe7" + values[0][5:], b"plain text", values[1][:7]]
        write_events(cfg, topic, values[:700] + bad + values[700:], keys=None)

        path = write_config(cfg, tmp_path / "config.yaml")
        logs = {name: tmp_path / f"{name}.log" for name in ("events", "teacher", "student")}
        procs = {
            "events": spawn(
                ["produce", "events", "--config", str(path), "--metrics-port", str(free_port())], logs["events"]
            ),
            "teacher": spawn(["teacher", "--config", str(path), "--device", "cpu"], logs["teacher"]),
            "student": spawn(["student", "--name", "aux", "--config", str(path)], logs["student"]),
        }
        codec = Codec()
        try:
            deadline = time.monotonic() + 120
            while True:
                for name, proc in procs.items():
                    assert proc.poll() is None, f"{name} exited:\n{logs[name].read_text()[-3000:]}"
                batches = [codec.decode_examples(m.value(), m.headers()) for m in _read(cfg, cfg.topics.examples)]
                labels = [codec.decode_labels(m.value(), m.headers()) for m in _read(cfg, cfg.topics.labels)]
                if sum(b.size for b in batches) >= EVENTS and len(labels) >= len(batches):
                    break
                assert time.monotonic() < deadline, f"{sum(b.size for b in batches)} examples, {len(labels)} labels"
                time.sleep(1.0)
            progress = cfg.progress_dir() / "student-aux.jsonl"
            while _last(progress).get("examples_trained", 0) < EVENTS:  # the student trains the last ones
                assert procs["student"].poll() is None and time.monotonic() < deadline, _last(progress)
                time.sleep(0.5)
        finally:
            codes = {name: stop(proc, 60) for name, proc in procs.items()}
    assert codes == {"events": 0, "teacher": 0, "student": 0}, codes

    ids = sorted(int(i) for b in batches for i in b.example_ids)
    assert ids == list(range(EVENTS)), "every good event once"
    assert sorted(lb.batch_id for lb in labels) == sorted(b.batch_id for b in batches), "each batch labelled once"
    summary = json.loads((cfg.progress_dir() / "student-aux.summary.json").read_text())
    assert summary["examples_trained"] == EVENTS and summary["duplicate"] == 0, summary
    produced = json.loads(
        next(line for line in reversed(logs["events"].read_text().splitlines()) if '"rejected"' in line)
    )
    assert produced["rejected"] == len(bad) and produced["examples"] == EVENTS, produced
    letters = [codec.decode_dead_letter(m.value(), m.headers()) for m in read_all(cfg, f"{topic}.dlq")]
    assert sorted(d["reason"] for d in letters) == ["undecodable", "undecodable", "unknown_schema"]
