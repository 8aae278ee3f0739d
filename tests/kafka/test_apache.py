"""The Apache Kafka helper itself: a 3-broker KRaft cluster that keeps committing transactions
when the partition leader is killed."""

from __future__ import annotations

import os

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from tests.kafka.apache import ApacheKafka, unavailable

pytestmark = pytest.mark.apache


def need_apache_kafka() -> None:
    reason = unavailable()
    if reason:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true and Apache Kafka cannot run: {reason}")
        pytest.skip(reason)


@pytest.fixture
def cluster(tmp_path):
    need_apache_kafka()
    with ApacheKafka(brokers=3, root=tmp_path) as kafka:
        yield kafka


def test_a_cluster_id_that_starts_with_a_dash_formats(tmp_path):
    # A random id starts with "-" one time in 64; passed as its own argument, it read as an option.
    need_apache_kafka()
    kafka = ApacheKafka(root=tmp_path)
    kafka.format(cluster_id="-" + "A" * 21)
    meta = (tmp_path / "node-0" / "data" / "meta.properties").read_text()
    assert "cluster.id=-" + "A" * 21 in meta


def test_three_brokers_commit_transactions_with_the_leader_killed(cluster):
    conf = {"bootstrap.servers": cluster.bootstrap, "log_level": 0}
    admin = AdminClient(conf)
    for future in admin.create_topics([NewTopic("replicated", 1, replication_factor=3)]).values():
        future.result(30)
    producer = Producer(conf | {"transactional.id": "t", "acks": "all"})
    producer.init_transactions(30)

    def send(value: bytes) -> None:
        producer.begin_transaction()
        producer.produce("replicated", value=value, partition=0)
        producer.commit_transaction(60)

    send(b"before")
    leader = admin.list_topics(timeout=10).topics["replicated"].partitions[0].leader
    cluster.stop_node(leader - 1, kill=True)  # node ids are 1-based; min.insync.replicas=2 of 3
    send(b"after")
    consumer = Consumer(conf | {"group.id": "g", "isolation.level": "read_committed", "enable.auto.commit": False})
    try:
        consumer.assign([TopicPartition("replicated", 0, 0)])
        got = []
        for _ in range(150):
            msg = consumer.poll(0.2)
            if msg is not None and msg.error() is None:
                got.append(msg.value())
            if len(got) == 2:
                break
        assert got == [b"before", b"after"]
    finally:
        consumer.close()
