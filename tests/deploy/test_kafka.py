"""Strimzi resources (deploy/kafka): a structural check (no CRD schemas offline), and agreement
with the configuration the workers load in the overlay they are deployed with."""

from __future__ import annotations

from typing import Any

import pytest

from producers.recovery import positions_topic
from tests.deploy.support import (
    APP_OVERLAYS,
    KAFKA_FOR,
    effective_config,
    main_container,
    named,
    of_kind,
)

STRIMZI = "kafka.strimzi.io/v1beta2"
TOPICS = ("examples", "labels", "examples.dlq", "labels.dlq", "teacher.checkpoints", "examples.positions")
WEEK_MS = 7 * 24 * 3600 * 1000


def strimzi(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [d for d in docs if d["apiVersion"].startswith("kafka.strimzi.io/")]


def topics_by_name(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {t["spec"].get("topicName", t["metadata"]["name"]): t for t in of_kind(docs, "KafkaTopic")}


@pytest.mark.parametrize("overlay", ["dev", "prod"])
def test_strimzi_resources_are_well_formed(kafka_overlays, overlay):
    docs = kafka_overlays[overlay]
    resources = strimzi(docs)
    assert {d["kind"] for d in resources} == {"Kafka", "KafkaNodePool", "KafkaTopic", "KafkaUser"}
    for d in resources:
        assert d["apiVersion"] == STRIMZI, f"{d['kind']} {d['metadata']['name']}"
        assert d["metadata"]["name"] and isinstance(d.get("spec"), dict)
    (kafka,) = of_kind(docs, "Kafka")
    cluster = kafka["metadata"]["name"]
    spec = kafka["spec"]
    assert "zookeeper" not in spec, "KRaft: no ZooKeeper"
    assert kafka["metadata"]["annotations"]["strimzi.io/kraft"] == "enabled"
    assert kafka["metadata"]["annotations"]["strimzi.io/node-pools"] == "enabled"
    assert spec["kafka"]["version"]
    listeners = spec["kafka"]["listeners"]
    assert listeners and all({"name", "port", "type", "tls"} <= set(li) for li in listeners)
    assert len({li["port"] for li in listeners}) == len(listeners)
    assert {"topicOperator", "userOperator"} <= set(spec["entityOperator"])

    pools = of_kind(docs, "KafkaNodePool")
    roles = set()
    brokers = 0
    for pool in pools:
        assert pool["metadata"]["labels"]["strimzi.io/cluster"] == cluster
        assert pool["spec"]["replicas"] >= 1
        assert set(pool["spec"]["roles"]) <= {"controller", "broker"}
        assert pool["spec"]["storage"]["type"] in ("jbod", "persistent-claim", "ephemeral")
        roles |= set(pool["spec"]["roles"])
        brokers += pool["spec"]["replicas"] if "broker" in pool["spec"]["roles"] else 0
    assert roles == {"controller", "broker"}, "KRaft needs controllers and brokers"

    config = spec["kafka"]["config"]
    for key in (
        "offsets.topic.replication.factor",
        "transaction.state.log.replication.factor",
        "default.replication.factor",
    ):
        assert 1 <= config[key] <= brokers, key
    assert config["transaction.state.log.min.isr"] <= config["transaction.state.log.replication.factor"]

    topics = topics_by_name(docs)
    assert set(TOPICS) <= set(topics), f"missing topics {set(TOPICS) - set(topics)}"
    for name, t in topics.items():
        assert t["metadata"]["labels"]["strimzi.io/cluster"] == cluster, name
        s = t["spec"]
        assert s["partitions"] >= 1 and 1 <= s["replicas"] <= brokers, name
        assert int(s["config"]["min.insync.replicas"]) <= s["replicas"], name
    assert topics["examples"]["spec"]["partitions"] == topics["labels"]["spec"]["partitions"], (
        "examples and labels must have the same partition count"
    )
    for name in ("examples", "labels"):
        assert int(topics[name]["spec"]["config"]["retention.ms"]) >= WEEK_MS, f"{name}: students backfill a week"
    # A replay producer's positions: only each producer's last record counts, read in order.
    positions = topics[positions_topic("examples")]["spec"]
    assert positions["partitions"] == 1, "the positions topic has one partition (overlays must not patch it)"
    assert positions["config"]["cleanup.policy"] == "compact"

    (user,) = of_kind(docs, "KafkaUser")
    assert user["metadata"]["labels"]["strimzi.io/cluster"] == cluster
    assert user["spec"]["authentication"]["type"] == "scram-sha-512"


def _allows(acls: list[dict[str, Any]], kind: str, name: str, operation: str) -> bool:
    for acl in acls:
        r = acl["resource"]
        if r["type"] != kind or operation not in acl["operations"]:
            continue
        if kind == "cluster":
            return True
        if r.get("patternType", "literal") == "literal" and r["name"] in (name, "*"):
            return True
        if r.get("patternType") == "prefix" and name.startswith(r["name"]):
            return True
    return False


@pytest.mark.parametrize("overlay", APP_OVERLAYS)
def test_workers_config_agrees_with_the_kafka_they_are_deployed_with(app_overlays, kafka_overlays, overlay, tmp_path):
    docs = app_overlays[overlay]
    kdocs = kafka_overlays[KAFKA_FOR[overlay]]
    (kafka,) = of_kind(kdocs, "Kafka")
    (user,) = of_kind(kdocs, "KafkaUser")
    topics = topics_by_name(kdocs)
    cluster = kafka["metadata"]["name"]
    (ns,) = of_kind(docs, "Namespace")
    assert {d["metadata"].get("namespace") for d in strimzi(kdocs)} == {ns["metadata"]["name"]}, (
        "Kafka must live in the workers' namespace: they read the Secrets Strimzi writes there"
    )
    acls = user["spec"]["authorization"]["acls"]

    producers = 0
    for d in of_kind(docs, "Deployment"):
        cfg = effective_config(docs, d, tmp_path)
        where = d["metadata"]["name"]
        # Where and how to connect.
        host, port = cfg.kafka.bootstrap_servers.split(",")[0].rsplit(":", 1)
        assert host.split(".")[0] == f"{cluster}-kafka-bootstrap", where
        (listener,) = [li for li in kafka["spec"]["kafka"]["listeners"] if li["port"] == int(port)]
        auth = listener.get("authentication", {}).get("type")
        expected = {
            (True, "scram-sha-512"): "SASL_SSL",
            (False, "scram-sha-512"): "SASL_PLAINTEXT",
            (True, None): "SSL",
            (False, None): "PLAINTEXT",
        }[(listener["tls"], auth)]
        assert cfg.kafka.security_protocol == expected, where
        if auth == "scram-sha-512":
            assert cfg.kafka.sasl_mechanism == "SCRAM-SHA-512"
            assert cfg.kafka.sasl_username == user["metadata"]["name"]
            env = {e["name"]: e for e in d["spec"]["template"]["spec"]["containers"][0]["env"]}
            ref = env["DISTILL_KAFKA__SASL_PASSWORD"]["valueFrom"]["secretKeyRef"]
            assert (ref["name"], ref["key"]) == (user["metadata"]["name"], "password"), "Strimzi's user Secret"
        if listener["tls"]:
            secrets = {v["secret"]["secretName"] for v in d["spec"]["template"]["spec"]["volumes"] if "secret" in v}
            assert f"{cluster}-cluster-ca-cert" in secrets, f"{where}: mount Strimzi's cluster CA"

        # The topics the workers expect are the ones Strimzi creates.
        t = cfg.topics
        for name in (t.examples, t.labels):
            spec = topics[name]["spec"]
            assert spec["partitions"] == t.partitions, f"{where}: topics.partitions vs KafkaTopic {name}"
            assert spec["replicas"] == t.replication_factor, f"{where}: topics.replication_factor vs {name}"
            assert int(spec["config"]["retention.ms"]) == t.retention_ms, f"{where}: topics.retention_ms vs {name}"
            assert int(spec["config"]["max.message.bytes"]) >= cfg.wire.max_message_bytes + 65536, name
        for name in (t.dlq(t.examples), t.dlq(t.labels)):
            assert name in topics

        # What the user may do covers what the workers do.
        for name in (t.examples, t.labels):
            for op in ("Describe", "Read", "Write"):
                assert _allows(acls, "topic", name, op), f"ACL {op} on topic {name}"
        for name in (t.dlq(t.examples), t.dlq(t.labels)):
            assert _allows(acls, "topic", name, "Write"), f"ACL Write on topic {name}"
        assert _allows(acls, "group", cfg.teacher.group_id, "Read")
        assert _allows(acls, "transactionalId", f"{cfg.teacher.group_id}.{cfg.teacher.name}", "Write")
        # The pool: labelers consume in their group, each with its own transactional id (from
        # its pod name); the trainer reads the group's offsets; checkpoints are announced.
        pool = cfg.teacher.pool
        if cfg.teacher.role == "labeler":
            assert _allows(acls, "group", pool.labeler_group_id, "Read"), f"ACL Read on group {pool.labeler_group_id}"
            assert _allows(acls, "transactionalId", f"{pool.labeler_group_id}.{cfg.teacher.name}", "Write")
        if cfg.teacher.role in ("trainer", "labeler"):
            assert _allows(acls, "group", pool.labeler_group_id, "Describe"), "offsets of the labelers' group"
            spec = topics[t.checkpoints]["spec"]
            assert spec["partitions"] == 1, "announcements are read in order: one partition"
            for op in ("Describe", "Read", "Write"):
                assert _allows(acls, "topic", t.checkpoints, op), f"ACL {op} on topic {t.checkpoints}"
        for s in cfg.students:
            assert _allows(acls, "group", s.group_id, "Read"), f"ACL Read on group {s.group_id}"
        # A resumable replay producer (a position file) is transactional and keeps its position
        # in <examples>.positions (producers/service.py, producers/recovery.py).
        if main_container(d)["args"][0] == "produce" and cfg.producer.position_file:
            name = positions_topic(t.examples)
            assert name in topics, f"{where}: a resumable producer needs the KafkaTopic {name}"
            spec = topics[name]["spec"]
            assert spec["partitions"] == 1 and spec["config"]["cleanup.policy"] == "compact", name
            assert spec["replicas"] == t.replication_factor, f"{where}: topics.replication_factor vs {name}"
            for op in ("Describe", "Read", "Write"):
                assert _allows(acls, "topic", name, op), f"ACL {op} on topic {name}"
            tid = f"producer.{cfg.producer.producer_id}"
            for op in ("Describe", "Write"):
                assert _allows(acls, "transactionalId", tid, op), f"ACL {op} on transactional id {tid}"
            producers += 1
        assert _allows(acls, "cluster", "", "IdempotentWrite")
    assert producers == 1, "the producer Deployment replays with a position file (config.toml): exactly-once"


def test_kafka_dev_and_prod_differ_only_in_size(kafka_overlays):
    dev, prod = kafka_overlays["dev"], kafka_overlays["prod"]
    assert named(prod, "KafkaNodePool", "dual-role")["spec"]["replicas"] == 3
    assert named(dev, "KafkaNodePool", "dual-role")["spec"]["replicas"] == 1
    assert set(topics_by_name(dev)) == set(topics_by_name(prod))
