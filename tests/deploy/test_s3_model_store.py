"""components/s3-model-store: the prod overlay with the model stores in a bucket renders
without any ReadWriteMany volume, and the workers' settings are a valid config."""

from __future__ import annotations

import os
import subprocess

import yaml

from distill.core.config import load_config
from tests.deploy.support import K8S, containers, named, of_kind, pod_spec


def _render(kubectl: str, tmp_path) -> list[dict]:
    """The prod overlay with the component listed after the teacher pool."""
    overlay = tmp_path / "prod-s3"
    overlay.mkdir()
    prod = K8S / "overlays" / "prod"
    text = (prod / "kustomization.yaml").read_text()
    here = os.path.relpath(K8S, overlay)
    text = text.replace("../../", f"{here}/")
    text = text.replace(
        f"  - {here}/components/teacher-pool\n",
        f"  - {here}/components/teacher-pool\n  - {here}/components/s3-model-store\n",
    )
    assert "s3-model-store" in text
    (overlay / "kustomization.yaml").write_text(text)
    for patch in prod.glob("*.yaml"):
        if patch.name != "kustomization.yaml":
            (overlay / patch.name).write_text(patch.read_text())
    done = subprocess.run([kubectl, "kustomize", str(overlay)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return [d for d in yaml.safe_load_all(done.stdout) if d]


def test_the_s3_variant_needs_no_read_write_many_volume(kubectl, tmp_path):
    docs = _render(kubectl, tmp_path)
    claims = {d["metadata"]["name"]: d for d in of_kind(docs, "PersistentVolumeClaim")}
    assert "distill-teacher-model-store" not in claims and "distill-models" not in claims
    assert all(c["spec"]["accessModes"] == ["ReadWriteOnce"] for c in claims.values())
    settings = named(docs, "ConfigMap", "distill-s3")["data"]
    for workload in of_kind(docs, "Deployment"):
        role = workload["metadata"]["labels"]["app.kubernetes.io/component"]
        spec = pod_spec(workload)
        claimed = {v["persistentVolumeClaim"]["claimName"] for v in spec["volumes"] if "persistentVolumeClaim" in v}
        assert claimed <= set(claims), (workload["metadata"]["name"], claimed)
        for c in containers(workload):
            mounts = {m["mountPath"] for m in c.get("volumeMounts", [])}
            assert not mounts & {"/var/lib/distill/model-store", "/var/lib/distill/models"}
            env = {e["name"] for e in c.get("env", [])}
            assert "DISTILL_TEACHER__POOL__MODEL_STORE" not in env  # from the ConfigMap now
            sources = c.get("envFrom", [])
            if role in ("teacher", "student"):
                assert {"configMapRef": {"name": "distill-s3"}} in sources
                assert {"secretRef": {"name": "distill-s3", "optional": True}} in sources
            else:
                assert not sources  # the producer never touches the bucket
    egress = named(docs, "NetworkPolicy", "distill-workers")["spec"]["egress"]
    assert {"ports": [{"port": 443, "protocol": "TCP"}]} in egress

    # what the pods read from the ConfigMap is a valid config: both stores in the bucket
    config = load_config(K8S / "base" / "config.toml", environ=dict(settings))
    assert config.model_store() == settings["DISTILL_TEACHER__POOL__MODEL_STORE"]
    assert config.model_store().startswith("s3://")
    assert config.model_dir("aux") == settings["DISTILL_MODEL_ROOT"] + "/aux"
