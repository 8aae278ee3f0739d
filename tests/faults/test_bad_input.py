"""Bad input injected by an independent client while the pipeline runs: every kind ends in
the DLQ with its reason, no worker exits, and the good traffic around it is untouched."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections import Counter

import numpy as np
from confluent_kafka import Producer

from distill.core.wire import SCHEMA_HEADER, Codec, LabelBatch
from tests.faults.conftest import (
    FAST_STUDENT,
    FORGED,
    check_books,
    dead_letters,
    good_examples,
    summary,
)
from tests.integration.workers import produce_synthetic, write_config

SEED = 20240611
OLD_LIBRDKAFKA = "Read underflow"


class Injector:
    """Writes raw messages with kcat (Debian's; with the confluent-kafka wheel's librdkafka
    preloaded when Debian's is too old for tansu), else with a bare confluent-kafka producer.
    ``how`` says which was used."""

    def __init__(self, bootstrap: str, tmp_path):
        self.bootstrap, self.tmp = bootstrap, tmp_path
        self.env = dict(os.environ)
        self.kcat = shutil.which("kcat") or shutil.which("kafkacat")
        self.how = "confluent-kafka producer (kcat not installed)"
        if self.kcat:
            probe = subprocess.run(
                [self.kcat, "-L", "-b", bootstrap, "-m", "1"], capture_output=True, text=True, timeout=30
            )
            if probe.returncode != 0 and OLD_LIBRDKAFKA in probe.stderr:
                from tests.integration.distill.local.test_broker import bundled_librdkafka

                lib = bundled_librdkafka()
                self.env["LD_PRELOAD"] = lib or ""
                probe = subprocess.run(
                    [self.kcat, "-L", "-b", bootstrap, "-m", "5"],
                    capture_output=True,
                    text=True,
                    timeout=30,
                    env=self.env,
                )
            if probe.returncode == 0:
                self.how = "kcat" + (" (LD_PRELOAD of the wheel's librdkafka)" if "LD_PRELOAD" in self.env else "")
            else:
                self.kcat = None
                self.how = f"confluent-kafka producer (kcat failed: {probe.stderr[-200:]})"
        self.n = 0

    def send(self, topic: str, partition: int, value: bytes, headers: list[tuple[str, bytes]], key: bytes) -> None:
        self.n += 1
        if self.kcat:
            path = self.tmp / f"inject-{self.n}.bin"
            path.write_bytes(value)  # one file = one message, bytes as they are
            cmd = [
                self.kcat,
                "-P",
                "-b",
                self.bootstrap,
                "-t",
                topic,
                "-p",
                str(partition),
                "-k",
                key.decode(),
                "-X",
                "message.max.bytes=4000000",
            ]
            for k, v in headers:
                cmd += ["-H", f"{k}={v.decode()}"]
            done = subprocess.run([*cmd, str(path)], capture_output=True, text=True, timeout=30, env=self.env)
            assert done.returncode == 0, f"kcat: {done.stderr[-500:]}"
        else:
            p = Producer({"bootstrap.servers": self.bootstrap, "message.max.bytes": 4_000_000})
            p.produce(topic, value=value, key=key, partition=partition, headers=headers)
            assert p.flush(20) == 0


def bad_examples(make_batch, codec: Codec, rng: np.random.Generator) -> list[tuple[str, bytes, list]]:
    """(expected reason, value, headers) of each bad example message."""
    good, headers = codec.encode_examples(make_batch(32, seq=1, producer_id="injector"))
    fp = headers
    out = [
        ("missing_schema", rng.bytes(500), []),
        ("undecodable", rng.bytes(500), fp),
        ("undecodable", good[: len(good) // 2], fp),  # truncated Avro
        ("unknown_schema", good, [(SCHEMA_HEADER, b"00" * 8)]),
    ]
    short = make_batch(32, seq=2, producer_id="injector")
    rec = _record(short)
    rec["dense"] = rec["dense"][: -4 * len(short.dense_names)]  # one row short
    out.append(("bad_column", Codec.encode_record(codec._examples, rec)[0], fp))
    for value in (np.nan, np.inf):
        b = make_batch(32, seq=3, producer_id="injector")
        b.dense[rng.integers(0, 32), rng.integers(0, b.dense.shape[1])] = value
        out.append(("non_finite", codec.encode_examples(b)[0], fp))
    big = make_batch(3000, seq=4, producer_id="injector")  # about 280 KB, limit 64 KiB
    out.append(("too_large", codec.encode_examples(big)[0], fp))
    return out


def _record(b) -> dict:
    f32, i64 = "<f4", "<i8"
    return {
        "batch_id": b.batch_id,
        "producer_id": b.producer_id,
        "seq": b.seq,
        "num_examples": b.size,
        "event_time_ms": b.event_time_ms.astype(i64).tobytes(),
        "example_ids": b.example_ids.astype(i64).tobytes(),
        "categorical_names": b.categorical_names,
        "categorical": b.categorical.astype(i64).tobytes(),
        "dense_names": b.dense_names,
        "dense": b.dense.astype(f32).tobytes(),
        "task_names": b.task_names,
        "labels": b.labels.astype(f32).tobytes(),
        "truth": None,
    }


def test_bad_input_goes_to_the_dlq_and_good_traffic_is_untouched(make_config, make_batch, workers, tmp_path):
    rng = np.random.default_rng(SEED)
    # label_wait far above the test's pauses: every good batch must be trained *with* its label
    config = make_config(
        topics={"partitions": 2},
        wire={"max_message_bytes": 64 * 1024},
        students=[{"name": "s1", **FAST_STUDENT, "label_wait_s": 60.0}],
    )
    path = write_config(config, tmp_path / "config.yaml")
    first = produce_synthetic(config, 12 * 128, batch_size=128)  # creates the topics
    teacher = workers(["teacher", "--config", str(path)], tmp_path / "teacher.log")
    student = workers(["student", "--name", "s1", "--config", str(path)], tmp_path / "student.log")
    inject = Injector(config.kafka.bootstrap_servers, tmp_path)
    codec = Codec()
    expected_examples = Counter()
    for i, (reason, value, headers) in enumerate(bad_examples(make_batch, codec, rng)):
        inject.send(config.topics.examples, i % 2, value, headers, key=f"bad-{i}".encode())
        expected_examples[reason] += 1
    inject.send(
        config.topics.labels, 0, rng.bytes(300), codec.encode_labels(_label("x", 1))[1], key=FORGED + b"-garbage"
    )
    second = produce_synthetic(config, 12 * 128, batch_size=128)
    total = first["examples"] + second["examples"]
    student.wait(lambda: student.metric("distill_student_examples_trained_total") >= total, "first rounds trained", 90)

    # The forged label goes in before the real one: the teacher is away while its batch waits.
    assert teacher.stop() == 0, teacher.tail()
    before = set(good_examples(config))
    third = produce_synthetic(config, 4 * 128, batch_size=128)
    total += third["examples"]
    student.wait(
        lambda: student.metric("distill_student_pending_batches") >= third["batches"], "third round pending", 30
    )
    victims = sorted((p, o, bid, n) for bid, (p, o, n) in good_examples(config).items() if bid not in before)
    assert len(victims) == third["batches"], victims
    p, o, bid, n = victims[int(rng.integers(len(victims)))]
    forged = _label(bid, n, source_partition=p, source_offset=o)  # right size, wrong checksum
    value, headers = codec.encode_labels(forged)
    inject.send(config.topics.labels, p, value, headers, key=FORGED)
    student.wait(
        lambda: student.metric("distill_dead_letters_total", reason="id_mismatch") >= 1,
        "forged label dead-lettered",
        30,
    )
    teacher = workers(["teacher", "--config", str(path)], tmp_path / "teacher.log")
    student.wait(lambda: student.metric("distill_student_examples_trained_total") >= total, "everything trained", 90)
    assert teacher.alive() and student.alive()
    assert teacher.get("/readyz")[0] == 200 and student.get("/readyz")[0] == 200
    assert teacher.stop() == 0, teacher.tail()
    assert student.stop() == 0, student.tail()

    context = f"seed {SEED}, injected with {inject.how}"
    check_books(config, ["s1"], total, context)
    s = summary(config, "s1")
    assert s["joined"] == s["batches_trained"] and s["missing"] == 0, f"{context}: {s}"  # the forged label took nothing
    ex_dlq = Counter(
        (d["worker"].split("/")[0], d["reason"])
        for d in dead_letters(config, config.topics.dlq(config.topics.examples))
    )
    want = Counter({(role, r): c for role in ("teacher", "student") for r, c in expected_examples.items()})
    assert ex_dlq == want, f"{context}: examples DLQ {dict(ex_dlq)} != {dict(want)}"
    lb_dlq = dead_letters(config, config.topics.dlq(config.topics.labels))
    assert Counter(d["reason"] for d in lb_dlq) == {"undecodable": 1, "id_mismatch": 1}, f"{context}: {lb_dlq}"
    mismatch = next(d for d in lb_dlq if d["reason"] == "id_mismatch")
    assert bid in mismatch["error"] and mismatch["source_partition"] == p, mismatch


def _label(batch_id: str, n: int, source_partition: int = 0, source_offset: int = 0) -> LabelBatch:
    return LabelBatch(
        batch_id=batch_id,
        example_ids_checksum=12345,
        source_partition=source_partition,
        source_offset=source_offset,
        teacher_version=0,
        watermark=0,
        task_names=["click", "watch"],
        logits=np.zeros((n, 2), dtype=np.float32),
        produced_at_ms=int(time.time() * 1000),
    )
