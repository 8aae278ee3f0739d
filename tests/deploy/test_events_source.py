"""components/events-source, as an overlay would use it: it renders, the Deployment runs
`distill produce events`, and the config its pod loads (ConfigMap + environment) is one the
events source accepts at start-up, with its mapping matching [features] and [tasks]."""

from __future__ import annotations

import os
import subprocess

import pytest
import yaml

from distill.core.exceptions import ConfigError
from producers.events import EventsService
from tests.deploy.support import K8S, container_environ, effective_config, example_pod_name, main_container, named


@pytest.fixture(scope="module")
def rendered(kubectl, tmp_path_factory):
    overlay = tmp_path_factory.mktemp("events-overlay")

    def rel(*parts: str) -> str:  # kustomize takes only relative paths
        return os.path.relpath(K8S.joinpath(*parts), overlay)

    (overlay / "kustomization.yaml").write_text(
        "apiVersion: kustomize.config.k8s.io/v1beta1\n"
        "kind: Kustomization\n"
        f"resources:\n  - {rel('base')}\n"
        "components:\n"
        f"  - {rel('components', 'teacher')}\n"
        f"  - {rel('components', 'events-source')}\n"
        f"  - {rel('components', 'common')}\n"
    )
    proc = subprocess.run([kubectl, "kustomize", str(overlay)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


def test_the_events_source_runs_produce_events_with_the_pod_defaults(rendered):
    deployment = named(rendered, "Deployment", "distill-events-source")
    c = main_container(deployment)
    assert c["args"][:2] == ["produce", "events"]
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"  # components/common reached it
    env = container_environ(c, example_pod_name(deployment))
    assert env["DISTILL_KAFKA__SASL_USERNAME"] == "distill-events-source"
    assert env["DISTILL_PRODUCER__PRODUCER_ID"] == example_pod_name(deployment), "one transactional id per pod"
    assert named(rendered, "Service", "distill-events-source")["spec"]["ports"][0]["targetPort"] == "metrics"


def test_its_config_is_accepted_by_the_events_source(rendered, tmp_path):
    cfg = effective_config(rendered, named(rendered, "Deployment", "distill-events-source"), tmp_path)
    assert cfg.events.format == "avro" and cfg.events.schema_registry.url
    assert cfg.producer.position_file is None
    EventsService(cfg)  # the mapping matches the config's columns, or this raises ConfigError


def test_a_mapping_that_misses_a_feature_is_refused(rendered, tmp_path):
    cfg = effective_config(rendered, named(rendered, "Deployment", "distill-events-source"), tmp_path)
    cfg.events.dense = cfg.events.dense[:-1]
    with pytest.raises(ConfigError, match="features.dense"):
        EventsService(cfg)
