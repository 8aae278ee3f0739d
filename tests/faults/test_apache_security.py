"""Security on Apache Kafka itself: SCRAM-SHA-512 users, ACLs and native TLS.

One broker for the module: a SASL_SSL listener whose certificate a throw-away CA signed
(tests/kafka/pki.py), one SCRAM user per ``KafkaUser`` of deploy/kafka/base/user.yaml, and
exactly the ACLs those manifests grant (tests/kafka/acls.py). The workers run with their own
role's credentials and nothing else, so these tests prove both that the rights suffice and that
they stop what a role must not do. The set-up (topics) goes through the brokers' plaintext
listener, as the cluster operator (Strimzi) would create them.
"""

from __future__ import annotations

import logging
import os
import subprocess

import pytest
from confluent_kafka import KafkaError, KafkaException, TopicPartition

from distill.core.exceptions import BrokerError, ConfigError
from distill.core.kafka import Clients, ensure_topics, wait_for_broker
from producers import recovery
from producers.service import run_producer
from student_worker.worker import StudentWorker
from teacher_worker.worker import TeacherWorker
from tests.integration.workers import example_batch_ids, run_until, spawn, write_config
from tests.kafka import acls
from tests.kafka.apache import ApacheKafka, Security, unavailable
from tests.kafka.pki import OPENSSL, make_pki

pytestmark = pytest.mark.apache

# The deployment's names (deploy/k8s/base/config.toml): the ACLs name these topics and groups.
TOPICS = {"examples": "examples", "labels": "labels", "checkpoints": "teacher.checkpoints", "partitions": 2}
TEACHER = {"group_id": "teacher", "pool": {"labeler_group_id": "teacher.labelers"}}
STUDENT = {"name": "aux", "mode": "aux", "label_wait_s": 30.0, "checkpoint": {"every_batches": 5}}


def password(user: str) -> str:
    return f"{user}-Secr3t"


@pytest.fixture(scope="module")
def secure(tmp_path_factory: pytest.TempPathFactory):
    reason = unavailable() or (None if OPENSSL else "openssl is not installed (apt-get install openssl)")
    if reason:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true and Apache Kafka cannot run: {reason}")
        pytest.skip(reason)
    pki = make_pki(tmp_path_factory.mktemp("pki"))
    users = acls.kafka_users()
    security = Security(users={name: password(name) for name in users}, pki=pki)
    with ApacheKafka(root=tmp_path_factory.mktemp("secure-kafka"), security=security) as kafka:
        from confluent_kafka.admin import AdminClient

        assert acls.apply(AdminClient({"bootstrap.servers": kafka.bootstrap}), users) > 40
        kafka.warm_up()
        yield kafka


@pytest.fixture
def as_user(secure, make_config, tmp_path):
    """``as_user(user, **overrides)``: a Config for the secure listener as ``user``."""

    def make(user: str | None, pw: str | None = None, ca: str = "ca.pem", **overrides):
        kafka = {
            "bootstrap_servers": secure.secure_bootstrap,
            "security_protocol": "SASL_SSL",
            "sasl_mechanism": "SCRAM-SHA-512",
            "sasl_username": user,
            "sasl_password": pw if pw is not None else (password(user) if user else None),
            "ssl_ca_location": str(secure.security.pki / ca),
            "extra": {},
        }
        base = {"topics": TOPICS, "teacher": TEACHER, "students": [STUDENT], "producer": {"producer_id": "demo"}}
        return make_config(kafka=kafka | overrides.pop("kafka", {}), **(base | overrides))

    return make


@pytest.fixture
def topics(secure, make_config):
    """The pipeline's topics, created by the operator (the plaintext listener's super user)."""
    operator = make_config(kafka={"bootstrap_servers": secure.bootstrap, "extra": {}}, topics=TOPICS)
    admin = Clients(operator.kafka, "operator").admin()
    ensure_topics(operator, admin, seconds=30)
    recovery.ensure_positions_topic(admin, recovery.positions_topic("examples"), 1)
    return operator


def _error_code(exc: KafkaException) -> int:
    return exc.args[0].code()


def test_each_role_runs_the_pipeline_with_only_its_own_rights(as_user, topics, tmp_path):
    """Producer (a resumable replay: transactions and its positions topic), teacher and a
    student, each as its own KafkaUser: every batch labelled and trained once."""
    producer_cfg = as_user("distill-producer")
    produced = run_producer(
        producer_cfg,
        "synthetic",
        handle_signals=False,
        serve_http=False,
        max_examples=2000,
        batch_size=200,
        linger_ms=5,
        position_file=tmp_path / "position.json",
    )
    assert produced["transactions"] >= 1 and produced["examples"] == 2000, produced
    batches = example_batch_ids(topics)
    assert len(batches) == produced["batches"]

    teacher = TeacherWorker(as_user("distill-teacher"))
    student = StudentWorker(as_user("distill-student-aux"), "aux")
    teacher.start()
    student.start()
    try:
        run_until(lambda: student.counts["batches_trained"] >= len(batches), [teacher.step, student.step], 120)
    finally:
        teacher.close()
        student.close()
    assert teacher.examples_labeled >= 2000
    assert student.counts["joined"] == len(batches) and student.counts["missing"] == 0
    assert sorted(student.trained_batch_ids) == sorted(batches)


def test_the_teacher_at_scale_runs_as_the_teacher_user(as_user, topics, tmp_path):
    """A trainer and a labeler (the pool) with the teacher's rights only: checkpoints announced
    and read, labels committed, the labelers' offsets read for the lead bound."""
    import torch

    from teacher_worker.labeler import Labeler
    from teacher_worker.ranks import Ranks
    from teacher_worker.trainer import Trainer

    pool = {"publish_every_batches": 3, "publish_every_seconds": 60.0, "lead_check_seconds": 0.2}
    config = as_user(
        "distill-teacher",
        teacher=TEACHER | {"max_batches_per_step": 4, "poll_timeout_s": 0.05, "pool": TEACHER["pool"] | pool},
    )
    before = len(example_batch_ids(topics))
    producer = as_user("distill-producer", producer={"producer_id": "pool"})
    run_producer(producer, "synthetic", handle_signals=False, serve_http=False, max_examples=1200, batch_size=200)
    total = len(example_batch_ids(topics))
    assert total > before
    trainer = Trainer(config, Ranks(), torch.device("cpu"))
    labeler = Labeler(config.model_copy(update={"teacher": config.teacher.model_copy(update={"name": "labeler-0"})}))
    trainer.start()
    labeler.start()
    try:
        # a label committed and a second checkpoint announced (the lead bound read the group)
        run_until(lambda: labeler.examples_labeled > 0 and trainer.version >= 1, [trainer.step, labeler.step], 120)
    finally:
        trainer.close()
        labeler.close()


def test_a_student_cannot_write_labels_nor_use_another_students_group(as_user, topics, consume):
    student = Clients(as_user("distill-student-aux").kafka, "forger")
    producer = student.producer()
    failures: list[KafkaError] = []
    producer.produce("labels", b"forged", partition=0, on_delivery=lambda err, _msg: failures.append(err))
    producer.flush(30)
    assert [e.code() for e in failures] == [KafkaError.TOPIC_AUTHORIZATION_FAILED], failures
    # The idempotent producer it needs for dead letters works on its own DLQ.
    failures.clear()
    producer.produce("labels.dlq", b"a dead letter", partition=0, on_delivery=lambda err, _msg: failures.append(err))
    producer.flush(30)
    assert failures == [None]

    consumer = student.consumer("student.direct")  # another student's group: its offsets are not ours
    try:
        consumer.subscribe(["examples"])
        assert _first_error(consumer) == KafkaError.GROUP_AUTHORIZATION_FAILED
    finally:
        consumer.close()
    # Nor can it take over the teacher's transactional id (and so fence the teacher).
    txn = student.producer("teacher.teacher")
    with pytest.raises(KafkaException) as caught:
        txn.init_transactions(30)
    assert _error_code(caught.value) == KafkaError.TRANSACTIONAL_ID_AUTHORIZATION_FAILED


def _first_error(consumer, seconds: float = 20.0) -> int | None:
    """The code of the first error the consumer reports; it must read no message before it."""
    for _ in range(int(seconds / 0.2)):
        msg = consumer.poll(0.2)
        if msg is not None:
            assert msg.error() is not None, f"read a message it must not: {msg.topic()} {msg.offset()}"
            return msg.error().code()
    return None


def _errors_until(consumer, wanted: int, seconds: float = 20.0) -> list[int]:
    """The error codes the consumer reports until ``wanted`` comes; it must read no message."""
    codes: list[int] = []
    for _ in range(int(seconds / 0.2)):
        msg = consumer.poll(0.2)
        if msg is not None:
            assert msg.error() is not None, f"read a message it must not: {msg.topic()} {msg.offset()}"
            codes.append(msg.error().code())
            if codes[-1] == wanted:
                break
    return codes


def test_a_producer_cannot_read_labels(as_user, topics):
    consumer = Clients(as_user("distill-producer").kafka, "reader").consumer("producer-reads-labels")
    try:
        consumer.assign([TopicPartition("labels", 0, 0)])
        # The producer has no group rights either: the group's refusal may come first.
        codes = _errors_until(consumer, KafkaError.TOPIC_AUTHORIZATION_FAILED)
        assert codes and codes[-1] == KafkaError.TOPIC_AUTHORIZATION_FAILED, codes
        assert set(codes) <= {KafkaError.TOPIC_AUTHORIZATION_FAILED, KafkaError.GROUP_AUTHORIZATION_FAILED}, codes
    finally:
        consumer.close()


def test_a_wrong_password_stops_the_worker_at_start_with_the_fix(as_user, topics, tmp_path):
    wrong = as_user("distill-student-aux", pw="not-the-password")
    with pytest.raises(ConfigError, match="refused to authenticate as 'distill-student-aux'.*sasl_password"):
        wait_for_broker(Clients(wrong.kafka, "wrong").admin(), seconds=None)  # not retried forever

    # The real process: exit 2 with one clear line, no traceback, no password in its output.
    path = write_config(wrong, tmp_path / "config.yaml")
    log = tmp_path / "student.log"
    proc = spawn(["student", "--name", "aux", "--config", str(path)], log)
    try:
        code = proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail(f"a wrong password must stop the student, it ran on:\n{log.read_text()[-2000:]}")
    text = log.read_text()
    assert code == 2, text[-2000:]
    assert "error: the broker refused to authenticate as 'distill-student-aux'" in text, text[-2000:]
    assert "Traceback" not in text and "not-the-password" not in text


def test_native_tls_with_the_test_ca(as_user, topics, caplog, capfd):
    right = as_user("distill-keda")
    wait_for_broker(Clients(right.kafka, "tls").admin(), seconds=30)  # the CA that signed the broker

    caplog.set_level(logging.WARNING, logger="distill.core.kafka")
    other = as_user("distill-keda", ca="other-ca.pem")
    with pytest.raises(BrokerError, match="broker unreachable"):
        wait_for_broker(Clients(other.kafka, "other-ca").admin(), seconds=3)
    said = caplog.text + capfd.readouterr().err
    assert "certificate verify failed" in said, said[-2000:]

    plain = as_user("distill-keda", kafka={"security_protocol": "SASL_PLAINTEXT"})
    with pytest.raises(BrokerError):  # TLS is not optional on this listener
        wait_for_broker(Clients(plain.kafka, "no-tls").admin(), seconds=3)


def test_keda_may_read_the_labelers_lag_and_nothing_else(as_user, topics):
    keda = Clients(as_user("distill-keda").kafka, "keda")
    consumer = keda.consumer("teacher.labelers")
    try:
        [tp] = consumer.committed([TopicPartition("examples", 0)], 20)
        assert tp.error is None  # OffsetFetch of the labelers' group: allowed
        low, high = consumer.get_watermark_offsets(TopicPartition("examples", 0), timeout=20)
        assert 0 <= low <= high
        consumer.assign([TopicPartition("examples", 0, 0)])
        assert _first_error(consumer) == KafkaError.TOPIC_AUTHORIZATION_FAILED
    finally:
        consumer.close()
