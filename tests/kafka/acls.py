"""Strimzi ``KafkaUser`` ACLs (deploy/kafka/base/user.yaml) as Kafka ACL bindings, so that the
tests enforce on a real broker exactly the rights the manifests grant."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from confluent_kafka.admin import (
    AclBinding,
    AclOperation,
    AclPermissionType,
    AdminClient,
    ResourcePatternType,
    ResourceType,
)

USERS = Path(__file__).parents[2] / "deploy" / "kafka" / "base" / "user.yaml"
CLUSTER = "kafka-cluster"  # the one name of the cluster resource

_RESOURCE = {
    "topic": ResourceType.TOPIC,
    "group": ResourceType.GROUP,
    "transactionalId": ResourceType.TRANSACTIONAL_ID,
    "cluster": ResourceType.BROKER,  # librdkafka's name of the cluster resource
}
_PATTERN = {"literal": ResourcePatternType.LITERAL, "prefix": ResourcePatternType.PREFIXED}
_OPERATION = {
    "All": AclOperation.ALL,
    "Read": AclOperation.READ,
    "Write": AclOperation.WRITE,
    "Create": AclOperation.CREATE,
    "Delete": AclOperation.DELETE,
    "Alter": AclOperation.ALTER,
    "Describe": AclOperation.DESCRIBE,
    "ClusterAction": AclOperation.CLUSTER_ACTION,
    "DescribeConfigs": AclOperation.DESCRIBE_CONFIGS,
    "AlterConfigs": AclOperation.ALTER_CONFIGS,
    "IdempotentWrite": AclOperation.IDEMPOTENT_WRITE,
}


def kafka_users(path: Path = USERS) -> dict[str, dict[str, Any]]:
    """KafkaUser name -> its document."""
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d and d.get("kind") == "KafkaUser"]
    return {d["metadata"]["name"]: d for d in docs}


def bindings(user: dict[str, Any]) -> list[AclBinding]:
    """The ALLOW bindings of one KafkaUser (Strimzi's ``simple`` authorization)."""
    auth = user["spec"]["authorization"]
    assert auth["type"] == "simple", f"{user['metadata']['name']}: only simple authorization is mapped"
    principal = f"User:{user['metadata']['name']}"
    out = []
    for acl in auth["acls"]:
        res = acl["resource"]
        kind = res["type"]
        name = CLUSTER if kind == "cluster" else res["name"]
        pattern = _PATTERN[res.get("patternType", "literal")] if kind != "cluster" else ResourcePatternType.LITERAL
        assert acl.get("type", "allow") == "allow", "deny rules are not used"
        for op in acl["operations"]:
            out.append(
                AclBinding(
                    _RESOURCE[kind],
                    name,
                    pattern,
                    principal,
                    acl.get("host", "*"),
                    _OPERATION[op],
                    AclPermissionType.ALLOW,
                )  # fmt: skip
            )
    return out


def apply(admin: AdminClient, users: dict[str, dict[str, Any]], timeout: float = 30.0) -> int:
    """Create every user's bindings (idempotent); returns how many."""
    every = [b for user in users.values() for b in bindings(user)]
    for future in admin.create_acls(every, request_timeout=timeout).values():
        future.result()
    return len(every)
