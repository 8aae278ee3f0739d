"""The teacher at scale: a trainer and a pool of labelers, on the embedded broker and (where
marked both_brokers: groups, rebalances, transactions) on Apache Kafka."""

from __future__ import annotations

import collections
import json
import time

import numpy as np
import pytest
import torch

from distill.core import metrics as m
from distill.core.exceptions import CheckpointError, DecodeError
from distill.core.kafka import Clients
from distill.core.model_store import ModelStore
from distill.core.wire import Codec, ids_checksum
from distill.learn.models import RankingModel, batch_tensors
from teacher_worker.labeler import Labeler
from teacher_worker.ranks import Ranks
from teacher_worker.trainer import Trainer
from teacher_worker.worker import TeacherWorker
from tests.integration.workers import (
    example_batch_ids,
    kill9,
    produce_synthetic,
    read_all,
    read_labels,
    run_until,
    spawn,
    stop,
    write_config,
)


def pool_config(make_config, **pool):
    return make_config(
        topics={"partitions": 4},
        teacher={
            "max_batches_per_step": 4,
            "poll_timeout_s": 0.05,
            "model": {"hidden": [32], "embedding_dim": 8, "cross_layers": 0},
            "pool": {"publish_every_batches": 5, "publish_every_seconds": 60.0, "lead_check_seconds": 0.2, **pool},
        },
    )


def announcements(config) -> list:
    codec = Codec()
    return [
        codec.decode_announcement(msg.value(), msg.headers()) for msg in read_all(config, config.topics.checkpoints)
    ]


def labelled_ids(config) -> set[str]:
    return {lb.batch_id for _, _, lb in read_labels(config)}


@pytest.mark.both_brokers
def test_trainer_and_two_labelers_label_every_batch_once_out_of_sample(make_config):
    config = pool_config(make_config)
    # One poll per transaction: the trainer, stepped in this thread between the labelers'
    # steps, publishes versions while they label (in 0.1 s they would take the whole backlog).
    config.teacher.max_transaction_seconds = 1e-9
    produced = produce_synthetic(config, 60 * 128, batch_size=128)
    trainer = Trainer(config, Ranks(), torch.device("cpu"))
    trainer.start()
    first = Labeler(config.model_copy(update={"teacher": config.teacher.model_copy(update={"name": "labeler-a"})}))
    second = Labeler(config.model_copy(update={"teacher": config.teacher.model_copy(update={"name": "labeler-b"})}))
    first.start()
    second.start()
    run_until(
        lambda: (
            first.examples_labeled + second.examples_labeled >= produced["examples"]
            and sum(trainer.trained_through.values()) >= produced["batches"]
        ),
        [trainer.step, first.step, second.step],
        timeout=120,
    )
    assert first.assigned and second.assigned and not first.assigned & second.assigned  # the group split the work
    trainer.service.stopping.set()
    assert trainer.step() is False  # a stop publishes what was trained since the last checkpoint
    for worker in (trainer, first, second):
        worker.close()

    examples = example_batch_ids(config)
    labels = read_labels(config)
    assert len(examples) == produced["batches"] >= 60
    assert sorted(lb.batch_id for _, _, lb in labels) == sorted(examples)  # each batch exactly once
    published = {a.version: a for a in announcements(config)}
    assert sorted(published) == list(range(trainer.version + 1)) and trainer.version >= 10
    codec = Codec()
    batches = {
        b.batch_id: b
        for b in (codec.decode_examples(msg.value(), msg.headers()) for msg in read_all(config, config.topics.examples))
    }
    store = ModelStore(config.model_store())
    by_partition = collections.defaultdict(list)
    for partition, _, lb in labels:
        assert (partition, lb.source_offset) == examples[lb.batch_id]
        announced = published[lb.teacher_version]
        # Out-of-sample: the checkpoint that labelled the batch never trained on it.
        assert lb.watermark == announced.trained_through(partition) <= lb.source_offset
        assert lb.example_ids_checksum == ids_checksum(batches[lb.batch_id].example_ids)
        by_partition[partition].append((lb.source_offset, lb.teacher_version))
    # The labels carry the version that made them: recompute a few from the store.
    for _, _, lb in labels[:: max(1, len(labels) // 6)]:
        model = RankingModel(config.features, config.tasks, config.teacher.model)
        a = published[lb.teacher_version]
        if a.version not in store.versions():
            continue  # pruned: no labeler can need it any more
        model.load_state_dict(store.load(a.uri, a.sha256))
        cat, dense, _ = batch_tensors([batches[lb.batch_id]], torch.device("cpu"))
        with torch.no_grad():
            expected, _ = model.eval()(cat, dense)
        np.testing.assert_allclose(lb.logits, expected.numpy(), rtol=1e-5, atol=1e-6)
    # New checkpoints were picked up: within a partition the version never goes back, and it moves on.
    for pairs in by_partition.values():
        versions = [v for _, v in sorted(pairs)]
        assert versions == sorted(versions)
    assert max(lb.teacher_version for _, _, lb in labels) > 0
    assert len({lb.teacher_version for _, _, lb in labels}) >= 3


def test_trainer_pauses_while_too_far_ahead_of_the_labelers(make_config):
    config = pool_config(make_config, max_lead_versions=3, publish_every_batches=2)
    produced = produce_synthetic(config, 40 * 64, batch_size=64)
    trainer = Trainer(config, Ranks(), torch.device("cpu"))
    trainer.start()
    run_until(lambda: trainer.paused, [trainer.step], timeout=60)
    for _ in range(20):
        trainer.step()
    # Version 0 is all the labelers may use at offset 0, so 3 versions ahead is the limit.
    assert trainer.version == 3 and trainer.paused
    assert m.TEACHER_PAUSED.labels(trainer.name)._value.get() == 1
    assert m.TEACHER_LEAD_VERSIONS.labels(trainer.name)._value.get() == 3
    assert trainer.store.versions() == [0, 1, 2, 3]

    labeler = Labeler(config)
    labeler.start()
    run_until(
        lambda: labeler.examples_labeled >= produced["examples"] and sum(trainer.trained_through.values()) >= 40,
        [trainer.step, labeler.step],
        timeout=120,
    )
    assert trainer.version > 3
    # Store files no labeler can need any more are gone (the newest two always stay).
    trainer.publisher.wait()
    trainer._check_lead()
    assert trainer.oldest_kept > 3
    assert trainer.store.versions() == list(range(min(trainer.oldest_kept, trainer.version - 1), trainer.version + 1))
    labeler.close()
    trainer.service.stopping.set()
    trainer.step()
    trainer.close()
    labels = read_labels(config)
    assert sorted(lb.batch_id for _, _, lb in labels) == sorted(example_batch_ids(config))
    assert all(lb.watermark <= lb.source_offset for _, _, lb in labels)


@pytest.mark.both_brokers
def test_killing_a_labeler_moves_its_partitions_to_the_other(make_config, tmp_path):
    config = pool_config(make_config)
    path = write_config(config, tmp_path / "pool.yaml")
    logs = tmp_path / "logs"
    logs.mkdir()
    trainer = spawn(["teacher", "--config", str(path), "--role", "trainer"], logs / "trainer.log")
    doomed = spawn(["teacher", "--config", str(path), "--role", "labeler", "--name", "doomed"], logs / "a.log")
    survivor = spawn(["teacher", "--config", str(path), "--role", "labeler", "--name", "survivor"], logs / "b.log")
    try:
        first = produce_synthetic(config, 40 * 128, batch_size=128)
        _wait_for(lambda: len(labelled_ids(config)) >= first["batches"], 90, logs)
        kill9(doomed)
        second = produce_synthetic(config, 40 * 128, batch_size=128)
        examples = example_batch_ids(config)
        assert len(examples) == first["batches"] + second["batches"]
        _wait_for(lambda: labelled_ids(config) >= set(examples), 90, logs)
        assert stop(survivor) == 0
        assert stop(trainer) == 0
    finally:
        for proc in (trainer, doomed, survivor):
            if proc.poll() is None:
                kill9(proc)
    labels = read_labels(config)
    assert {lb.batch_id for _, _, lb in labels} == set(examples)  # none left unlabelled
    assert all(lb.watermark <= lb.source_offset for _, _, lb in labels)
    summary = json.loads((config.progress_dir() / "teacher-survivor.summary.json").read_text())
    assert summary["partitions"] == [0, 1, 2, 3]  # the survivor took the dead one's partitions
    late = [lb for _, _, lb in labels if lb.batch_id in examples and lb.source_offset >= 10]
    assert {lb.source_partition for lb in late} == {0, 1, 2, 3}


def _wait_for(predicate, timeout: float, logs) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(1.0)
    tails = {p.name: p.read_text()[-2000:] for p in logs.glob("*.log")}
    raise AssertionError(f"not reached within {timeout}s; logs: {tails}")


def test_a_restarted_trainer_publishes_its_checkpoint_again_past_the_stores_newest_version(make_config):
    config = pool_config(make_config)
    config.teacher.checkpoint.every_batches = 12  # a checkpoint at every third publish (5 batches each)
    produced = produce_synthetic(config, 40 * 128, batch_size=128)
    labeler = Labeler(config)
    before = Trainer(config, Ranks(), torch.device("cpu"))
    before.start()
    labeler.start()
    run_until(lambda: before.checkpointed >= 3 and before.version > before.checkpointed, [before.step, labeler.step])
    before.publisher.wait()  # the crash comes after these versions were written and announced
    crashed_at, checkpointed = before.version, before.checkpointed
    saved = before.checkpointer.load_latest()[1]
    assert saved["version"] == checkpointed < crashed_at  # not every publish is a checkpoint
    before.publisher.close()
    before.consumer.close()  # a crash: no final publish or checkpoint, no summary
    before.lead_reader.close()
    before.producer.flush(5)

    after = Trainer(config, Ranks(), torch.device("cpu"))
    assert after.version == checkpointed and after.trained_through == saved["trained_through"]
    after.start()
    # The versions after the checkpoint are gone with the crash: its weights come back under a new number.
    assert after.version == crashed_at + 1
    restored = announcements(config)[-1]
    assert restored.version == crashed_at + 1 and restored.watermark == saved["trained_through"]
    assert weights_equal(after.store.load(restored.uri, restored.sha256), saved["model"])
    run_until(
        lambda: (
            sum(after.trained_through.values()) >= produced["batches"]
            and labeler.examples_labeled >= produced["examples"]
        ),
        [after.step, labeler.step],
        timeout=90,
    )
    after.service.stopping.set()
    after.step()
    after.close()
    labeler.close()
    versions = [a.version for a in announcements(config)]
    assert versions == sorted(set(versions))  # one model per version number, never announced twice
    assert after.checkpointer.load_latest()[0] == after.version  # a stop checkpoints the last publish
    final = announcements(config)[-1]
    assert final.examples_trained == produced["examples"]  # each example trained once in the kept model
    labels = read_labels(config)
    assert {lb.batch_id for _, _, lb in labels} == set(example_batch_ids(config))
    assert all(lb.watermark <= lb.source_offset for _, _, lb in labels)


def test_a_stop_with_weights_that_are_not_finite_keeps_the_last_good_checkpoint(make_config):
    config = pool_config(make_config)
    produce_synthetic(config, 20 * 128, batch_size=128)
    trainer = Trainer(config, Ranks(), torch.device("cpu"))
    trainer.start()  # checkpoints version 0; the next checkpoint is due in 30 s
    run_until(lambda: trainer.version >= 2 and trainer.batches_since_publish > 0, [trainer.step])
    published = trainer.version
    with torch.no_grad():
        next(trainer.model.parameters()).fill_(float("nan"))  # trained into NaNs since the last publish
    trainer.service.stopping.set()
    assert trainer.step() is False
    trainer.close()
    assert trainer.version == published  # nothing published
    version, state = trainer.checkpointer.load_latest()
    assert version == 0 and all(torch.isfinite(t).all() for t in state["model"].values())


def test_a_corrupt_checkpoint_falls_back_to_an_older_out_of_sample_one(make_config):
    config = pool_config(make_config)
    produced = produce_synthetic(config, 30 * 128, batch_size=128)
    trainer = Trainer(config, Ranks(), torch.device("cpu"))
    trainer.start()
    run_until(lambda: trainer.version >= 2, [trainer.step], timeout=60)
    trainer.pause_wanted = True  # hold the trainer: the newest checkpoint stays the corrupt one
    trainer.step()
    broken = trainer.store.path(trainer.version)
    broken.write_bytes(broken.read_bytes()[:-100])
    labeler = Labeler(config)
    labeler.start()
    run_until(lambda: labeler.examples_labeled >= produced["examples"], [labeler.step], timeout=60)
    labeler.close()
    assert m.TEACHER_RELOADS.labels(labeler.name, "failed")._value.get() >= 1
    labels = read_labels(config)
    assert {lb.batch_id for _, _, lb in labels} == set(example_batch_ids(config))
    assert {lb.teacher_version for _, _, lb in labels} <= set(range(trainer.version))  # never the corrupt one
    assert all(lb.watermark <= lb.source_offset for _, _, lb in labels)
    trainer.close()


def test_a_fresh_trainer_refuses_a_store_it_did_not_write(make_config):
    config = pool_config(make_config)
    ModelStore(config.model_store()).publish(
        7, RankingModel(config.features, config.tasks, config.teacher.model).state_dict()
    )
    trainer = Trainer(config, Ranks(), torch.device("cpu"))
    with pytest.raises(CheckpointError) as err:
        trainer.start()
    message = str(err.value)
    assert "holds versions 7..7" in message and "no checkpoint" in message and config.topics.checkpoints in message
    assert announcements(config) == []  # nothing announced over what labelers may have read
    trainer.close()


def test_two_labelers_with_one_name_stop_with_a_clear_error(make_config, tmp_path):
    # Processes, not objects in this one: each must keep polling while the other leaves the group.
    config = make_config(
        topics={"partitions": 2},
        teacher={"poll_timeout_s": 0.05, "model": {"hidden": [8], "embedding_dim": 2, "cross_layers": 0}},
    )
    trainer = Trainer(config, Ranks(), torch.device("cpu"))
    trainer.start()  # announces version 0: all the labelers need here
    trainer.close()
    path = write_config(config, tmp_path / "pool.yaml")
    args = ["teacher", "--config", str(path), "--role", "labeler", "--name", "twin"]
    first = spawn(args, tmp_path / "first.log")
    try:
        produce_synthetic(config, 8 * 64, batch_size=64)
        _wait_for(lambda: len(labelled_ids(config)) > 0, 60, tmp_path)
        second = spawn(args, tmp_path / "second.log")  # the same transactional id fences the first
        try:
            deadline = time.monotonic() + 60
            while first.poll() is None and second.poll() is None and time.monotonic() < deadline:
                produce_synthetic(config, 4 * 64, batch_size=64)
                time.sleep(1.0)
            assert first.poll() == 2, (tmp_path / "first.log").read_text()[-3000:]
            assert "unique teacher.name" in (tmp_path / "first.log").read_text()
            assert second.poll() is None  # the newer one goes on
        finally:
            if second.poll() is None:
                assert stop(second) == 0
    finally:
        if first.poll() is None:
            kill9(first)


def test_a_bad_example_batch_is_dead_lettered_once_and_skipped_by_the_trainer(make_config):
    config = pool_config(make_config)
    produce_synthetic(config, 8 * 128, batch_size=128)
    raw = Clients(config.kafka, "test-garbage").producer()
    raw.produce(config.topics.examples, value=b"not an example batch", partition=1)
    raw.flush(10)
    produce_synthetic(config, 8 * 128, batch_size=128)
    trainer = Trainer(config, Ranks(), torch.device("cpu"))
    trainer.start()
    labeler = Labeler(config)
    labeler.start()
    good = {b.batch_id for b in batches_of(config)}
    total = sum(1 for _ in read_all(config, config.topics.examples))
    assert total == len(good) + 1
    run_until(
        lambda: sum(trainer.trained_through.values()) >= total and labelled_ids(config) >= set(good),
        [trainer.step, labeler.step],
        timeout=60,
    )
    dead = read_all(config, config.topics.dlq(config.topics.examples))
    assert (
        len(dead) == 1 and Codec().decode_dead_letter(dead[0].value(), dead[0].headers())["reason"] == "missing_schema"
    )
    assert trainer.examples_trained == sum(b.size for b in batches_of(config))  # every good example, once
    labeler.close()
    trainer.close()


def _label_backlog(make_config, max_transaction_seconds: float) -> tuple[int, int, int]:
    """(example batches, label batches, commits) of one labeler over a backlog, every batch
    labelled by version 0 (the trainer announces it and stops)."""
    config = pool_config(make_config, max_label_staleness_examples=10**9)
    config.teacher.max_transaction_seconds = max_transaction_seconds
    produced = produce_synthetic(config, 48 * 128, batch_size=128)
    trainer = Trainer(config, Ranks(), torch.device("cpu"))
    trainer.start()
    trainer.close()
    labeler = Labeler(config)
    # the process's counter: earlier tests' workers of the same name counted into it too
    committed = m.TEACHER_TRANSACTIONS.labels(labeler.name, "commit")
    before = committed._value.get()
    labeler.start()
    try:
        run_until(lambda: labeler.examples_labeled >= produced["examples"], [labeler.step], timeout=60)
        commits = committed._value.get() - before
    finally:
        labeler.close()
    labels = sorted(lb.batch_id for _, _, lb in read_labels(config))
    assert labels == sorted(example_batch_ids(config))  # each batch once, whatever the grouping
    return produced["batches"], len(labels), int(commits)


def test_a_labelers_transaction_takes_in_what_the_consumer_holds_until_its_time_is_up(make_config):
    """One commit per max_transaction_seconds, not per poll (max_batches_per_step = 4): a
    commit took 15% of a labeler's time at one per poll. With no time each poll commits alone."""
    batches, labelled, grouped = _label_backlog(make_config, 30.0)
    assert labelled == batches >= 48
    # a stream of its own: the producer's 5 ms linger flushes part-full batches, so the count varies
    polled, _, per_poll = _label_backlog(make_config, 1e-9)
    assert per_poll >= polled / 4, f"{per_poll} commits for {polled} batches read 4 at a time"
    # more than one poll's 4 batches per transaction on average
    assert grouped < batches / 4, f"{grouped} commits for {batches} batches with 30 s to fill a transaction"


def batches_of(config) -> list:
    codec = Codec()
    out = []
    for msg in read_all(config, config.topics.examples):
        try:
            out.append(codec.decode_examples(msg.value(), msg.headers()))
        except DecodeError:
            continue
    return out


def test_a_trainer_takes_over_a_single_teachers_checkpoint(make_config):
    """Moving from one teacher process to the pool keeps the trained teacher and its watermark."""
    config = pool_config(make_config)
    produce_synthetic(config, 20 * 128, batch_size=128)
    teacher = TeacherWorker(config)
    teacher.start()
    run_until(lambda: sum(teacher.trained_through.values()) >= 10, [teacher.step], timeout=60)
    teacher.close()  # checkpoints
    version, offsets = teacher.version, dict(teacher.trained_through)
    trainer = Trainer(config, Ranks(), torch.device("cpu"))
    trainer.start()
    trainer.close()
    (first,) = announcements(config)
    assert first.version == version > 0
    assert first.watermark == offsets  # not "trained on nothing": labels stay out-of-sample
    assert weights_equal(trainer.store.load(first.uri, first.sha256), teacher.model.state_dict())


def weights_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k].cpu()) for k in a)


# A labeler SIGKILLed with a transaction open: the process below begins a transaction with a
# labeler's transactional id and timeout, writes a record to labels partition 0, reports it,
# and waits to be killed. Nothing ever fences its id.
_OPEN_TRANSACTION = """
import sys, time
from confluent_kafka import Producer
bootstrap, tid, timeout_ms, topic = sys.argv[1:5]
producer = Producer({"bootstrap.servers": bootstrap, "transactional.id": tid,
                     "transaction.timeout.ms": int(timeout_ms), "acks": "all", "log_level": 0})
producer.init_transactions(30)
producer.begin_transaction()
producer.produce(topic, b"never committed", partition=0)
producer.flush(30)
print("open", flush=True)
time.sleep(600)
"""


@pytest.mark.parametrize("kafka_flavour", [pytest.param("apache", marks=pytest.mark.apache)])
def test_a_labeler_killed_mid_transaction_holds_students_until_its_timeout(make_config, kafka_flavour):
    """Apache Kafka only: a read_committed reader stops at the first open transaction of a
    partition (its last stable offset), so committed labels behind the dead labeler's wait until
    the broker aborts it, ``transaction.timeout.ms`` (15 s) after it began plus up to one
    abort-check interval (10 s by default). The embedded broker shows open transactions at once."""
    import subprocess
    import sys

    from student_worker.worker import StudentWorker
    from teacher_worker.labeler import TRANSACTION_TIMEOUT_MS
    from teacher_worker.worker import TeacherWorker

    config = make_config(
        topics={"partitions": 1},
        teacher={"model": {"hidden": [32], "embedding_dim": 8, "cross_layers": 0}},
        students=[{"name": "s", "label_wait_s": 120.0, "checkpoint": {"every_batches": 5}}],
    )
    first = produce_synthetic(config, 10 * 128, batch_size=128)["batches"]
    teacher, student = TeacherWorker(config), StudentWorker(config, "s")
    teacher.start()
    student.start()
    try:
        run_until(lambda: student.counts["batches_trained"] >= first, [teacher.step, student.step], 60)
        zombie = subprocess.Popen(
            [sys.executable, "-c", _OPEN_TRANSACTION, config.kafka.bootstrap_servers,
             f"{config.teacher.pool.labeler_group_id}.zombie", str(TRANSACTION_TIMEOUT_MS), config.topics.labels],
            stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert zombie.stdout.readline().strip() == "open", "the transaction did not open"
        begun = time.monotonic()  # (a little after the transaction began: the stall is a lower bound)
        kill9(zombie)
        second = produce_synthetic(config, 5 * 128, batch_size=128)["batches"]
        resumed: list[float] = []

        def student_step() -> None:
            student.step()
            if not resumed and student.counts["batches_trained"] > first:
                resumed.append(time.monotonic())

        run_until(lambda: student.counts["batches_trained"] >= first + second, [teacher.step, student_step], 90)
    finally:
        teacher.close()
        student.close()
    stall = resumed[0] - begun
    print(f"\nlabeler SIGKILLed mid-transaction: the student resumed after {stall:.1f} s")
    assert student.counts["joined"] == first + second and student.counts["missing"] == 0, student.counts
    # The broker aborts only after the timeout: the student cannot have had the labels sooner.
    assert stall >= TRANSACTION_TIMEOUT_MS / 1000 - 1.0, stall
