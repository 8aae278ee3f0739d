"""KEDA resources (deploy/k8s/components/teacher-pool/keda.yaml): they validate against the KEDA
models, scale the labelers on the lag of the group and topic the labelers use, never beyond the
examples topic's partitions, and reach the Kafka they are deployed with as the workers do."""

from __future__ import annotations

from typing import Any

import pytest

from tests.deploy.support import (
    APP_OVERLAYS,
    KAFKA_FOR,
    effective_config,
    named,
    of_kind,
    scaled_objects,
)
from tests.deploy.test_kafka import _allows

KEDA = "keda.sh/v1alpha1"
# The overlays whose labelers KEDA scales.
SCALED = {"dev": set(), "prod": {"distill-teacher-labeler"}}


def topics_by_name(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {t["spec"].get("topicName", t["metadata"]["name"]): t for t in of_kind(docs, "KafkaTopic")}


def kafka_trigger(so: dict[str, Any]) -> dict[str, Any]:
    (trigger,) = so["spec"]["triggers"]
    assert trigger["type"] == "kafka", so["metadata"]["name"]
    return trigger


def auth_params(docs: list[dict[str, Any]], trigger: dict[str, Any]) -> dict[str, tuple[str, str, str]]:
    """The TriggerAuthentication's parameters: name -> (source kind, object name, key)."""
    ref = trigger["authenticationRef"]
    assert ref.get("kind", "TriggerAuthentication") == "TriggerAuthentication"
    spec = named(docs, "TriggerAuthentication", ref["name"])["spec"]
    params: dict[str, tuple[str, str, str]] = {}
    for kind, field in (("Secret", "secretTargetRef"), ("ConfigMap", "configMapTargetRef")):
        for r in spec.get(field, []):
            assert r["parameter"] not in params, f"{r['parameter']} given twice"
            params[r["parameter"]] = (kind, r["name"], r["key"])
    return params


@pytest.mark.parametrize("overlay", APP_OVERLAYS)
def test_keda_resources_validate_against_their_models(app_overlays, overlay):
    from cloudcoil.models.keda import v1alpha1

    found = set()
    for doc in app_overlays[overlay]:
        if not doc["apiVersion"].startswith("keda.sh/"):
            continue
        assert doc["apiVersion"] == KEDA
        model = getattr(v1alpha1, doc["kind"]).model_validate(doc)
        # The models ignore unknown fields: a field lost in the round trip is a typo.
        assert model.model_dump(mode="json", by_alias=True, exclude_none=True) == doc, (
            f"{doc['kind']} {doc['metadata']['name']}: fields KEDA does not know"
        )
        found.add(doc["kind"])
    assert found == ({"ScaledObject", "TriggerAuthentication"} if SCALED[overlay] else set())


@pytest.mark.parametrize("overlay", APP_OVERLAYS)
def test_scaled_object_scales_the_labelers_on_their_lag(app_overlays, kafka_overlays, overlay, tmp_path):
    docs = app_overlays[overlay]
    scaled = scaled_objects(docs)
    assert set(scaled) == SCALED[overlay]
    topics = topics_by_name(kafka_overlays[KAFKA_FOR[overlay]])
    for target, so in scaled.items():
        labeler = named(docs, "Deployment", target)
        cfg = effective_config(docs, labeler, tmp_path)
        assert cfg.teacher.role == "labeler", f"{target}: KEDA scales labelers only"
        spec = so["spec"]
        meta = kafka_trigger(so)["metadata"]
        # The lag KEDA reads is the labelers' own: their group on the topic they consume.
        assert meta["consumerGroup"] == cfg.teacher.pool.labeler_group_id
        assert meta["topic"] == cfg.topics.examples
        assert meta["offsetResetPolicy"] == "earliest"
        assert meta["allowIdleConsumers"] == "false"
        assert int(meta["lagThreshold"]) >= 1
        # More labelers than partitions would sit idle: the cap is the examples topic's
        # partition count in the Kafka overlay deployed with this one.
        assert spec["minReplicaCount"] == 1, "one labeler at least: labels must flow even without lag"
        assert spec["maxReplicaCount"] == topics[cfg.topics.examples]["spec"]["partitions"]


@pytest.mark.parametrize("overlay", APP_OVERLAYS)
def test_keda_reaches_kafka_as_the_workers_do(app_overlays, kafka_overlays, overlay, tmp_path):
    docs = app_overlays[overlay]
    kdocs = kafka_overlays[KAFKA_FOR[overlay]]
    (kafka,) = of_kind(kdocs, "Kafka")
    (ns,) = of_kind(docs, "Namespace")
    cluster = kafka["metadata"]["name"]
    for target, so in scaled_objects(docs).items():
        cfg = effective_config(docs, named(docs, "Deployment", target), tmp_path)
        trigger = kafka_trigger(so)
        meta = trigger["metadata"]
        # KEDA's operator runs in its own namespace: the bootstrap Service's qualified name,
        # on the listener the workers use.
        host, port = meta["bootstrapServers"].split(",")[0].rsplit(":", 1)
        service = f"{cluster}-kafka-bootstrap.{ns['metadata']['name']}.svc"
        assert host in (service, f"{service}.cluster.local"), f"{host}: not reachable from KEDA's namespace"
        assert int(port) == int(cfg.kafka.bootstrap_servers.split(",")[0].rsplit(":", 1)[1])
        (listener,) = [li for li in kafka["spec"]["kafka"]["listeners"] if li["port"] == int(port)]
        assert meta.get("tls") == ("enable" if listener["tls"] else "disable")
        mechanism = {"SCRAM-SHA-512": "scram_sha512", "SCRAM-SHA-256": "scram_sha256", "PLAIN": "plaintext"}
        assert meta.get("sasl") == mechanism[cfg.kafka.sasl_mechanism]
        # The credentials: KEDA's own KafkaUser (its name and password), the cluster CA.
        params = auth_params(docs, trigger)
        assert "sasl" not in params and "tls" not in params, "KEDA rejects them in both places"
        kind, name, key = params["username"]
        assert kind == "ConfigMap", "the user name is not secret (Strimzi's Secret does not hold it)"
        user = named(kdocs, "KafkaUser", named(docs, "ConfigMap", name)["data"][key])
        assert user["spec"]["authentication"]["type"] == "scram-sha-512"
        assert params["password"] == ("Secret", user["metadata"]["name"], "password"), "Strimzi's Secret of that user"
        assert params["ca"] == ("Secret", f"{cluster}-cluster-ca-cert", "ca.crt")
        # What KEDA does as that user: describe the topic (offsets) and the group (its offsets).
        acls = user["spec"]["authorization"]["acls"]
        assert _allows(acls, "topic", meta["topic"], "Describe")
        assert _allows(acls, "group", meta["consumerGroup"], "Describe")
        # Strimzi's listener admits only its networkPolicyPeers: KEDA's operator must be one.
        peers = listener.get("networkPolicyPeers")
        if peers is not None:
            assert any(
                "keda-operator" in p.get("podSelector", {}).get("matchLabels", {}).values() and "namespaceSelector" in p
                for p in peers
            ), "the Kafka listener does not admit KEDA's operator"
