"""The Kubernetes manifests (deploy/k8s): they build, validate, and deploy what the code runs."""

from __future__ import annotations

import inspect
import re
import tomllib
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import typer

from distill.cli import app
from distill.core.config import Config
from distill.core.kafka import client_config
from distill.core.service import Service
from tests.deploy.support import (
    APP_OVERLAYS,
    CONFIG_PATH,
    K8S,
    TEACHER_OPTIONS,
    base_config_toml,
    container_environ,
    containers,
    effective_config,
    example_pod_name,
    main_container,
    of_kind,
    pod_spec,
    ranks,
    scaled_objects,
    torchrun,
)

# The oldest Kubernetes these manifests are meant for, and the newest the schemas know.
K8S_VERSIONS = ("1.30.0", kubernetes_validate.latest_version())
CRD_GROUPS = ("monitoring.coreos.com/", "kafka.strimzi.io/", "keda.sh/")
STUDENTS = ("none", "direct", "aux")
# The teacher's processes (teacher.role) in each overlay: one role-both process in dev, a
# trainer and a pool of labelers in prod.
TEACHER_ROLES = {"dev": {"both"}, "prod": {"trainer", "labeler"}}
POOL_OVERLAYS = [o for o in APP_OVERLAYS if TEACHER_ROLES[o] == {"trainer", "labeler"}]
SECRET_WORDS = re.compile(r"PASSWORD|SECRET|TOKEN|PRIVATE|CREDENTIAL|_KEY\b|APIKEY", re.I)


# registry/repository:tag, optionally pinned by digest (@sha256:...), as the prod overlay does.
IMAGE_REF = re.compile(r"[a-z0-9.-]+(:\d+)?/[a-z0-9._/-]+:[A-Za-z0-9._-]+(@sha256:[0-9a-f]{64})?")


def image_tag(image: str) -> str:
    """The tag of an image reference, without its digest."""
    return image.split("@", 1)[0].rsplit(":", 1)[1]


def workers(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return of_kind(docs, "Deployment")


def role_of(deployment: dict[str, Any]) -> str:
    return deployment["metadata"]["labels"]["app.kubernetes.io/component"]


def labels_match(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def teachers(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [d for d in workers(docs) if role_of(d) == "teacher"]


def metrics_ports(container: dict[str, Any]) -> dict[str, int]:
    """The container's metrics ports by name: "metrics", and "metrics-rank<r>" of torchrun rank r."""
    return {p["name"]: p["containerPort"] for p in container["ports"] if p["name"].startswith("metrics")}


def volume_of(workload: dict[str, Any], mount_path: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(mount, volume) of what the main container mounts at mount_path."""
    mounts = {m["mountPath"]: m for m in main_container(workload)["volumeMounts"]}
    assert mount_path in mounts, f"{workload['metadata']['name']}: nothing mounted at {mount_path}"
    volumes = {v["name"]: v for v in pod_spec(workload)["volumes"]}
    return mounts[mount_path], volumes[mounts[mount_path]["name"]]


# -- builds and schemas ------------------------------------------------------------------------
@pytest.mark.parametrize("overlay", APP_OVERLAYS)
def test_overlay_builds_with_every_resource(app_overlays, overlay):
    docs = app_overlays[overlay]
    kinds = {d["kind"] for d in docs}
    for kind in (
        "Namespace",
        "ConfigMap",
        "Deployment",
        "Service",
        "PersistentVolumeClaim",
        "ServiceAccount",
        "ServiceMonitor",
        "PrometheusRule",
        "PodDisruptionBudget",
        "NetworkPolicy",
    ):
        assert kind in kinds, f"{overlay}: no {kind}"
    (ns,) = of_kind(docs, "Namespace")
    for d in docs:
        if d["kind"] != "Namespace":
            assert d["metadata"].get("namespace") == ns["metadata"]["name"], f"{d['kind']} {d['metadata']['name']}"


@pytest.mark.parametrize("overlay", APP_OVERLAYS)
def test_core_resources_validate_against_kubernetes_schemas(app_overlays, overlay):
    checked = 0
    for doc in app_overlays[overlay]:
        if doc["apiVersion"].startswith(CRD_GROUPS):
            continue
        for version in K8S_VERSIONS:
            error = None
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                error = f"at /{'/'.join(map(str, exc.path))}: {exc.message}"
            if error:  # outside the except: the exception's repr holds the whole document
                pytest.fail(f"{overlay}: {doc['kind']} {doc['metadata']['name']} (k8s {version}) {error}")
        checked += 1
    assert checked >= 15


@pytest.mark.parametrize("overlay", APP_OVERLAYS)
def test_prometheus_operator_resources_validate_against_their_models(app_overlays, overlay):
    from cloudcoil.models.prometheus_operator import v1

    found = set()
    for doc in app_overlays[overlay]:
        if not doc["apiVersion"].startswith("monitoring.coreos.com/"):
            continue
        assert doc["apiVersion"] == "monitoring.coreos.com/v1"
        model = getattr(v1, doc["kind"]).model_validate(doc)
        # The models ignore unknown fields: a field lost in the round trip is a typo.
        assert model.model_dump(mode="json", by_alias=True, exclude_none=True) == doc, (
            f"{doc['kind']} {doc['metadata']['name']}: fields the Prometheus Operator does not know"
        )
        found.add(doc["kind"])
    assert found == {"ServiceMonitor", "PrometheusRule"}


# -- one process per consumer group ---------------------------------------------------------------
@pytest.mark.parametrize("overlay", APP_OVERLAYS)
def test_one_single_replica_recreate_deployment_per_worker(app_overlays, overlay, tmp_path):
    """Every worker is one Recreate replica, except the labelers: they share one consumer group,
    keep no state, and KEDA sets their number."""
    docs = app_overlays[overlay]
    scaled = scaled_objects(docs)
    roles: dict[str, list[str]] = {}
    teacher_roles: dict[str, list[str]] = {}
    for d in workers(docs):
        name = d["metadata"]["name"]
        args = main_container(d)["args"]
        role = effective_config(docs, d, tmp_path).teacher.role if args[0] == "teacher" else None
        if role:
            teacher_roles.setdefault(role, []).append(name)
        if role == "labeler":
            assert name in scaled, f"{name}: the labelers are scaled by a KEDA ScaledObject"
            assert "replicas" not in d["spec"], f"{name}: KEDA owns the replica count; an apply must not reset it"
            assert d["spec"]["strategy"]["type"] == "RollingUpdate", f"{name}: no state, so no need to Recreate"
        else:
            assert name not in scaled, f"{name}: only labelers may be scaled out"
            assert d["spec"]["replicas"] == 1, f"{name}: one process owns each consumer group"
            assert d["spec"]["strategy"] == {"type": "Recreate"}, f"{name}: a rollout must not run two at once"
        roles.setdefault(args[0], []).append(args[args.index("--name") + 1] if "--name" in args else "")
        assert args[args.index("--config") + 1] == CONFIG_PATH
    assert sorted(roles) == ["produce", "student", "teacher"]
    assert len(roles["produce"]) == 1
    # One Deployment per teacher role: the role-both teacher, or the trainer and the labeler pool.
    assert set(teacher_roles) == TEACHER_ROLES[overlay]
    assert all(len(names) == 1 for names in teacher_roles.values()), teacher_roles
    assert set(scaled) == set(teacher_roles.get("labeler", [])), "a ScaledObject for the labelers, and only them"
    assert sorted(roles["student"]) == sorted(STUDENTS)
    # Every configured student has its Deployment, and every Deployment's student is configured.
    cfg = effective_config(docs, teachers(docs)[0], tmp_path)
    assert sorted(s.name for s in cfg.students) == sorted(roles["student"])
    modes = {s.name: s.mode for s in cfg.students}
    assert modes == {"none": "none", "direct": "direct", "aux": "aux"}


def _cli_command(name: str) -> Any:
    group = typer.main.get_command(app)
    return group.commands.get(name)


@pytest.mark.parametrize("overlay", APP_OVERLAYS)
def test_container_commands_exist_in_the_cli(app_overlays, overlay):
    teacher = _cli_command("teacher")
    teacher_options = {o for p in teacher.params for o in getattr(p, "opts", [])}
    assert set(TEACHER_OPTIONS) <= teacher_options, "support.TEACHER_OPTIONS names options the CLI lacks"
    for d in workers(app_overlays[overlay]):
        c = main_container(d)
        # Either the image's entrypoint (distill) or torchrun running `-m distill` (= the CLI)
        # with the same arguments; torch's own parser checks torchrun's options.
        torchrun(c)
        args = c["args"]
        command = _cli_command(args[0])
        assert command is not None, f"{d['metadata']['name']}: `distill {args[0]}` does not exist"
        options = {o for p in command.params for o in getattr(p, "opts", [])}
        for arg in args[1:]:
            if arg.startswith("--"):
                assert arg in options, f"`distill {args[0]}` has no option {arg}; it has {sorted(options)}"


# -- configuration --------------------------------------------------------------------------------
@pytest.mark.parametrize("overlay", APP_OVERLAYS)
def test_config_map_is_a_valid_config_for_every_worker(app_overlays, overlay, tmp_path):
    docs = app_overlays[overlay]
    roles = set()
    for d in workers(docs):
        cfg = effective_config(docs, d, tmp_path)  # raises ConfigError if invalid
        assert isinstance(cfg, Config)
        c = main_container(d)
        mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
        volumes = {v["name"]: v for v in pod_spec(d)["volumes"]}
        args = c["args"]
        if args[0] == "teacher":
            # --role wins over the config, which defaults to both; only the trainer runs under torchrun.
            expected = args[args.index("--role") + 1] if "--role" in args else "both"
            assert cfg.teacher.role == expected, f"{d['metadata']['name']}: loads as role {cfg.teacher.role}"
            if torchrun(c) is not None:
                assert cfg.teacher.role == "trainer", f"{d['metadata']['name']}: only the trainer has ranks"
            roles.add(cfg.teacher.role)
        # State lives on the worker's volume (a labeler has none worth keeping: scratch), the CA
        # file on a mounted Secret.
        state = volumes[mounts[str(cfg.state_dir)]]
        if args[0] == "teacher" and cfg.teacher.role == "labeler":
            assert "emptyDir" in state, "a labeler's replicas cannot share one ReadWriteOnce volume"
        else:
            assert "persistentVolumeClaim" in state
        if cfg.kafka.ssl_ca_location:
            ca_dir = str(Path(cfg.kafka.ssl_ca_location).parent)
            assert "secret" in volumes[mounts[ca_dir]], "kafka.ssl_ca_location must be on a mounted Secret"
        # The metrics port the process opens is the one the probes and the Service use.
        role = role_of(d)
        if role == "student":
            port = cfg.student(c["args"][c["args"].index("--name") + 1]).metrics_port
        else:
            port = {"teacher": cfg.teacher, "producer": cfg.producer}[role].metrics_port
        # torchrun rank r serves metrics_port + r.
        expected_ports = {("metrics" if r == 0 else f"metrics-rank{r}"): port + r for r in range(ranks(c))}
        assert metrics_ports(c) == expected_ports, f"{d['metadata']['name']}: {role} metrics_port is {port}"
        if role == "student":
            assert str(cfg.state_dir / "models") in mounts, "exported models go to the shared models volume"
    assert roles == TEACHER_ROLES[overlay]


def test_base_config_file_loads_as_is(tmp_path):
    from distill.core.config import load_config

    cfg = load_config(K8S / "base" / "config.toml", environ={})
    assert cfg.kafka.sasl_password is None and cfg.kafka.ssl_key_password is None


@pytest.mark.parametrize("overlay", APP_OVERLAYS)
def test_every_workers_kafka_extra_is_accepted_at_start_up(app_overlays, overlay, tmp_path):
    """A key of kafka.extra that the system controls (isolation.level, transactional.id...) is a
    ConfigError when a worker starts: every pod would crash-loop. Caught here instead."""
    docs = app_overlays[overlay]
    for d in workers(docs):
        client_config(effective_config(docs, d, tmp_path).kafka)


@pytest.mark.parametrize("overlay", APP_OVERLAYS)
def test_the_producer_is_a_resumable_transactional_replay(app_overlays, overlay, tmp_path):
    """With a position file the replay is resumable, and so transactional (id
    producer.<producer_id>; its positions topic and ACLs: test_kafka.py). The position file
    lives on the producer's own volume, and one process holds the transactional id: a second
    one would fence the first."""
    docs = app_overlays[overlay]
    (producer,) = [d for d in workers(docs) if main_container(d)["args"][0] == "produce"]
    name = producer["metadata"]["name"]
    cfg = effective_config(docs, producer, tmp_path)
    assert cfg.producer.position_file, f"{name}: without producer.position_file a restart replays from the start"
    position = Path(cfg.producer.position_file)
    assert position.is_relative_to(cfg.state_dir), f"{name}: the position file must be under state_dir"
    _, volume = volume_of(producer, str(cfg.state_dir))
    assert "persistentVolumeClaim" in volume, f"{name}: the position file must survive the pod"
    assert producer["spec"]["replicas"] == 1 and producer["spec"]["strategy"] == {"type": "Recreate"}, name


@pytest.mark.parametrize("overlay", APP_OVERLAYS)
def test_teacher_device_matches_the_overlay(app_overlays, overlay, tmp_path):
    docs = app_overlays[overlay]
    gpu = "nvidia.com/gpu"
    assert teachers(docs)
    for teacher in teachers(docs):
        name = teacher["metadata"]["name"]
        cfg = effective_config(docs, teacher, tmp_path)
        c = main_container(teacher)
        resources = c["resources"]
        if overlay == "prod":
            assert cfg.teacher.device == "cuda", name
            # One GPU per process: each torchrun rank of the trainer, a labeler's one.
            assert resources["requests"][gpu] == resources["limits"][gpu] == str(ranks(c)), name
            spec = pod_spec(teacher)
            assert any(t["key"] == gpu for t in spec["tolerations"]), name
            assert spec["nodeSelector"], f"{name}: a GPU teacher must be pinned to GPU nodes"
            assert image_tag(c["image"]).endswith("-cuda"), name
        else:
            assert cfg.teacher.device == "cpu", name
            assert gpu not in resources.get("requests", {}) and gpu not in resources.get("limits", {}), name
    for d in workers(docs):
        if role_of(d) != "teacher":
            assert gpu not in main_container(d)["resources"].get("limits", {})
            assert image_tag(main_container(d)["image"]).endswith("-cpu")


@pytest.mark.parametrize("overlay", APP_OVERLAYS)
def test_trainer_ranks_share_the_pod_and_stop_in_time(app_overlays, overlay):
    stop_deadline = inspect.signature(Service).parameters["stop_deadline_s"].default
    trainers = [d for d in workers(app_overlays[overlay]) if torchrun(main_container(d)) is not None]
    assert bool(trainers) == (overlay in POOL_OVERLAYS)
    for d in trainers:
        c = main_container(d)
        name = d["metadata"]["name"]
        parsed = torchrun(c)
        # One pod: --standalone (a multi-node trainer is the user's, deploy/README.md).
        assert parsed.standalone and parsed.nnodes in ("1", "1:1"), name
        # The ranks (NCCL) exchange data through /dev/shm; a container's default is 64 MiB.
        _, shm = volume_of(d, "/dev/shm")
        assert shm.get("emptyDir", {}).get("medium") == "Memory", f"{name}: /dev/shm must be a memory emptyDir"
        # On SIGTERM torchrun SIGKILLs its ranks after TORCH_ELASTIC_SHUTDOWN_TIMEOUT (30 s by
        # default): they need stop_deadline_s, and the pod's grace period must cover torchrun's.
        env = {e["name"]: e for e in c["env"]}
        timeout = int(env["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"]["value"])
        assert timeout >= stop_deadline + 10, f"{name}: ranks get {timeout} s to checkpoint"
        assert pod_spec(d)["terminationGracePeriodSeconds"] >= timeout + 30, name
        # Threads per rank: not every rank one per CPU of the whole limit.
        omp = env["OMP_NUM_THREADS"]
        if "value" in omp:
            assert int(omp["value"]) * ranks(c) <= int(c["resources"]["limits"]["cpu"]), name


@pytest.mark.parametrize("overlay", POOL_OVERLAYS)
def test_trainer_and_labelers_share_the_model_store(app_overlays, overlay, tmp_path):
    docs = app_overlays[overlay]
    pool = {}
    for d in teachers(docs):
        cfg = effective_config(docs, d, tmp_path)
        pool.setdefault(cfg.teacher.role, []).append((d, cfg))
    claims = {p["metadata"]["name"]: p for p in of_kind(docs, "PersistentVolumeClaim")}
    stores = set()
    for role, found in pool.items():
        for d, cfg in found:
            name = d["metadata"]["name"]
            # The store is where the config (after the pod's environment) looks for it.
            mount, volume = volume_of(d, str(cfg.model_store()))
            claim = volume["persistentVolumeClaim"]["claimName"]
            stores.add(claim)
            if role == "trainer":
                assert not mount.get("readOnly") and not volume["persistentVolumeClaim"].get("readOnly"), (
                    f"{name}: the trainer publishes to the store"
                )
            else:
                assert mount.get("readOnly") is True, f"{name}: labelers read the store only"
                assert volume["persistentVolumeClaim"].get("readOnly") is True, name
            # A volume of its own, not the worker's state claim.
            assert claim not in {
                v["persistentVolumeClaim"]["claimName"]
                for v in pod_spec(d)["volumes"]
                if v["name"] == "state" and "persistentVolumeClaim" in v
            }
    assert set(pool) == {"trainer", "labeler"}
    (store,) = stores
    assert "ReadWriteMany" in claims[store]["spec"]["accessModes"], "the labelers run on other nodes"


@pytest.mark.parametrize("overlay", POOL_OVERLAYS)
def test_labeler_name_is_the_pod_name(app_overlays, overlay, tmp_path):
    docs = app_overlays[overlay]
    labelers = [d for d in teachers(docs) if effective_config(docs, d, tmp_path).teacher.role == "labeler"]
    assert labelers
    for d in labelers:
        c = main_container(d)
        env = {e["name"]: e for e in c["env"]}
        # Unique per replica (its transactional id is derived from it): the downward API, no --name.
        assert env["DISTILL_TEACHER__NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
        assert "--name" not in c["args"]
        assert container_environ(c, "p-1")["DISTILL_TEACHER__NAME"] == "p-1"
        assert effective_config(docs, d, tmp_path).teacher.name == example_pod_name(d), "a pod name is a valid name"


# -- hardening ------------------------------------------------------------------------------------
@pytest.mark.parametrize("overlay", APP_OVERLAYS)
def test_every_container_has_probes_resources_and_a_restricted_security_context(app_overlays, overlay):
    stop_deadline = inspect.signature(Service).parameters["stop_deadline_s"].default
    for d in workers(app_overlays[overlay]):
        name = d["metadata"]["name"]
        spec = pod_spec(d)
        pod_sc = spec["securityContext"]
        assert pod_sc["runAsNonRoot"] is True and pod_sc.get("runAsUser", 0) != 0, name
        assert pod_sc["seccompProfile"]["type"] == "RuntimeDefault", name
        assert spec["automountServiceAccountToken"] is False, name
        # SIGTERM: finish the batch, checkpoint, commit, close: the worker allows itself
        # stop_deadline_s; Kubernetes must not SIGKILL it before.
        assert spec["terminationGracePeriodSeconds"] >= max(120, stop_deadline + 30), name
        volumes = {v["name"]: v for v in spec["volumes"]}
        for c in containers(d):
            where = f"{name}/{c['name']}"
            assert c["livenessProbe"]["httpGet"]["path"] == "/healthz", where
            assert c["readinessProbe"]["httpGet"]["path"] == "/readyz", where
            assert c["startupProbe"]["httpGet"]["path"] == "/healthz", where
            for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
                assert c[probe]["httpGet"]["port"] in ("metrics", 9100), where
            res = c["resources"]
            assert {"cpu", "memory"} <= set(res["requests"]), where
            assert {"cpu", "memory"} <= set(res["limits"]), where
            sc = c["securityContext"]
            assert sc["runAsNonRoot"] is True, where
            assert sc["readOnlyRootFilesystem"] is True, where
            assert sc["allowPrivilegeEscalation"] is False, where
            assert sc.get("privileged", False) is False, where
            assert sc["capabilities"]["drop"] == ["ALL"] and not sc["capabilities"].get("add"), where
            assert sc["seccompProfile"]["type"] == "RuntimeDefault", where
            mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
            assert "emptyDir" in volumes[mounts["/tmp"]], f"{where}: a writable /tmp on a read-only root"
            image = c["image"]
            assert IMAGE_REF.fullmatch(image), (
                f"{where}: image {image!r} is not a full reference with a tag (did an overlay forget `images`?)"
            )
            assert image_tag(image) != "latest", where


@pytest.mark.parametrize("overlay", APP_OVERLAYS)
def test_manifests_hold_no_literal_secrets(app_overlays, overlay):
    docs = app_overlays[overlay]
    for d in docs:
        assert d["kind"] != "Secret", "Secrets come from Strimzi or the operator, never from these manifests"
    for d in workers(docs):
        for c in containers(d):
            for e in c.get("env", []):
                if SECRET_WORDS.search(e["name"]):
                    assert "value" not in e, f"{d['metadata']['name']}: {e['name']} is a literal"
                    assert "secretKeyRef" in e["valueFrom"], f"{e['name']} must come from a Secret"
    for cm in of_kind(docs, "ConfigMap"):
        for key, text in cm["data"].items():
            if key.endswith(".toml"):
                kafka = tomllib.loads(text).get("kafka", {})
                for field in ("sasl_password", "ssl_key_password"):
                    assert field not in kafka, f"ConfigMap {cm['metadata']['name']}: kafka.{field} is a secret"
                assert not any(SECRET_WORDS.search(k) for k in kafka.get("extra", {})), "secrets in kafka.extra"
            assert not re.search(r"(password|secret)\s*[=:]\s*\S", text, re.I), f"{cm['metadata']['name']}/{key}"
    assert "sasl_password" not in base_config_toml().get("kafka", {})


@pytest.mark.parametrize("overlay", APP_OVERLAYS)
def test_every_referenced_volume_claim_and_config_map_exists(app_overlays, overlay):
    docs = app_overlays[overlay]
    claims = {p["metadata"]["name"] for p in of_kind(docs, "PersistentVolumeClaim")}
    maps = {p["metadata"]["name"] for p in of_kind(docs, "ConfigMap")}
    used_claims = set()
    for d in workers(docs):
        for v in pod_spec(d)["volumes"]:
            if "persistentVolumeClaim" in v:
                assert v["persistentVolumeClaim"]["claimName"] in claims
                used_claims.add(v["persistentVolumeClaim"]["claimName"])
            if "configMap" in v:
                assert v["configMap"]["name"] in maps
        assert pod_spec(d)["serviceAccountName"] in {s["metadata"]["name"] for s in of_kind(docs, "ServiceAccount")}
    assert used_claims == claims, f"unused claims: {claims - used_claims}"
    # Each worker's own state volume is used by that worker alone; the KEDA-scaled labelers
    # (many replicas) keep scratch in an emptyDir instead.
    scaled = scaled_objects(docs)
    state = []
    for d in workers(docs):
        (volume,) = [v for v in pod_spec(d)["volumes"] if v["name"] == "state"]
        if d["metadata"]["name"] in scaled:
            assert "emptyDir" in volume, f"{d['metadata']['name']}: replicas cannot share a state claim"
        else:
            state.append(volume["persistentVolumeClaim"]["claimName"])
    assert len(state) == len(set(state)) == len(workers(docs)) - len(scaled)


@pytest.mark.parametrize("overlay", APP_OVERLAYS)
def test_services_and_service_monitor_reach_every_worker(app_overlays, overlay):
    docs = app_overlays[overlay]
    services = of_kind(docs, "Service")
    (monitor,) = of_kind(docs, "ServiceMonitor")
    endpoint_ports = {e["port"] for e in monitor["spec"]["endpoints"]}
    assert {e["path"] for e in monitor["spec"]["endpoints"]} == {"/metrics"}
    for d in workers(docs):
        pod_labels = d["spec"]["template"]["metadata"]["labels"]
        mine = [s for s in services if labels_match(s["spec"]["selector"], pod_labels)]
        assert len(mine) == 1, f"{d['metadata']['name']}: {len(mine)} Services"
        (svc,) = mine
        assert labels_match(monitor["spec"]["selector"]["matchLabels"], svc["metadata"]["labels"])
        ports = {p["name"]: p for p in svc["spec"]["ports"]}
        # Every metrics port: "metrics", and each further torchrun rank's.
        container_ports = metrics_ports(main_container(d))
        assert "metrics" in container_ports
        for name, number in container_ports.items():
            assert name in ports and name in endpoint_ports, f"{d['metadata']['name']}: {name} is not scraped"
            assert ports[name]["targetPort"] in (name, number)
        assert svc["spec"].get("publishNotReadyAddresses") is True, "scrape workers that are not ready too"


@pytest.mark.parametrize("overlay", APP_OVERLAYS)
def test_disruption_budgets_cover_workers_without_blocking_drains(app_overlays, overlay):
    docs = app_overlays[overlay]
    pdbs = of_kind(docs, "PodDisruptionBudget")
    for d in workers(docs):
        pod_labels = d["spec"]["template"]["metadata"]["labels"]
        mine = [p for p in pdbs if labels_match(p["spec"]["selector"]["matchLabels"], pod_labels)]
        assert len(mine) == 1, f"{d['metadata']['name']} is in {len(mine)} PodDisruptionBudgets"
    for p in pdbs:
        # A single-replica worker with minAvailable >= 1 could never be drained.
        assert "minAvailable" not in p["spec"] and p["spec"]["maxUnavailable"] >= 1


@pytest.mark.parametrize("overlay", APP_OVERLAYS)
def test_network_policy_selects_every_worker_and_allows_kafka_dns_and_scrapes(app_overlays, kafka_overlays, overlay):
    from tests.deploy.support import KAFKA_FOR

    docs = app_overlays[overlay]
    (policy,) = of_kind(docs, "NetworkPolicy")
    spec = policy["spec"]
    assert set(spec["policyTypes"]) == {"Ingress", "Egress"}
    admitted = {p["port"] for rule in spec["ingress"] for p in rule["ports"]}
    for d in workers(docs):
        assert labels_match(spec["podSelector"]["matchLabels"], d["spec"]["template"]["metadata"]["labels"])
        for name, number in metrics_ports(main_container(d)).items():
            assert name in admitted or number in admitted, f"{d['metadata']['name']}: scrapes of {name} blocked"
    egress_ports = {p["port"] for rule in spec["egress"] for p in rule.get("ports", [])}
    assert 53 in egress_ports
    (kafka,) = of_kind(kafka_overlays[KAFKA_FOR[overlay]], "Kafka")
    listener_ports = {listener["port"] for listener in kafka["spec"]["kafka"]["listeners"]}
    assert listener_ports & egress_ports, "egress must allow the Kafka listener"
