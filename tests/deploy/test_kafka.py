"""Strimzi resources (deploy/kafka): a structural check (no CRD schemas offline), and agreement
with the configuration the workers load in the overlay they are deployed with."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
import yaml

from producers.recovery import positions_topic
from tests.deploy.support import (
    APP_OVERLAYS,
    DEPLOY,
    GRAFANA,
    KAFKA_FOR,
    PROMETHEUS,
    effective_config,
    load_yaml,
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

    for user in of_kind(docs, "KafkaUser"):
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
    """Where and as whom each workload connects, and the topics it expects. What its KafkaUser
    may do is test_principals.py's."""
    docs = app_overlays[overlay]
    kdocs = kafka_overlays[KAFKA_FOR[overlay]]
    (kafka,) = of_kind(kdocs, "Kafka")
    topics = topics_by_name(kdocs)
    cluster = kafka["metadata"]["name"]
    (ns,) = of_kind(docs, "Namespace")
    assert {d["metadata"].get("namespace") for d in strimzi(kdocs)} == {ns["metadata"]["name"]}, (
        "Kafka must live in the workers' namespace: they read the Secrets Strimzi writes there"
    )

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
            user = named(kdocs, "KafkaUser", cfg.kafka.sasl_username)  # its own KafkaUser
            assert user["spec"]["authentication"]["type"] == "scram-sha-512", where
            env = {e["name"]: e for e in d["spec"]["template"]["spec"]["containers"][0]["env"]}
            ref = env["DISTILL_KAFKA__SASL_PASSWORD"]["valueFrom"]["secretKeyRef"]
            assert (ref["name"], ref["key"]) == (user["metadata"]["name"], "password"), (
                f"{where}: Strimzi's user Secret"
            )
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
        if cfg.teacher.role in ("trainer", "labeler"):
            assert topics[t.checkpoints]["spec"]["partitions"] == 1, "announcements are read in order: one partition"
        # A resumable replay producer (a position file) is transactional and keeps its position
        # in <examples>.positions (producers/service.py, producers/recovery.py).
        if main_container(d)["args"][0] == "produce" and cfg.producer.position_file:
            name = positions_topic(t.examples)
            assert name in topics, f"{where}: a resumable producer needs the KafkaTopic {name}"
            spec = topics[name]["spec"]
            assert spec["partitions"] == 1 and spec["config"]["cleanup.policy"] == "compact", name
            assert spec["replicas"] == t.replication_factor, f"{where}: topics.replication_factor vs {name}"
            producers += 1
    assert producers == 1, "the producer Deployment replays with a position file (config.toml): exactly-once"


def test_kafka_dev_and_prod_differ_only_in_size(kafka_overlays):
    dev, prod = kafka_overlays["dev"], kafka_overlays["prod"]
    assert named(prod, "KafkaNodePool", "dual-role")["spec"]["replicas"] == 3
    assert named(dev, "KafkaNodePool", "dual-role")["spec"]["replicas"] == 1
    assert set(topics_by_name(dev)) == set(topics_by_name(prod))


# -- Strimzi and Kafka versions ------------------------------------------------------------------
# Kafka versions each Strimzi release supports (its kafka-versions.yaml, "supported: true"), and
# whether it still serves the v1beta2 API these resources use (Strimzi 1.0 removed it).
STRIMZI_KAFKA_VERSIONS = {
    "0.45": ({"3.8.0", "3.8.1", "3.9.0"}, True),
    "0.46": ({"3.9.0", "4.0.0"}, True),
    "0.47": ({"3.9.0", "3.9.1", "4.0.0"}, True),
    "0.48": ({"4.0.0", "4.1.0"}, True),
    "0.49": ({"4.0.0", "4.0.1", "4.1.0", "4.1.1"}, True),
    "0.50": ({"4.0.0", "4.0.1", "4.1.0", "4.1.1"}, True),
    "0.51": ({"4.1.0", "4.1.1", "4.2.0"}, True),
    "1.0": ({"4.1.0", "4.1.1", "4.1.2", "4.2.0"}, False),
}


def test_the_strimzi_versions_the_readme_names_run_this_kafka(kafka_overlays):
    """deploy/README.md names a range of Strimzi releases: each of them supports the Kafka version
    of kafka.yaml and serves the API version of every Strimzi resource here."""
    readme = (DEPLOY / "README.md").read_text()
    found = re.search(r"cluster operator, (\d+\.\d+) to (\d+\.\d+)", readme)
    assert found, "deploy/README.md must name the Strimzi releases: 'cluster operator, X.Y to X.Z'"
    releases = list(STRIMZI_KAFKA_VERSIONS)
    first, last = releases.index(found.group(1)), releases.index(found.group(2))
    assert first <= last
    for docs in kafka_overlays.values():
        (kafka,) = of_kind(docs, "Kafka")
        version = kafka["spec"]["kafka"]["version"]
        for release in releases[first : last + 1]:
            supported, v1beta2 = STRIMZI_KAFKA_VERSIONS[release]
            assert version in supported, f"Strimzi {release} does not run Kafka {version}"
            assert v1beta2 or all(d["apiVersion"] != STRIMZI for d in strimzi(docs)), f"Strimzi {release}: no v1beta2"
        # The release before the range cannot run it: the range starts where it must.
        if first > 0:
            assert version not in STRIMZI_KAFKA_VERSIONS[releases[first - 1]][0], "the range could start earlier"


# -- metrics of Kafka itself ----------------------------------------------------------------------
# MBeans that Kafka 4.1 brokers and KRaft controllers register, written as the JMX exporter
# matches them ("domain<key=value, ...><>attribute: value"): one for every kafka_* metric of the
# JMX exporter that the rules and the dashboard use.
KAFKA_MBEANS = [
    "kafka.server<type=BrokerTopicMetrics, name=MessagesInPerSec, topic=examples><>Count: 7.0",
    "kafka.server<type=BrokerTopicMetrics, name=BytesInPerSec, topic=examples><>Count: 7.0",
    "kafka.server<type=BrokerTopicMetrics, name=BytesOutPerSec, topic=labels><>Count: 7.0",
    "kafka.server<type=BrokerTopicMetrics, name=FailedProduceRequestsPerSec, topic=labels><>Count: 0.0",
    "kafka.server<type=BrokerTopicMetrics, name=FailedFetchRequestsPerSec, topic=labels><>Count: 0.0",
    "kafka.server<type=ReplicaManager, name=UnderReplicatedPartitions><>Value: 0",
    "kafka.server<type=ReplicaManager, name=UnderMinIsrPartitionCount><>Value: 0",
    "kafka.server<type=ReplicaManager, name=OfflineReplicaCount><>Value: 0",
    "kafka.server<type=ReplicaManager, name=PartitionCount><>Value: 40",
    "kafka.server<type=ReplicaManager, name=LeaderCount><>Value: 13",
    "kafka.controller<type=KafkaController, name=ActiveControllerCount><>Value: 1",
    "kafka.controller<type=KafkaController, name=OfflinePartitionsCount><>Value: 0",
    "kafka.controller<type=KafkaController, name=GlobalPartitionCount><>Value: 40",
    "kafka.controller<type=KafkaController, name=ActiveBrokerCount><>Value: 3",
    "kafka.controller<type=KafkaController, name=FencedBrokerCount><>Value: 0",
    "kafka.server<type=KafkaRequestHandlerPool, name=RequestHandlerAvgIdlePercent><>OneMinuteRate: 0.9",
    "kafka.network<type=SocketServer, name=NetworkProcessorAvgIdlePercent><>Value: 0.9",
    "kafka.network<type=RequestMetrics, name=TotalTimeMs, request=Produce><>99thPercentile: 12.0",
    "kafka.network<type=RequestMetrics, name=TotalTimeMs, request=FetchConsumer><>50thPercentile: 3.0",
    "kafka.network<type=RequestMetrics, name=TotalTimeMs, request=EndTxn><>99thPercentile: 9.0",
    "kafka.log<type=Log, name=Size, topic=examples, partition=0><>Value: 1048576",
]
# MBeans the rules must leave out (broker-wide sums of per-topic series, and quantiles not used).
KAFKA_MBEANS_DROPPED = [
    "kafka.server<type=BrokerTopicMetrics, name=MessagesInPerSec><>Count: 7.0",
    "kafka.network<type=RequestMetrics, name=TotalTimeMs, request=Produce><>999thPercentile: 30.0",
    "kafka.network<type=RequestMetrics, name=TotalTimeMs, request=Metadata><>99thPercentile: 1.0",
]
# What Strimzi's Kafka Exporter (kafka_exporter) serves.
KAFKA_EXPORTER_METRICS = {
    "kafka_brokers",
    "kafka_consumergroup_lag",
    "kafka_consumergroup_lag_sum",
    "kafka_consumergroup_current_offset",
    "kafka_consumergroup_members",
    "kafka_topic_partitions",
    "kafka_topic_partition_current_offset",
    "kafka_topic_partition_oldest_offset",
}
KAFKA_METRIC_RE = re.compile(r"\bkafka_[a-z][a-z0-9_]*")


def _jmx_config(docs: list[dict[str, Any]]) -> dict[str, Any]:
    (kafka,) = of_kind(docs, "Kafka")
    metrics = kafka["spec"]["kafka"]["metricsConfig"]
    assert metrics["type"] == "jmxPrometheusExporter"
    ref = metrics["valueFrom"]["configMapKeyRef"]
    return yaml.safe_load(named(docs, "ConfigMap", ref["name"])["data"][ref["key"]])


def _jmx_export(config: dict[str, Any], mbean: str) -> tuple[str, dict[str, str]] | None:
    """What the JMX exporter makes of one MBean attribute: the first rule whose pattern matches
    (unanchored, as the exporter compiles it: ^.*(?:pattern).*$), its name and labels with the
    groups substituted; None when no rule matches."""
    for rule in config["rules"]:
        match = re.match(r"^.*(?:" + rule["pattern"] + r").*$", mbean)
        if match is None:
            continue

        def sub(template: str, m: re.Match = match) -> str:
            return re.sub(r"\$(\d+)", lambda g: m.group(int(g.group(1))), template)

        name = sub(rule["name"])
        if config.get("lowercaseOutputName"):
            name = name.lower()
        return name, {sub(k): sub(v) for k, v in rule.get("labels", {}).items()}
    return None


def _kafka_metrics_used() -> dict[str, set[str]]:
    """kafka_* names in the rules (expressions and annotations) and the dashboard's queries."""
    used: dict[str, set[str]] = {}
    for group in load_yaml(PROMETHEUS / "rules.yaml")["groups"]:
        for rule in group["rules"]:
            text = rule["expr"] + " ".join(rule.get("annotations", {}).values())
            for name in KAFKA_METRIC_RE.findall(text):
                used.setdefault(name, set()).add(rule.get("alert") or rule.get("record"))
    dashboard = json.loads((GRAFANA / "dashboard.json").read_text())
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            for name in KAFKA_METRIC_RE.findall(target.get("expr", "")):
                used.setdefault(name, set()).add(panel["title"])
    return used


@pytest.mark.parametrize("overlay", ["dev", "prod"])
def test_every_kafka_metric_the_rules_and_dashboard_use_is_exported(kafka_overlays, overlay):
    config = _jmx_config(kafka_overlays[overlay])
    exported = set()
    for mbean in KAFKA_MBEANS:
        out = _jmx_export(config, mbean)
        assert out is not None, f"no rule of the JMX exporter config matches {mbean}"
        exported.add(out[0])
    for mbean in KAFKA_MBEANS_DROPPED:
        assert _jmx_export(config, mbean) is None, f"{mbean} would be exported"
    for rule in config["rules"]:
        assert any(re.match(r"^.*(?:" + rule["pattern"] + r").*$", m) for m in KAFKA_MBEANS), (
            f"rule {rule['pattern']} matches no MBean listed here: add its MBean or drop the rule"
        )
    used = _kafka_metrics_used()
    assert {"kafka_consumergroup_lag", "kafka_server_replicamanager_underreplicatedpartitions"} <= set(used)
    missing = {
        name: where for name, where in used.items() if name not in exported and name not in KAFKA_EXPORTER_METRICS
    }
    assert not missing, f"used but neither the JMX exporter nor the Kafka Exporter serves them: {missing}"
    # The labels the queries group by.
    assert _jmx_export(config, KAFKA_MBEANS[0]) == (
        "kafka_server_brokertopicmetrics_messagesin_total",
        {"topic": "examples"},
    )
    produce_p99 = next(m for m in KAFKA_MBEANS if "request=Produce" in m)
    assert _jmx_export(config, produce_p99) == (
        "kafka_network_requestmetrics_totaltimems",
        {"request": "Produce", "quantile": "0.99"},
    )
    assert _jmx_export(config, KAFKA_MBEANS[-1]) == ("kafka_log_log_size", {"topic": "examples", "partition": "0"})


@pytest.mark.parametrize("overlay", APP_OVERLAYS)
def test_the_kafka_exporter_watches_every_group_and_topic_of_the_workers(
    app_overlays, kafka_overlays, overlay, tmp_path
):
    """The lag alerts use the Kafka Exporter's kafka_consumergroup_lag: it must cover the
    consumer groups and topics the deployed workers use (its regexes are Go's; these are
    plain alternations that Python's re reads the same)."""
    (kafka,) = of_kind(kafka_overlays[KAFKA_FOR[overlay]], "Kafka")
    exporter = kafka["spec"]["kafkaExporter"]
    groups, topics = re.compile(exporter["groupRegex"]), re.compile(exporter["topicRegex"])
    seen = set()
    for d in of_kind(app_overlays[overlay], "Deployment"):
        cfg = effective_config(app_overlays[overlay], d, tmp_path)
        for topic in (cfg.topics.examples, cfg.topics.labels):
            assert topics.search(topic), f"topicRegex misses {topic}"
        assert not topics.search(cfg.topics.dlq(cfg.topics.examples)), "the dead-letter topics have no consumers"
        args = main_container(d)["args"]
        if args[0] == "teacher":
            group = cfg.teacher.pool.labeler_group_id if cfg.teacher.role == "labeler" else cfg.teacher.group_id
            seen.add(group)
        elif args[0] == "student":
            seen.add(next(s.group_id for s in cfg.students if s.name == args[args.index("--name") + 1]))
    assert len(seen) >= 4
    for group in seen:
        assert groups.search(group), f"groupRegex misses the consumer group {group}"
    assert not groups.search("console-consumer-1234"), "other groups stay out"


@pytest.mark.parametrize("overlay", ["dev", "prod"])
def test_the_pod_monitor_scrapes_the_kafka_nodes_and_the_exporter(kafka_overlays, overlay):
    from cloudcoil.models.prometheus_operator import v1

    docs = kafka_overlays[overlay]
    (kafka,) = of_kind(docs, "Kafka")
    (monitor,) = of_kind(docs, "PodMonitor")
    model = v1.PodMonitor.model_validate(monitor)
    assert model.model_dump(mode="json", by_alias=True, exclude_none=True) == monitor, "fields the operator ignores"
    # Strimzi labels the Kafka nodes' pods and the Kafka Exporter's so, and names their port so.
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert selector == {"strimzi.io/cluster": kafka["metadata"]["name"], "strimzi.io/kind": "Kafka"}
    assert [e["port"] for e in monitor["spec"]["podMetricsEndpoints"]] == ["tcp-prometheus"]
    assert "kafkaExporter" in kafka["spec"] and "metricsConfig" in kafka["spec"]["kafka"]
