"""Helpers of the deploy checks: paths, rendered-manifest accessors, metric-name parsing."""

from __future__ import annotations

import os
import re
import shutil
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from distill.config import Config, load_config

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
KAFKA = DEPLOY / "kafka"
PROMETHEUS = DEPLOY / "prometheus"
GRAFANA = DEPLOY / "grafana"
DOCKER = DEPLOY / "docker"

APP_OVERLAYS = ("dev", "prod")
# Which Kafka overlay each application overlay is deployed with.
KAFKA_FOR = {"dev": "dev", "prod": "prod"}
CONFIG_PATH = "/etc/distill/config.toml"

# Identifiers of exported metrics in PromQL (recording rules are named distill:..., not distill_).
METRIC_RE = re.compile(r"\bdistill_[a-z][a-z0-9_]*")
RECORDED_RE = re.compile(r"\bdistill:[a-z0-9_:]+")


def tool(name: str) -> str | None:
    """A tool from the venv's bin folder first (pip-installed), then from PATH."""
    here = Path(sys.executable).parent / name
    if here.exists() and os.access(here, os.X_OK):
        return str(here)
    return shutil.which(name)


def of_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d.get("kind") == kind]


def named(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    for d in of_kind(docs, kind):
        if d["metadata"]["name"] == name:
            return d
    raise AssertionError(f"no {kind} named {name!r}; have {[d['metadata']['name'] for d in of_kind(docs, kind)]}")


def pod_spec(workload: dict[str, Any]) -> dict[str, Any]:
    return workload["spec"]["template"]["spec"]


def containers(workload: dict[str, Any]) -> Iterator[dict[str, Any]]:
    spec = pod_spec(workload)
    yield from spec.get("initContainers", [])
    yield from spec["containers"]


def main_container(workload: dict[str, Any]) -> dict[str, Any]:
    (c,) = [c for c in pod_spec(workload)["containers"] if c["name"] == "distill"]
    return c


def config_toml(docs: list[dict[str, Any]], workload: dict[str, Any]) -> str:
    """The config.toml that the workload mounts at CONFIG_PATH."""
    c = main_container(workload)
    mounts = {m["mountPath"]: m for m in c.get("volumeMounts", [])}
    assert CONFIG_PATH in mounts, f"{workload['metadata']['name']}: nothing mounted at {CONFIG_PATH}"
    mount = mounts[CONFIG_PATH]
    volume = {v["name"]: v for v in pod_spec(workload)["volumes"]}[mount["name"]]
    cm = named(docs, "ConfigMap", volume["configMap"]["name"])
    return cm["data"][mount["subPath"]]


def container_environ(container: dict[str, Any]) -> dict[str, str]:
    """The container's DISTILL_* variables; a value from a Secret becomes a placeholder."""
    env: dict[str, str] = {}
    for e in container.get("env", []):
        if not e["name"].startswith("DISTILL_"):
            continue
        if "value" in e:
            env[e["name"]] = e["value"]
        elif "secretKeyRef" in e.get("valueFrom", {}):
            env[e["name"]] = "secret-from-" + e["valueFrom"]["secretKeyRef"]["name"]
        else:
            raise AssertionError(f"{e['name']}: unexpected valueFrom {e.get('valueFrom')}")
    return env


def effective_config(docs: list[dict[str, Any]], workload: dict[str, Any], tmp_path: Path) -> Config:
    text = config_toml(docs, workload)
    path = tmp_path / f"{workload['metadata']['name']}.toml"
    path.write_text(text)
    return load_config(path, environ=container_environ(main_container(workload)))


def base_config_toml() -> dict[str, Any]:
    return tomllib.loads((K8S / "base" / "config.toml").read_text())


def metric_names_in(text: str) -> set[str]:
    return set(METRIC_RE.findall(text))


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())
