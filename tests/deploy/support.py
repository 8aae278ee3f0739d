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

from distill.core.config import Config, load_config

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


def example_pod_name(workload: dict[str, Any]) -> str:
    """A name like the ones a Deployment's pods get (what a fieldRef to metadata.name reads)."""
    return f"{workload['metadata']['name']}-7d4b9c8f6-x2k9p"


def container_environ(container: dict[str, Any], pod_name: str = "pod-7d4b9c8f6-x2k9p") -> dict[str, str]:
    """The container's DISTILL_* variables; a value from a Secret becomes a placeholder, the
    pod's name (downward API) ``pod_name``."""
    env: dict[str, str] = {}
    for e in container.get("env", []):
        if not e["name"].startswith("DISTILL_"):
            continue
        source = e.get("valueFrom", {})
        if "value" in e:
            env[e["name"]] = e["value"]
        elif "secretKeyRef" in source:
            env[e["name"]] = "secret-from-" + source["secretKeyRef"]["name"]
        elif source.get("fieldRef", {}).get("fieldPath") == "metadata.name":
            env[e["name"]] = pod_name
        else:
            raise AssertionError(f"{e['name']}: unexpected valueFrom {e.get('valueFrom')}")
    return env


# The options of `distill teacher` that set a config field, as distill/cli.py applies them
# (over the environment). test_container_commands_exist_in_the_cli checks they exist.
TEACHER_OPTIONS = {"--role": "role", "--name": "name", "--device": "device", "--metrics-port": "metrics_port"}


def cli_overrides(args: list[str]) -> dict[str, Any]:
    """The config overrides that a container's distill arguments make."""
    if not args or args[0] != "teacher":
        return {}
    over: dict[str, Any] = {}
    for option, key in TEACHER_OPTIONS.items():
        if option in args:
            value = args[args.index(option) + 1]
            over[key] = int(value) if key == "metrics_port" else value
    return {"teacher": over} if over else {}


def effective_config(docs: list[dict[str, Any]], workload: dict[str, Any], tmp_path: Path) -> Config:
    """The config the workload's process loads: the ConfigMap, its environment, its options."""
    text = config_toml(docs, workload)
    path = tmp_path / f"{workload['metadata']['name']}.toml"
    path.write_text(text)
    c = main_container(workload)
    environ = container_environ(c, example_pod_name(workload))
    return load_config(path, environ=environ, **cli_overrides(c.get("args", [])))


def torchrun(container: dict[str, Any]) -> Any | None:
    """torchrun's parsed arguments when the container runs the CLI under it, else None.
    Parsed by torch's own parser, so an option torchrun does not know fails here."""
    command = container.get("command")
    if not command:
        return None
    assert command[0] == "torchrun", f"unexpected command {command}: the image's entrypoint is distill"
    from torch.distributed.run import get_args_parser

    parsed = get_args_parser().parse_args(command[1:] + container.get("args", []))
    assert parsed.module and parsed.training_script == "distill", f"{command}: must run `-m distill`"
    assert parsed.training_script_args == container.get("args", []), "the distill arguments go in args"
    return parsed


def ranks(container: dict[str, Any]) -> int:
    """Processes per pod: torchrun's --nproc-per-node, else 1."""
    parsed = torchrun(container)
    return 1 if parsed is None else int(parsed.nproc_per_node)


def scaled_objects(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """KEDA ScaledObjects by the name of the Deployment they scale."""
    out = {}
    for so in of_kind(docs, "ScaledObject"):
        ref = so["spec"]["scaleTargetRef"]
        assert ref.get("kind", "Deployment") == "Deployment" and ref.get("apiVersion", "apps/v1") == "apps/v1"
        assert ref["name"] not in out, f"two ScaledObjects scale {ref['name']}"
        out[ref["name"]] = so
    return out


def base_config_toml() -> dict[str, Any]:
    return tomllib.loads((K8S / "base" / "config.toml").read_text())


def metric_names_in(text: str) -> set[str]:
    return set(METRIC_RE.findall(text))


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())
