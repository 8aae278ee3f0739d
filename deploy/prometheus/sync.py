"""Write deploy/k8s/base/prometheusrule.yaml from deploy/prometheus/rules.yaml.

rules.yaml is the source (plain Prometheus rule-file format, what ``promtool`` checks and
tests); the Prometheus Operator needs the same groups inside a PrometheusRule resource, and
kustomize cannot embed a file from outside its folder. Run after editing rules.yaml:

    python deploy/prometheus/sync.py           # rewrite the PrometheusRule
    python deploy/prometheus/sync.py --check   # exit 1 if it is out of date (the tests do this)
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent
RULES = HERE / "rules.yaml"
TARGET = HERE.parent / "k8s" / "base" / "prometheusrule.yaml"

HEADER = """\
# GENERATED from deploy/prometheus/rules.yaml by deploy/prometheus/sync.py: do not edit here.
# The Prometheus Operator loads it when its ruleSelector matches these labels
# (kube-prometheus-stack: add release: <its release name> in an overlay).
"""


class _Dumper(yaml.SafeDumper):
    pass


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def prometheus_rule(rules: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {"name": "distill", "labels": {"app.kubernetes.io/name": "distill"}},
        "spec": {"groups": rules["groups"]},
    }


def render() -> str:
    rules = yaml.safe_load(RULES.read_text())
    body = yaml.dump(prometheus_rule(rules), Dumper=_Dumper, sort_keys=False, width=100000, allow_unicode=True)
    return HEADER + body


def main(argv: list[str]) -> int:
    text = render()
    if "--check" in argv:
        if not TARGET.exists() or TARGET.read_text() != text:
            print(f"{TARGET} is out of date: run python deploy/prometheus/sync.py", file=sys.stderr)
            return 1
        return 0
    TARGET.write_text(text)
    print(f"wrote {TARGET}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
