"""Least privilege, offline: every workload connects as its own role's KafkaUser
(deploy/kafka/base/user.yaml), whose ACLs cover what that role's workers do and nothing more.

What each role needs is derived from the configuration the workload loads (topics, groups,
transactional ids, its teacher role); tests/faults/test_apache_security.py runs the workers on
Apache Kafka with exactly these ACLs, which proves the rights suffice.
"""

from __future__ import annotations

from typing import Any

import pytest

from distill.core.config import Config
from producers.recovery import positions_topic
from tests.deploy.support import (
    APP_OVERLAYS,
    KAFKA_FOR,
    effective_config,
    main_container,
    named,
    of_kind,
    scaled_objects,
)

Need = tuple[str, str, str]  # (resource type, name, operation)
# Kafka: Read, Write, Delete and Alter on a resource imply Describe on it.
IMPLIES_DESCRIBE = {"Read", "Write", "Delete", "Alter"}


def role_of(workload: dict[str, Any], cfg: Config) -> str:
    args = main_container(workload)["args"]
    if args[0] == "produce":
        return "producer"
    if args[0] == "student":
        return f"student.{args[args.index('--name') + 1]}"
    assert args[0] == "teacher", args
    return f"teacher.{cfg.teacher.role}"


def needs(role: str, cfg: Config) -> set[Need]:
    """The (type, name, operation) a worker of ``role`` uses."""
    t = cfg.topics
    ensured = {t.examples, t.labels, t.checkpoints, t.dlq(t.examples), t.dlq(t.labels)}  # ensure_topics
    out: set[Need] = {("cluster", "", "IdempotentWrite")}  # every worker's producers are idempotent
    pool = cfg.teacher.pool
    if role == "producer":
        out |= {("topic", name, "Describe") for name in ensured} | {("topic", t.examples, "Write")}
        if cfg.producer.position_file:  # a resumable replay: transactions, its positions topic
            out |= {("topic", t.examples, "Read"), ("topic", positions_topic(t.examples), "Read")}
            out |= {("topic", positions_topic(t.examples), "Write")}
            out |= {("transactionalId", f"producer.{cfg.producer.producer_id}", op) for op in ("Describe", "Write")}
    elif role.startswith("teacher."):
        out |= {("topic", name, "Describe") for name in ensured} | {("topic", t.examples, "Read")}
        kind = role.split(".", 1)[1]
        if kind in ("both", "labeler"):
            group = cfg.teacher.group_id if kind == "both" else pool.labeler_group_id
            out |= {("topic", t.labels, "Write"), ("topic", t.dlq(t.examples), "Write")}
            out |= {("group", group, "Read"), ("group", group, "Describe")}
            out |= {("transactionalId", f"{group}.{cfg.teacher.name}", op) for op in ("Describe", "Write")}
        if kind == "labeler":
            out.add(("topic", t.checkpoints, "Read"))
        if kind == "trainer":
            out |= {("topic", t.checkpoints, "Write"), ("topic", t.checkpoints, "Read")}
            out.add(("group", pool.labeler_group_id, "Describe"))  # the lead bound reads its offsets
    elif role.startswith("student."):
        (student,) = [s for s in cfg.students if s.group_id == role]
        out |= {("topic", name, op) for name in (t.examples, t.labels) for op in ("Describe", "Read")}
        out |= {("topic", t.dlq(t.examples), "Write"), ("topic", t.dlq(t.labels), "Write")}
        out |= {("group", student.group_id, "Read"), ("group", student.group_id, "Describe")}
    else:
        raise AssertionError(f"unknown role {role}")
    return out


def covers(acl: dict[str, Any], need: Need) -> bool:
    kind, name, op = need
    r = acl["resource"]
    if r["type"] != kind or op not in acl["operations"]:
        return False
    if kind == "cluster":
        return True
    if r.get("patternType", "literal") == "prefix":
        return name.startswith(r["name"])
    return r["name"] == name


def granted(acls: list[dict[str, Any]]) -> list[Need]:
    """Every (type, name-or-prefix, operation) a user's ACLs allow."""
    return [(a["resource"]["type"], a["resource"].get("name", ""), op) for a in acls for op in a["operations"]]


def justified(acls: list[dict[str, Any]], grant: Need, wanted: set[Need]) -> bool:
    """A grant some need uses (Describe also where the role reads or writes the resource)."""
    kind, _, op = grant
    (acl,) = [a for a in acls if (a["resource"]["type"], a["resource"].get("name", "")) == grant[:2]]
    for need in wanted:
        if covers(acl, need) and need[2] == op:
            return True
        if op == "Describe" and need[2] in IMPLIES_DESCRIBE and covers({**acl, "operations": [need[2]]}, need):
            return True
    return False


def users_of(kdocs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {u["metadata"]["name"]: u for u in of_kind(kdocs, "KafkaUser")}


def password_secret(workload: dict[str, Any]) -> tuple[str, str]:
    env = {e["name"]: e for e in main_container(workload).get("env", [])}
    assert "DISTILL_KAFKA__SASL_PASSWORD" in env, f"{workload['metadata']['name']}: no SASL password"
    ref = env["DISTILL_KAFKA__SASL_PASSWORD"]["valueFrom"]["secretKeyRef"]
    return ref["name"], ref["key"]


@pytest.fixture(params=APP_OVERLAYS)
def deployed(request, app_overlays, kafka_overlays, tmp_path):
    """(overlay docs, KafkaUsers by name, [(workload, role, config)]) of one overlay."""
    docs = app_overlays[request.param]
    users = users_of(kafka_overlays[KAFKA_FOR[request.param]])
    workloads = []
    for d in of_kind(docs, "Deployment"):
        cfg = effective_config(docs, d, tmp_path)
        workloads.append((d, role_of(d, cfg), cfg))
    return docs, users, workloads


def test_every_workload_connects_as_its_own_roles_user(deployed):
    _docs, users, workloads = deployed
    assert "distill-app" not in users, "one user with every right is what the split replaces"
    by_user: dict[str, set[str]] = {}
    for d, role, cfg in workloads:
        where = d["metadata"]["name"]
        assert cfg.kafka.sasl_mechanism == "SCRAM-SHA-512", where
        user = cfg.kafka.sasl_username
        assert user in users, f"{where}: sasl_username {user!r} is no KafkaUser ({sorted(users)})"
        # Strimzi writes a user's password to the Secret of the user's name.
        assert password_secret(d) == (user, "password"), f"{where}: its password must be {user}'s Secret"
        by_user.setdefault(user, set()).add(role.split(".")[0] if role.startswith("teacher.") else role)
    # One role per user: a student's credentials are not the teacher's, nor another student's.
    assert all(len(roles) == 1 for roles in by_user.values()), by_user
    students = [u for u, roles in by_user.items() if next(iter(roles)).startswith("student.")]
    assert len(students) == sum(role.startswith("student.") for _, role, _ in workloads), "a user per student"


def test_each_users_acls_cover_its_workers_and_grant_nothing_more(app_overlays, kafka_overlays, tmp_path):
    # The users are shared by the overlays (dev runs one teacher, prod the pool): a grant must
    # be used in one of them at least.
    wanted: dict[tuple[str, str], set[Need]] = {}  # (kafka overlay, user) -> needs
    for overlay in APP_OVERLAYS:
        docs, kafka = app_overlays[overlay], KAFKA_FOR[overlay]
        users = users_of(kafka_overlays[kafka])
        for d in of_kind(docs, "Deployment"):
            cfg = effective_config(docs, d, tmp_path)
            role = role_of(d, cfg)
            acls = users[cfg.kafka.sasl_username]["spec"]["authorization"]["acls"]
            need = needs(role, cfg)
            missing = [n for n in need if not any(covers(a, n) for a in acls)]
            assert not missing, f"{overlay}: {d['metadata']['name']} ({role}) lacks {sorted(missing)}"
            for k in set(KAFKA_FOR.values()):
                wanted.setdefault((k, cfg.kafka.sasl_username), set()).update(need)
        for so in scaled_objects(docs).values():
            meta = so["spec"]["triggers"][0]["metadata"]
            for k in set(KAFKA_FOR.values()):
                wanted.setdefault((k, keda_user(docs, so)), set()).update(
                    {("topic", meta["topic"], "Describe"), ("group", meta["consumerGroup"], "Describe")}
                )
    for kafka in sorted(set(KAFKA_FOR.values())):
        for name, user in users_of(kafka_overlays[kafka]).items():
            acls = user["spec"]["authorization"]["acls"]
            assert (kafka, name) in wanted, f"KafkaUser {name} is used by no workload"
            for a in acls:
                assert a.get("type", "allow") == "allow" and "All" not in a["operations"], f"{name}: {a}"
                assert a["resource"].get("name") != "*", f"{name}: a wildcard resource"
            extra = [g for g in granted(acls) if not justified(acls, g, wanted[(kafka, name)])]
            assert not extra, f"KafkaUser {name} grants what none of its workers uses: {extra}"


def keda_user(docs: list[dict[str, Any]], so: dict[str, Any]) -> str:
    ref = so["spec"]["triggers"][0]["authenticationRef"]["name"]
    spec = named(docs, "TriggerAuthentication", ref)["spec"]
    (secret,) = [s for s in spec["secretTargetRef"] if s["parameter"] == "password"]
    (cm,) = [c for c in spec["configMapTargetRef"] if c["parameter"] == "username"]
    username = named(docs, "ConfigMap", cm["name"])["data"][cm["key"]]
    assert username == secret["name"], "KEDA's user name and its password Secret must be one KafkaUser's"
    return username


def test_keda_has_its_own_describe_only_user(deployed):
    docs, users, _ = deployed
    for so in scaled_objects(docs).values():
        user = keda_user(docs, so)
        assert user in users
        ops = {op for a in users[user]["spec"]["authorization"]["acls"] for op in a["operations"]}
        assert ops == {"Describe"}, f"KEDA only describes: {ops}"


def test_only_the_teacher_writes_labels_and_no_producer_reads_them(deployed):
    _docs, users, workloads = deployed
    labels = {cfg.topics.labels for _, _, cfg in workloads}
    (topic,) = labels
    for _, role, cfg in workloads:
        acls = users[cfg.kafka.sasl_username]["spec"]["authorization"]["acls"]
        writes = any(covers(a, ("topic", topic, "Write")) for a in acls)
        reads = any(covers(a, ("topic", topic, "Read")) for a in acls)
        # the trainer shares the teacher's user: the labelers it runs with write labels
        assert writes == role.startswith("teacher."), f"{role} ({cfg.kafka.sasl_username}): Write on {topic}"
        if role == "producer":
            assert not reads, "a producer must not read labels"
