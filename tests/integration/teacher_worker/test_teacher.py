"""The teacher against the embedded broker (and Apache Kafka where marked both_brokers): labels,
out-of-sample, aborted transactions, crashes, learning."""

from __future__ import annotations

import json
import threading
import time

import numpy as np
import pytest
import torch
from confluent_kafka import KafkaException, TopicPartition

from distill.core.wire import Codec, LabelBatch, ids_checksum
from distill.learn.step import predict
from distill.sweep.arms import SweepTeacher
from teacher_worker.worker import Outbox, Read, TeacherWorker
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


def _run_teacher(config, batches: int, timeout: float = 60) -> TeacherWorker:
    teacher = TeacherWorker(config)
    teacher.start()
    run_until(
        lambda: (
            teacher.examples_labeled > 0
            and len(teacher.trained_through)
            and sum(teacher.trained_through.values()) >= batches
        ),
        [teacher.step],
        timeout,
    )
    return teacher


@pytest.mark.both_brokers
def test_one_label_batch_per_example_batch(make_config):
    config = make_config(topics={"partitions": 2})
    produced = produce_synthetic(config, 5000, batch_size=250)
    teacher = _run_teacher(config, produced["batches"])
    teacher.close()
    examples = example_batch_ids(config)
    labels = read_labels(config)
    assert len(examples) == produced["batches"] >= 20
    assert sorted(lb.batch_id for _, _, lb in labels) == sorted(examples)
    codec = Codec()
    by_id = {
        codec.decode_examples(m.value(), m.headers()).batch_id: codec.decode_examples(m.value(), m.headers())
        for m in read_all(config, config.topics.examples)
    }
    for partition, _offset, lb in labels:
        src_partition, src_offset = examples[lb.batch_id]
        assert partition == src_partition == lb.source_partition  # same partition number
        assert lb.source_offset == src_offset
        assert lb.watermark <= lb.source_offset  # never labelled by a teacher that saw it
        assert lb.example_ids_checksum == ids_checksum(by_id[lb.batch_id].example_ids)
        assert lb.logits.shape == (by_id[lb.batch_id].size, 2)


def test_labels_are_out_of_sample(make_config):
    """Each published logit equals a replica's prediction *before* it trained on that batch."""
    config = make_config(topics={"partitions": 1})  # one step labels all six: each after the one before
    produce_synthetic(config, 6 * 128, batch_size=128)
    teacher = _run_teacher(config, 6)
    teacher.close()
    labels = sorted(read_labels(config), key=lambda x: x[2].source_offset)
    codec = Codec()
    batches = [codec.decode_examples(m.value(), m.headers()) for m in read_all(config, config.topics.examples)]
    assert [b.batch_id for b in batches] == [lb.batch_id for _, _, lb in labels]

    # The sweep's teacher is the worker's learning without Kafka: on the same batches it gives
    # the same labels and ends with the same weights.
    replica = SweepTeacher(config, config.teacher.model, torch.device("cpu"))
    moved = 0
    for batch, (_, _, lb) in zip(batches, labels, strict=True):
        t = replica.learner.tensors(batch)
        before = predict(replica.model, t.categorical, t.dense)  # an eval pass, before the step
        np.testing.assert_allclose(
            lb.logits, before, rtol=1e-4, atol=1e-5, err_msg=f"batch {batch.batch_id} of {len(batches)}"
        )
        np.testing.assert_allclose(replica.label_then_train(batch), lb.logits, rtol=1e-4, atol=1e-5)
        after = predict(replica.model, t.categorical, t.dense)
        moved += not np.allclose(lb.logits, after, atol=1e-5)
    assert moved == len(batches)  # the check above could tell before from after
    worker, sweep = teacher.model.state_dict(), replica.model.state_dict()
    assert worker.keys() == sweep.keys()
    for name in worker:
        torch.testing.assert_close(worker[name], sweep[name], rtol=0, atol=0, msg=name)


@pytest.mark.both_brokers
def test_a_zombie_teachers_open_transaction_is_aborted(make_config, kafka_flavour):
    """A teacher that died mid-transaction (a zombie with the same transactional id) is fenced
    by its successor, which aborts the zombie's labels and labels those batches itself."""
    from distill.core.kafka import Clients

    config = make_config(topics={"partitions": 1})
    batches = produce_synthetic(config, 4 * 128, batch_size=128)["batches"]
    examples = example_batch_ids(config)
    zombie = Clients(config.kafka, "zombie").producer(transactional_id=f"{config.teacher.group_id}.teacher")
    zombie.init_transactions(30)
    zombie.begin_transaction()
    codec = Codec()
    for batch_id, (partition, offset) in list(examples.items())[:2]:
        forged = LabelBatch(batch_id, 0, partition, offset, 0, 0, ["click", "watch"], np.zeros((128, 2), np.float32))
        value, headers = codec.encode_labels(forged)
        zombie.produce(config.topics.labels, value=value, headers=headers, key=batch_id.encode(), partition=partition)
    assert zombie.flush(10) == 0
    teacher = _run_teacher(config, batches)  # init_transactions fences the zombie, aborting its transaction
    teacher.close()
    with pytest.raises(KafkaException):
        zombie.commit_transaction(10)
    committed = [lb for _, _, lb in read_labels(config)]
    assert len(_read_uncommitted(config, config.topics.labels)) == batches + 2  # the aborted labels are in the log
    assert {lb.batch_id for lb in committed} == set(examples)
    if kafka_flavour == "apache":  # read_committed hides the aborted labels: each batch once, the teacher's
        assert sorted(lb.batch_id for lb in committed) == sorted(examples)
        assert all(lb.example_ids_checksum != 0 for lb in committed)  # none of the zombie's (checksum 0)
    else:  # the embedded broker shows them: readers de-duplicate by batch id (docs/kafka.md)
        assert len(committed) == batches + 2


def _read_uncommitted(config, topic: str) -> list:
    return read_all(config, topic, timeout=30, committed=False)


def _four_batches_labelled(config):
    """A started teacher that has read, labelled and trained 4 batches, with nothing committed:
    the teacher, the records, their outbox and each batch's logits as labelled."""
    teacher = TeacherWorker(config)
    teacher.start()
    records: list = []
    deadline = time.monotonic() + 30
    while len(records) < 4 and time.monotonic() < deadline:  # polls until assigned, as a step does
        records += [m for m in teacher.consumer.consume(4 - len(records), 0.5) if m.error() is None]
    outbox, rest = teacher._label_and_train([Read(m, teacher._decode(m)) for m in records])
    assert len(outbox.labels) == 4 and not rest
    return teacher, records, outbox, {e.label.batch_id: e.label.logits.copy() for e in outbox.labels}


@pytest.mark.both_brokers
def test_an_aborted_transaction_sends_the_same_labels_again(make_config, kafka_flavour):
    """A failed commit is aborted; its labels, scored before the weights trained on those
    batches, go out again unchanged in the next transaction, never rescored by weights that
    have trained on them since."""
    config = make_config(topics={"partitions": 1}, teacher={"max_transaction_seconds": 30.0})
    produce_synthetic(config, 4 * 128, batch_size=128)
    teacher, records, outbox, scored = _four_batches_labelled(config)
    teacher.producer.begin_transaction()  # the transaction a failed commit leaves open
    for e in outbox.labels:
        value, headers = teacher.codec.encode_labels(e.label)
        teacher.producer.produce(config.topics.labels, value=value, key=e.label.batch_id.encode(), headers=headers)
    teacher._abort(outbox)
    assert teacher.outbox is outbox and teacher.examples_labeled == 0
    run_until(lambda: teacher.outbox is None, [teacher.step], 30)
    assert teacher.examples_labeled == 4 * 128
    # weights that have trained on the batches would label them otherwise
    codec = Codec()
    batches = {b.batch_id: b for b in (codec.decode_examples(m.value(), m.headers()) for m in records)}
    for batch_id, logits in scored.items():
        t = teacher.learner.tensors(batches[batch_id])
        assert not np.allclose(predict(teacher.model, t.categorical, t.dense), logits, atol=1e-5)
    teacher.close()
    labels = [lb for _, _, lb in read_labels(config)]
    assert {lb.batch_id for lb in labels} == set(scored)
    for lb in labels:  # on the embedded broker the aborted copies are visible too: the same values
        np.testing.assert_array_equal(lb.logits, scored[lb.batch_id])
    if kafka_flavour == "apache":
        assert len(labels) == 4  # the aborted transaction is hidden


@pytest.mark.both_brokers
def test_a_partition_lost_before_its_labels_committed_and_back_sends_the_kept_labels(make_config, kafka_flavour):
    """An assignment lost while a transaction waits to commit (a coordinator unreachable for
    longer than the session timeout) and then given back: the teacher reads those batches
    again and sends the labels it scored before training on them, without training twice;
    no batch is left unlabelled and a checkpoint in between resumes before them."""
    config = make_config(topics={"partitions": 1}, teacher={"max_transaction_seconds": 30.0})
    produce_synthetic(config, 4 * 128, batch_size=128)
    teacher, records, outbox, scored = _four_batches_labelled(config)
    teacher.producer.begin_transaction()  # the commit fails: aborted, the labels wait for a retry
    teacher._abort(outbox)
    first = records[0].offset()
    tp = TopicPartition(config.topics.examples, 0)
    teacher._revoked(teacher.consumer, [tp])  # the session expired: librdkafka calls on_lost
    assert not teacher.outbox.records and teacher.handed_away[0].start == first
    assert teacher._resume_offsets() == {0: first}  # a checkpoint now would resume before them
    produce_synthetic(config, 2 * 128, batch_size=128)
    back = TopicPartition(config.topics.examples, 0)
    teacher._assigned(teacher.consumer, [back])  # the rejoin gives it back
    assert back.offset == first
    # A record fetched before the loss can still come after it: one past the kept batches is
    # not labelled (that would move the partition past them); it is read again after them.
    end = teacher.handed_away[0].end
    past = next(m for m in read_all(config, config.topics.examples) if m.offset() >= end)
    stray = Outbox([])
    teacher._label_one(Read(past, teacher._decode(past)), stray, 0)
    assert not stray.records and not stray.labels and teacher.handed_away[0].start == first
    run_until(lambda: teacher.examples_labeled >= 6 * 128, [teacher.step], 30)
    assert not teacher.handed_away and teacher.examples_trained == 6 * 128  # trained once each
    teacher.close()
    labels = [lb for _, _, lb in read_labels(config)]
    assert {lb.batch_id for lb in labels} == set(example_batch_ids(config))
    for lb in labels:
        if lb.batch_id in scored:  # the kept, out-of-sample labels
            np.testing.assert_array_equal(lb.logits, scored[lb.batch_id])
    if kafka_flavour == "apache":
        assert len(labels) == 6


def test_records_of_a_partition_the_teacher_does_not_own_are_not_read(make_config):
    """What a poll returns for a partition no longer assigned (fetched before a revoke) is
    dropped: labelling it would move that partition's trained-through offset."""
    config = make_config(topics={"partitions": 2})
    produce_synthetic(config, 8 * 128, batch_size=128)
    teacher = TeacherWorker(config)
    teacher.start()
    deadline = time.monotonic() + 30
    while teacher.assigned != {0, 1} and time.monotonic() < deadline:
        teacher._read(1, 0.5)  # joins the group; the consumer keeps both partitions
    teacher.assigned = {0}  # the bookkeeping as right after partition 1 was revoked
    seen: list = []
    while len(seen) < 4 and time.monotonic() < deadline:
        seen += teacher._read(100, 0.5)
    assert seen and {r.record.partition() for r in seen} == {0}
    teacher.close()


def test_checkpoint_restore_resumes_at_the_right_offsets(make_config):
    config = make_config(topics={"partitions": 2})
    n1 = produce_synthetic(config, 10 * 200, batch_size=200)["batches"]
    first = _run_teacher(config, n1)
    first.close()
    saved = dict(first.trained_through)
    assert sum(saved.values()) == n1
    second = TeacherWorker(config)
    assert second.trained_through == saved and second.version == first.version >= 1
    second.start()
    n2 = produce_synthetic(config, 4 * 200, batch_size=200)["batches"]
    run_until(lambda: sum(second.trained_through.values()) >= n1 + n2, [second.step], 60)
    second.close()
    labels = read_labels(config)
    ids = [lb.batch_id for _, _, lb in labels]
    assert len(ids) == len(set(ids)) == n1 + n2  # the restored teacher labelled only the new batches
    assert second.version == first.version + 1


@pytest.mark.both_brokers
def test_sigkill_mid_stream_leaves_no_batch_unlabelled(make_config, tmp_path):
    config = make_config(topics={"partitions": 2}, teacher={"checkpoint": {"every_batches": 7}})
    produced = produce_synthetic(config, 160 * 128, batch_size=128)
    path = write_config(config, tmp_path / "config.yaml")
    log = tmp_path / "teacher.log"
    for round_ in range(2):
        proc = spawn(["teacher", "--config", str(path)], log)
        deadline = time.monotonic() + 60
        target = 30 * (round_ + 1)
        while len(read_all(config, config.topics.labels, timeout=2, idle=0.3)) < target:
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "teacher made no progress"
            time.sleep(0.2)
        kill9(proc)
    progress = config.progress_dir() / "teacher-teacher.jsonl"
    before = len(progress.read_text().splitlines()) if progress.exists() else 0
    proc = spawn(["teacher", "--config", str(path)], log)
    examples = example_batch_ids(config)
    # Done when every batch has a label and the restarted teacher has replayed its way from
    # its checkpoint to the end (labels of killed runs are visible before that): its own
    # progress lines, not a killed one's, must say so.
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        labelled = {lb.batch_id for _, _, lb in read_labels(config)}
        lines = progress.read_text().splitlines() if progress.exists() else []
        trained = json.loads(lines[-1])["examples_trained"] if len(lines) > before else 0
        if labelled >= set(examples) and trained >= produced["examples"]:
            break
        time.sleep(0.5)
    assert stop(proc) == 0, log.read_text()[-3000:]
    labels = read_labels(config)
    assert len(examples) == produced["batches"]
    assert {lb.batch_id for _, _, lb in labels} == set(examples)  # nothing left unlabelled
    by_offset = {}
    for _, _, lb in labels:  # a duplicate is the same example batch (same id, same source)
        by_offset.setdefault(lb.batch_id, set()).add((lb.source_partition, lb.source_offset))
    assert all(len(v) == 1 for v in by_offset.values())
    summary = json.loads((config.progress_dir() / "teacher-teacher.summary.json").read_text())
    assert summary["examples_trained"] >= produced["examples"]


@pytest.mark.slow
def test_teacher_learns_better_than_a_small_model(make_config):
    big = make_config(topics={"partitions": 1})
    small = make_config(
        topics={"partitions": 1},
        teacher={
            "name": "small",
            "model": {"hidden": [16], "embedding_dim": 2, "cross_layers": 0, "learning_rate": 0.005},
        },
    )
    # the small teacher reads the same examples: point it at the big one's topics
    small.topics.examples, small.topics.labels = big.topics.examples, small.topics.labels
    produced = produce_synthetic(big, 60_000)
    from distill.core.kafka import Clients, ensure_topics

    ensure_topics(small, Clients(small.kafka, "t").admin())
    results = {}
    for cfg in (big, small):
        teacher = _run_teacher(cfg, produced["batches"], timeout=120)
        results[cfg.teacher.name] = teacher.snapshot()["metrics"]["click"]["main"]["cumulative"]
        teacher.close()
    # Seed 7 of the synthetic stream, one partition so that the order (and so the result) does
    # not depend on how a loaded machine interleaves partitions: the teacher reaches 0.617
    # cumulative AUC over these 60k examples and the small model 0.551.
    assert results["teacher"]["auc"] > 0.58, results
    assert results["teacher"]["auc"] > results["small"]["auc"] + 0.025, results
    assert results["teacher"]["logloss"] < results["small"]["logloss"], results


def test_a_checkpoint_holds_the_state_when_taken_and_is_written_while_training_goes_on(make_config, tmp_path):
    """The state is serialized when the checkpoint is taken; the write and its fsyncs run on the
    checkpoint thread, and a write that fails raises at the next checkpoint."""
    teacher = TeacherWorker(make_config(teacher={"model": {"hidden": [16], "embedding_dim": 8}}))
    write, release, writers = teacher.checkpointer.write, threading.Event(), []

    def held_write(version, payload):  # the real write, once the test lets it go
        writers.append(threading.current_thread().name)
        assert release.wait(30)
        return write(version, payload)

    teacher.checkpointer.write = held_write
    teacher.examples_trained = 5
    weights = {k: v.clone() for k, v in teacher.model.state_dict().items()}
    teacher.checkpoint()  # returns while the write waits
    assert teacher.checkpointer.versions() == []
    teacher.examples_trained = 99  # training goes on meanwhile
    with torch.no_grad():
        for p in teacher.model.parameters():
            p.add_(1.0)
    release.set()
    teacher.checkpoint_written()
    version, state = teacher.checkpointer.load_latest()
    assert (version, state["examples_trained"], writers) == (1, 5, ["teacher-checkpoint_0"])
    for k, v in weights.items():
        assert torch.equal(state["model"][k], v), k

    blocker = tmp_path / "not-a-directory"
    blocker.write_text("a file where the checkpoint directory should be")
    teacher.checkpointer.dir = blocker / "ckpt"
    teacher.checkpoint()  # taken; its write fails on the checkpoint thread
    with pytest.raises(OSError):
        teacher.checkpoint()
    teacher.checkpoint_writer.shutdown()


def test_commits_overlap_training_but_checkpoints_and_labels_wait_for_them(make_config):
    """The commit runs on the publisher thread while the next transaction trains. A checkpoint
    never resumes past an offset whose labels have not committed (else a crash would leave
    those batches unlabelled), and the labels reach the topic in offset order."""
    config = make_config(
        topics={"partitions": 1},
        teacher={
            "max_transaction_seconds": 0.001,  # one transaction per batch or two: many overlap
            "checkpoint": {"every_batches": 1},
            "model": {"hidden": [16], "embedding_dim": 8},
        },
    )
    produced = produce_synthetic(config, 40 * 64, batch_size=64)
    teacher = TeacherWorker(config)
    teacher.start()
    examples = TopicPartition(config.topics.examples, 0)
    checked = 0

    def step() -> None:
        nonlocal checked
        teacher.step()
        found = teacher.checkpointer.load_latest()
        if found is None:
            return
        state = found[1]
        # every batch trained when it was taken had its labels committed
        assert state["examples_labeled"] == state["examples_trained"], state["version"]
        committed = teacher.consumer.committed([examples], 10)[0].offset
        assert state["trained_through"].get(0, 0) <= committed
        checked += 1

    run_until(lambda: teacher.examples_labeled >= produced["examples"], [step], 60)
    teacher.close()
    assert checked >= 10
    assert teacher.version >= 10  # checkpoints were taken between the overlapping commits
    offsets = [lb.source_offset for _, _, lb in read_labels(config)]
    assert len(offsets) == produced["batches"] and offsets == sorted(offsets)
