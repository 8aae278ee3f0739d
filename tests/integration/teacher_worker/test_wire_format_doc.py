"""docs/wire-format.md is enough to write example batches: its worked example, run as it stands
on the page (plain fastavro, no project code), builds a batch that a teacher labels."""

from __future__ import annotations

import re
import struct
from pathlib import Path

import numpy as np
from confluent_kafka import Producer

from distill.core.kafka import Clients, ensure_topics
from distill.core.wire import SCHEMA_HEADER, ids_checksum
from teacher_worker.worker import TeacherWorker
from tests.integration.workers import read_labels, run_until

ROOT = Path(__file__).resolve().parents[3]
DOC = ROOT / "docs" / "wire-format.md"


def worked_example() -> tuple[str, dict[str, str]]:
    """The Python block of the worked example, and the hex of each packed column in its table."""
    text = DOC.read_text()
    section = text[text.index("## Worked example") :]
    code = re.search(r"```python\n(.*?)```", section, re.S)
    assert code, "the worked example has a Python block"
    table = dict(re.findall(r"^\| `(\w+)` \| `([0-9a-f ]+)` \|$", section, re.M))
    return code.group(1), {k: v.replace(" ", "") for k, v in table.items()}


def test_the_documented_batch_is_labelled_by_a_teacher(make_config, monkeypatch):
    code, packed = worked_example()
    monkeypatch.chdir(ROOT)  # the example opens schemas/ relative to the repository
    scope: dict = {}
    exec(compile(code, str(DOC), "exec"), scope)  # noqa: S102 (the page's own example)
    record, value, headers, key = scope["record"], scope["value"], scope["headers"], scope["key"]
    # The page's hex table and fingerprint are what its code produces.
    assert set(packed) == {"event_time_ms", "example_ids", "categorical", "dense", "labels"}
    assert all(record[name].hex() == hex_ for name, hex_ in packed.items())
    assert headers == [(SCHEMA_HEADER, b"fd24facfaf221b16")]
    assert "`fd24facfaf221b16`" in DOC.read_text()

    config = make_config(
        topics={"partitions": 1},
        features={
            "categorical": [{"name": "user_id", "buckets": 101}, {"name": "item_id", "buckets": 101}],
            "dense": ["ctx0"],
        },
        tasks=[{"name": "click", "type": "binary"}],
        students=[],
    )
    ensure_topics(config, Clients(config.kafka, "test-admin").admin(), seconds=20)
    producer = Producer({"bootstrap.servers": config.kafka.bootstrap_servers})
    producer.produce(config.topics.examples, key=key, value=value, headers=headers, partition=0)
    assert producer.flush(10) == 0

    teacher = TeacherWorker(config)
    teacher.start()
    try:
        run_until(lambda: teacher.examples_labeled >= 2, [teacher.step], timeout=60)
    finally:
        teacher.close()
    labels = read_labels(config)
    assert len(labels) == 1
    _, _, label = labels[0]
    ids = struct.unpack("<2q", record["example_ids"])
    assert label.batch_id == "checkout-service-0-17" and label.source_offset == 0
    assert label.example_ids_checksum == ids_checksum(np.array(ids, dtype=np.int64))
    assert label.logits.shape == (2, 1) and label.task_names == ["click"]
