"""Alerting and recording rules (deploy/prometheus): promtool checks them and runs their unit
tests, the PrometheusRule embeds the same groups, and every metric they name is exported."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
import yaml

from distill.core.metrics import metric_names
from tests.deploy.support import (
    APP_OVERLAYS,
    K8S,
    METRIC_RE,
    PROMETHEUS,
    RECORDED_RE,
    load_yaml,
    of_kind,
)

RULES = PROMETHEUS / "rules.yaml"
TESTS = PROMETHEUS / "tests.yaml"

# What issue 7 asks the alerts to watch, by the alert that does.
REQUIRED_ALERTS = {
    "DistillConsumerLagGrowing",  # consumer lag growing
    "DistillLabelCoverageLow",  # label coverage low
    "DistillLabelDelayHigh",  # label delay p99 high
    "DistillTeacherNotPublishing",  # no labels while examples arrive
    "DistillTeacherNaNLoss",  # NaN losses
    "DistillStudentNaNLoss",
    "DistillTeacherCheckpointTooOld",  # checkpoint too old
    "DistillStudentCheckpointTooOld",
    "DistillDeadLetters",  # dead letters arriving
    "DistillStudentWorseThanBaseline",  # progressive logloss worse than the none student
    "DistillTeacherTrainerHeldBack",  # the trainer paused by the lead bound: labelers cannot keep up
    "DistillTeacherLabelsStale",  # labels from a checkpoint far behind their examples
    # issue 19: Kafka itself
    "DistillKafkaUnderMinIsr",
    "DistillKafkaUnderReplicated",
    "DistillKafkaOfflinePartitions",
    "DistillKafkaNoActiveController",
    "DistillKafkaLagUnknown",  # the broker-side lag is missing: the lag alert would be blind
}


def rules() -> list[dict]:
    return [r for g in load_yaml(RULES)["groups"] for r in g["rules"]]


def alerts() -> dict[str, dict]:
    return {r["alert"]: r for r in rules() if "alert" in r}


def test_promtool_checks_the_rules(promtool):
    proc = subprocess.run([promtool, "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_promtool_unit_tests_pass(promtool):
    proc = subprocess.run(
        [promtool, "test", "rules", str(TESTS)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=PROMETHEUS,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_every_alert_is_unit_tested_firing_and_quiet():
    fired: set[str] = set()
    quiet: set[str] = set()
    for test in load_yaml(TESTS)["tests"]:
        for case in test.get("alert_rule_test", []):
            (fired if case.get("exp_alerts") else quiet).add(case["alertname"])
    names = set(alerts())
    assert names - fired == set(), "alerts never tested firing"
    assert names - quiet == set(), "alerts never tested staying quiet"


def test_required_alerts_exist_with_severity_and_useful_annotations():
    found = alerts()
    assert REQUIRED_ALERTS <= set(found), f"missing {REQUIRED_ALERTS - set(found)}"
    for name, rule in found.items():
        assert rule["labels"]["severity"] in ("info", "warning", "critical"), name
        ann = rule["annotations"]
        assert len(ann["summary"]) > 20, name
        assert len(ann["description"]) > 150, f"{name}: say what it means and what to do"


def test_rules_name_only_exported_metrics():
    exported = metric_names()
    recorded = {r["record"] for r in rules() if "record" in r}
    for rule in rules():
        text = rule["expr"] + " " + " ".join(rule.get("annotations", {}).values())
        used = set(METRIC_RE.findall(text))
        assert used <= exported, f"{rule.get('alert') or rule.get('record')}: not exported: {used - exported}"
        assert set(RECORDED_RE.findall(rule["expr"])) <= recorded, rule.get("alert") or rule.get("record")
    for name in recorded:
        assert name.startswith("distill:") and name.count(":") == 2, f"{name}: level:metric:operations"


def test_prometheus_rule_embeds_the_same_groups():
    rule = load_yaml(K8S / "base" / "prometheusrule.yaml")
    assert rule["kind"] == "PrometheusRule"
    assert rule["spec"]["groups"] == load_yaml(RULES)["groups"], "run python deploy/prometheus/sync.py"
    proc = subprocess.run([sys.executable, str(PROMETHEUS / "sync.py"), "--check"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("overlay", APP_OVERLAYS)
def test_rendered_prometheus_rule_keeps_the_groups(app_overlays, overlay):
    (rule,) = of_kind(app_overlays[overlay], "PrometheusRule")
    assert rule["spec"]["groups"] == load_yaml(RULES)["groups"]


def test_example_prometheus_config_is_valid(promtool, tmp_path):
    """prometheus.example.yml loads, with its rule file. Debian's promtool is built without
    Kubernetes discovery; there the Kubernetes job is dropped and the rest is checked."""
    config = load_yaml(PROMETHEUS / "prometheus.example.yml")
    assert config["rule_files"] == ["rules.yaml"]
    jobs = {j["job_name"]: j for j in config["scrape_configs"]}
    keep = jobs["online-distill"]["relabel_configs"][0]
    assert keep["action"] == "keep" and keep["regex"] == "distill;metrics(-rank[0-9]+)?", "metrics, trainer ranks"
    path = tmp_path / "prometheus.yml"
    (tmp_path / "rules.yaml").write_text(RULES.read_text())
    path.write_text(yaml.safe_dump(config))
    proc = subprocess.run([promtool, "check", "config", str(path)], capture_output=True, text=True, timeout=60)
    if proc.returncode != 0 and "kubernetes_sd_configs not found" in proc.stdout + proc.stderr:
        config["scrape_configs"] = [j for j in config["scrape_configs"] if "kubernetes_sd_configs" not in j]
        path.write_text(yaml.safe_dump(config))
        proc = subprocess.run([promtool, "check", "config", str(path)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_label_delay_alert_fires_before_labels_miss_their_batch():
    """DistillLabelDelayHigh must warn before the delay reaches a student's label_wait_s."""
    from distill.core.config import load_config

    (threshold,) = re.findall(r">\s*([0-9.]+)\s*$", alerts()["DistillLabelDelayHigh"]["expr"].strip())
    cfg = load_config(K8S / "base" / "config.toml", environ={})
    assert float(threshold) < min(s.label_wait_s for s in cfg.students)


def _histogram_bounds() -> dict[str, list[float]]:
    """Finite bucket bounds of every histogram distill/core/metrics.py defines, by metric name."""
    from prometheus_client import Histogram

    from distill.core import metrics

    return {
        m._name: [b for b in m._upper_bounds if b != float("inf")]
        for m in vars(metrics).values()
        if isinstance(m, Histogram)
    }


def test_quantile_alerts_can_reach_their_threshold():
    """histogram_quantile never returns more than the largest finite bucket bound, so an alert
    on a quantile above it can never fire."""
    bounds = _histogram_bounds()
    recorded = {r["record"]: r["expr"] for r in rules() if "record" in r}
    unreachable = []
    checked = 0
    for name, rule in alerts().items():
        match = re.fullmatch(r"(distill:[a-z0-9_:]+)\s*>\s*([0-9.]+)", rule["expr"].strip())
        if not match or "histogram_quantile" not in recorded.get(match.group(1), ""):
            continue
        (bucket,) = re.findall(r"\b(distill_[a-z0-9_]+)_bucket\b", recorded[match.group(1)])
        threshold = float(match.group(2))
        checked += 1
        if max(bounds[bucket]) <= threshold:
            unreachable.append(f"{name}: {bucket} buckets end at {max(bounds[bucket])}, the alert is at {threshold}")
    assert checked >= 2
    # The buckets are distill/core/metrics.py's: a threshold past the last one can never fire.
    assert not unreachable, "; ".join(unreachable)


def test_the_lag_alert_watches_the_brokers_view_of_the_lag():
    """A dead worker exports no distill_consumer_lag_messages: the lag alert must rest on the
    Kafka Exporter's kafka_consumergroup_lag, which the brokers keep for every group."""
    recorded = {r["record"]: r["expr"] for r in rules() if "record" in r}
    expr = alerts()["DistillConsumerLagGrowing"]["expr"]
    sources = " ".join(recorded[name] for name in RECORDED_RE.findall(expr))
    assert "kafka_consumergroup_lag" in sources and "distill_consumer_lag_messages" not in expr + sources
    assert "kafka_consumergroup_lag" in alerts()["DistillTeacherNotPublishing"]["expr"], "a dead teacher too"
