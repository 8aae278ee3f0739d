"""Placement in prod (deploy/k8s/components/placement): the students spread over nodes, the
labelers over the GPU nodes, and every image is pinned by digest."""

from __future__ import annotations

import re
from typing import Any

from tests.deploy.support import containers, of_kind, pod_spec

HOSTNAME = "kubernetes.io/hostname"


def _selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    assert set(selector) == {"matchLabels"}, "matchLabels only, so this check stays simple"
    return all(labels.get(k) == v for k, v in selector["matchLabels"].items())


def _pod_labels(workload: dict[str, Any]) -> dict[str, str]:
    return workload["spec"]["template"]["metadata"]["labels"]


def test_students_spread_over_nodes(app_overlays):
    docs = app_overlays["prod"]
    deployments = of_kind(docs, "Deployment")
    students = [d for d in deployments if _pod_labels(d).get("app.kubernetes.io/component") == "student"]
    assert len(students) >= 3
    for d in students:
        name = d["metadata"]["name"]
        spread = [c for c in pod_spec(d).get("topologySpreadConstraints", []) if c["topologyKey"] == HOSTNAME]
        assert len(spread) == 1, f"{name}: one spread over nodes"
        (c,) = spread
        assert c["maxSkew"] == 1 and c["whenUnsatisfiable"] == "DoNotSchedule", name
        # Each student is its own Deployment: the constraint must count the other students' pods
        # too (and nothing else), or it would spread each student only against itself.
        counted = {
            other["metadata"]["name"] for other in deployments if _selects(c["labelSelector"], _pod_labels(other))
        }
        assert counted == {s["metadata"]["name"] for s in students}, f"{name} counts {counted}"
        assert "matchLabelKeys" not in c, f"{name}: pod-template-hash would count its own pods only"


def test_labelers_spread_over_nodes_within_their_replica_set(app_overlays):
    docs = app_overlays["prod"]
    deployments = of_kind(docs, "Deployment")
    (labeler,) = [d for d in deployments if d["metadata"]["name"] == "distill-teacher-labeler"]
    (c,) = [c for c in pod_spec(labeler)["topologySpreadConstraints"] if c["topologyKey"] == HOSTNAME]
    counted = [d["metadata"]["name"] for d in deployments if _selects(c["labelSelector"], _pod_labels(d))]
    assert counted == ["distill-teacher-labeler"]
    # A free GPU decides where a labeler runs: a preference, not a rule that could leave one pending.
    assert c["whenUnsatisfiable"] == "ScheduleAnyway"
    assert c["matchLabelKeys"] == ["pod-template-hash"], "a rollout's new pods spread among themselves"


def test_dev_has_no_placement_rules(app_overlays):
    """One node in dev: spreading has nothing to do there."""
    for d in of_kind(app_overlays["dev"], "Deployment"):
        assert "topologySpreadConstraints" not in pod_spec(d), d["metadata"]["name"]


def test_prod_images_are_pinned_by_digest(app_overlays):
    images = {c["image"] for d in of_kind(app_overlays["prod"], "Deployment") for c in containers(d)}
    assert images
    for image in images:
        # name:tag@sha256:digest: the tag for people, the digest for the runtime, which pulls by it
        assert re.fullmatch(r"[a-z0-9.-]+(/[a-z0-9._-]+)+:[A-Za-z0-9._-]+@sha256:[0-9a-f]{64}", image), (
            f"{image}: not pinned by digest"
        )
    assert len(images) == 2, "the CPU image and the CUDA image"
