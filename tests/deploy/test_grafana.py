"""The Grafana dashboard (deploy/grafana/dashboard.json): well-formed, its queries parse as PromQL,
and it shows what issue 7 asks for with metrics that the code exports."""

from __future__ import annotations

import json
import re
import subprocess
from typing import Any

import pytest
import yaml

from distill.core.metrics import metric_names
from tests.deploy.support import GRAFANA, METRIC_RE, PROMETHEUS, RECORDED_RE, load_yaml

# Grafana's variables, replaced by something PromQL accepts to check the expressions' syntax.
VARIABLES = {"$__rate_interval": "5m", "$__interval": "1m", "$__range": "1h"}
VARIABLE_RE = re.compile(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)\}?")


def dashboard() -> dict[str, Any]:
    return json.loads((GRAFANA / "dashboard.json").read_text())


def panels(d: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for p in d["panels"]:
        out.append(p)
        out.extend(p.get("panels", []))  # collapsed rows hold their panels
    return out


def queries(d: dict[str, Any]) -> list[tuple[str, str]]:
    return [(p["title"], t["expr"]) for p in panels(d) for t in p.get("targets", []) if t.get("expr")]


def test_dashboard_is_well_formed():
    d = dashboard()
    assert d["uid"] and d["title"] and d["schemaVersion"] >= 36
    ids = [p["id"] for p in panels(d)]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for p in panels(d):
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24, p["title"]
        if p["type"] != "row":
            assert p["targets"], p["title"]
            for t in p["targets"]:
                assert t["datasource"]["uid"] == "${datasource}", f"{p['title']}: use the datasource variable"
    variables = {v["name"]: v for v in d["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["student"]["type"] == "query" and variables["student"]["multi"]
    # Every $variable the queries use is defined.
    for title, expr in queries(d):
        for name in VARIABLE_RE.findall(expr):
            assert name.startswith("__") or name in variables, f"{title}: ${name} is not a dashboard variable"


def test_dashboard_names_only_exported_metrics_and_recorded_series():
    exported = metric_names()
    recorded = {
        r["record"] for g in load_yaml(PROMETHEUS / "rules.yaml")["groups"] for r in g["rules"] if "record" in r
    }
    for title, expr in queries(dashboard()):
        used = set(METRIC_RE.findall(expr))
        assert used <= exported, f"{title}: not exported: {used - exported}"
        assert set(RECORDED_RE.findall(expr)) <= recorded, f"{title}: not a recording rule"


def test_dashboard_shows_what_operators_need():
    d = dashboard()
    text = " ".join(expr for _, expr in queries(d))
    for metric in (
        "distill_producer_examples_total",
        "distill_teacher_examples_labeled_total",
        "distill_student_examples_trained_total",  # throughput
        "distill_consumer_lag_messages",  # lag
        "distill_student_join_total",  # join outcomes
        "distill_student_label_delay_seconds_bucket",  # label delay
        "distill_student_label_coverage",  # coverage
        "distill_student_metric",
        "distill_teacher_metric",  # progressive metrics
        "distill_teacher_checkpoint_timestamp_seconds",
        "distill_student_checkpoint_timestamp_seconds",
        "distill_dead_letters_total",
    ):
        assert metric in text, f"the dashboard does not show {metric}"
    # Each student's progressive metrics beside the teacher's: a panel per metric that plots both,
    # repeated for the selected students.
    repeated = [p for p in panels(d) if p.get("repeat") == "student"]
    assert repeated, "a row or panel repeated per student"
    for metric in ("auc", "logloss", "rmse", "calibration"):
        beside = [
            p
            for p in panels(d)
            if any(
                f'metric="{metric}"' in t["expr"] and "distill_student_metric" in t["expr"]
                for t in p.get("targets", [])
            )
            and any("distill_teacher_metric" in t["expr"] for t in p.get("targets", []))
        ]
        assert beside, f"no panel shows students' {metric} beside the teacher's"


def test_dashboard_shows_the_teacher_pool():
    d = dashboard()
    top = d["panels"]
    (start,) = [i for i, p in enumerate(top) if p["type"] == "row" and p["title"] == "Teacher pool"]
    end = next((i for i in range(start + 1, len(top)) if top[i]["type"] == "row"), len(top))
    row = top[start + 1 : end] + top[start].get("panels", [])
    exprs = [t["expr"] for p in row for t in p["targets"]]
    text = " ".join(exprs)
    for metric in (
        "distill_teacher_version",  # checkpoint version per teacher worker
        "distill_teacher_trainer_lead_versions",
        "distill_teacher_trainer_lead_batches",
        "distill_teacher_trainer_paused",
        "distill_teacher_reloads_total",
    ):
        assert metric in text, f"the Teacher pool row does not show {metric}"
    assert "by (teacher)" in next(e for e in exprs if "distill_teacher_version" in e), "one line per worker"
    assert "by (source)" in next(e for e in exprs if "distill_teacher_reloads_total" in e), "reloads by source"
    staleness = [e for e in exprs if "distill_teacher_label_staleness_seconds_bucket" in e]
    for q in ("0.5", "0.99"):
        assert any(f"histogram_quantile({q}," in e for e in staleness), f"label staleness p{q}"
    assert any("histogram_quantile(0.99," in e and "distill_teacher_reload_seconds_bucket" in e for e in exprs)


def _as_promql(expr: str) -> str:
    for k, v in VARIABLES.items():
        expr = expr.replace(k, v)
    return VARIABLE_RE.sub("x", expr)


def test_dashboard_queries_are_valid_promql(promtool, tmp_path):
    rules = [
        {"record": f"dashboard:query_{i}:check", "expr": _as_promql(expr)}
        for i, (_, expr) in enumerate(queries(dashboard()))
    ]
    path = tmp_path / "dashboard-queries.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    proc = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        pytest.fail(proc.stdout + proc.stderr)


def test_dashboard_shows_kafka_itself():
    """A Kafka row: the brokers' view of each group's lag and the brokers' health, with the names
    deploy/kafka exports (tests/deploy/test_kafka.py checks them against its JMX exporter rules)."""
    d = dashboard()
    top = d["panels"]
    (start,) = [i for i, p in enumerate(top) if p["type"] == "row" and p["title"].startswith("Kafka")]
    end = next((i for i in range(start + 1, len(top)) if top[i]["type"] == "row"), len(top))
    exprs = [t["expr"] for p in top[start + 1 : end] for t in p["targets"]]
    text = " ".join(exprs)
    for metric in (
        "kafka_consumergroup_lag",
        "kafka_server_brokertopicmetrics_messagesin_total",
        "kafka_server_brokertopicmetrics_bytesin_total",
        "kafka_server_replicamanager_underreplicatedpartitions",
        "kafka_server_replicamanager_underminisrpartitioncount",
        "kafka_controller_kafkacontroller_offlinepartitionscount",
        "kafka_controller_kafkacontroller_activecontrollercount",
        "kafka_network_requestmetrics_totaltimems",
    ):
        assert metric in text, f"the Kafka row does not show {metric}"
    lag = next(e for e in exprs if "kafka_consumergroup_lag" in e)
    assert "by (consumergroup, topic)" in lag, "one line per group and topic"
    assert all('namespace=~"$namespace"' in e for e in exprs), "every query follows the namespace variable"
