"""Dockerfiles (deploy/docker): no Docker here, so a structural lint of what matters."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.deploy.support import DOCKER, ROOT

DOCKERFILES = ("Dockerfile.cpu", "Dockerfile.cuda")


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    buf = ""
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if not buf and (not stripped or stripped.startswith("#")):
            continue
        if buf and stripped.startswith("#"):
            continue
        buf += " " + stripped[:-1] if stripped.endswith("\\") else " " + stripped
        if not stripped.endswith("\\"):
            word, _, rest = buf.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
            buf = ""
    return out


def stages(path: Path) -> list[list[tuple[str, str]]]:
    result: list[list[tuple[str, str]]] = []
    for ins in instructions(path):
        if ins[0] == "FROM":
            result.append([])
        if result:
            result[-1].append(ins)
    return result


@pytest.mark.parametrize("name", DOCKERFILES)
def test_multi_stage_build_of_the_wheel(name):
    path = DOCKER / name
    all_stages = stages(path)
    assert len(all_stages) >= 2, "multi-stage: a builder and a runtime"
    froms = [args for ins in all_stages for kind, args in ins if kind == "FROM"]
    assert re.search(r"\bAS builder\b", froms[0], re.I)
    builder = " ".join(args for _, args in all_stages[0])
    assert "pip wheel" in builder, "the builder builds the project's wheel"
    runtime = all_stages[-1]
    text = " ".join(args for _, args in runtime)
    assert "from=builder" in text or "--from=builder" in text, "the runtime takes the wheel from the builder"
    assert re.search(r"pip install [^&]*\.whl", text), "the runtime installs the wheel"


@pytest.mark.parametrize("name", DOCKERFILES)
def test_runtime_runs_as_a_numeric_non_root_user(name):
    runtime = stages(DOCKER / name)[-1]
    users = [args for kind, args in runtime if kind == "USER"]
    assert users, "the runtime stage must set USER"
    user = users[-1].split(":")[0]
    assert user.isdigit() and int(user) != 0, f"USER {users[-1]}: numeric, so runAsNonRoot can be verified"
    entry = [args for kind, args in runtime if kind == "ENTRYPOINT"]
    assert entry and '"distill"' in entry[-1]


def test_cpu_image_uses_the_cpu_build_of_torch_and_cuda_image_a_cuda_base():
    cpu = (DOCKER / "Dockerfile.cpu").read_text()
    assert "download.pytorch.org/whl/cpu" in cpu
    cuda_froms = [args for kind, args in instructions(DOCKER / "Dockerfile.cuda") if kind == "FROM"]
    cuda_args = dict(re.findall(r"^ARG (\w+)=(\S+)", (DOCKER / "Dockerfile.cuda").read_text(), re.M))
    runtime_from = cuda_froms[-1].split()[0]
    image = re.sub(r"\$\{(\w+)\}", lambda m: cuda_args[m.group(1)], runtime_from)
    assert image.startswith("nvidia/cuda:"), image
    assert re.search(r"download\.pytorch\.org/whl/cu\d+", (DOCKER / "Dockerfile.cuda").read_text())


@pytest.mark.parametrize("name", DOCKERFILES)
def test_torch_version_is_the_one_the_makefile_pins(name):
    makefile = (ROOT / "Makefile").read_text()
    pinned = re.search(r"pip install -q torch==(\S+)", makefile)
    assert pinned, "the Makefile no longer pins torch; update this test"
    arg = re.search(r"^ARG TORCH_VERSION=(\S+)", (DOCKER / name).read_text(), re.M)
    assert arg and arg.group(1) == pinned.group(1), f"{name}: TORCH_VERSION must match the Makefile"


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _packages() -> set[str]:
    """The top-level packages the wheel holds (a list, or setuptools' find with include patterns)."""
    packages = _pyproject()["tool"]["setuptools"]["packages"]
    if isinstance(packages, dict):
        return {pattern.rstrip("*").rstrip(".") for pattern in packages["find"]["include"]}
    return set(packages)


@pytest.mark.parametrize("name", DOCKERFILES)
def test_copied_sources_exist_and_are_not_ignored(name):
    path = DOCKER / name
    ignore = (DOCKER / f"{name}.dockerignore").read_text().splitlines()
    kept = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    packages = _packages()
    copied = set()
    for kind, args in instructions(path):
        if kind == "COPY" and "--from" not in args:
            *sources, _dest = args.split()
            for src in sources:
                src = src.rstrip("/")
                assert (ROOT / src).exists(), f"{name}: COPY {src} does not exist"
                assert src in kept, f"{name}: {src} is excluded by {name}.dockerignore"
                copied.add(src)
    assert set(packages) <= copied, f"{name}: packages not copied: {set(packages) - copied}"
    assert "pyproject.toml" in copied


def _install_commands(**env: str) -> list[str]:
    """The commands `make install` would run (make -n: printed, not run), with ``env`` set."""
    environ = {k: v for k, v in os.environ.items() if k != "TORCH_INDEX_URL"} | env
    proc = subprocess.run(
        ["make", "-n", "-B", ".venv/.installed"], cwd=ROOT, env=environ, capture_output=True, text=True, timeout=30
    )
    assert proc.returncode == 0, proc.stderr
    return [line for line in proc.stdout.splitlines() if "pip install" in line and "torch==" in line]


@pytest.mark.skipif(shutil.which("make") is None, reason="no make on PATH")
def test_makefile_takes_torch_from_TORCH_INDEX_URL_when_set():
    (default,) = _install_commands()
    assert "--index-url" not in default and "--extra-index-url" not in default, "PyPI unless told"
    cpu = "https://download.pytorch.org/whl/cpu"
    (chosen,) = _install_commands(TORCH_INDEX_URL=cpu)
    assert chosen.split() == [*default.split(), "--index-url", cpu]
    assert re.search(r"\btorch==\d+\.\d+\.\d+\b", chosen), "still the pinned version"


LOCK = DOCKER / "requirements.lock"
# Installed from PyTorch's index of each image's build, so not in the lock (deploy/docker/lock.sh).
TORCH_BUILD = re.compile(r"^(torch|triton|nvidia-.*|cuda-.*)$")


def _lock() -> dict[str, tuple[str, list[str]]]:
    """requirements.lock as {name: (version, hashes)}."""
    entries: dict[str, tuple[str, list[str]]] = {}
    name = None
    for line in LOCK.read_text().splitlines():
        pin = re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)", line)
        if pin:
            name = canonicalize_name(pin.group(1))
            entries[name] = (pin.group(2), [])
        elif name and (h := re.search(r"--hash=(sha256:[0-9a-f]{64})", line)):
            entries[name][1].append(h.group(1))
    return entries


def test_the_lock_pins_every_runtime_dependency_with_hashes():
    """What the images install (pip --require-hashes) is what pyproject.toml asks for, without
    its extras: so no matplotlib in a worker image."""
    lock = _lock()
    assert len(lock) >= 10
    for name, (version, hashes) in lock.items():
        assert hashes, f"{name}=={version} has no hash: regenerate with sh deploy/docker/lock.sh"
        assert not TORCH_BUILD.match(name), f"{name}: installed from PyTorch's index, not from the lock"
    assert "matplotlib" not in lock, "matplotlib is for the local report only"
    for dep in _pyproject()["project"]["dependencies"]:
        req = Requirement(dep)
        name = canonicalize_name(req.name)
        if name == "torch":
            continue
        assert name in lock, f"{dep} is not in the lock: run sh deploy/docker/lock.sh (or make it an extra)"
        assert req.specifier.contains(lock[name][0], prereleases=True), f"lock has {name}=={lock[name][0]}, want {dep}"
    # Resolved against the torch the Makefile pins (its dependencies' versions come from it).
    pinned = re.search(r"pip install -q torch==(\S+)", (ROOT / "Makefile").read_text()).group(1)
    assert f"# torch=={pinned}" in LOCK.read_text().split("\n", 3)[1], "regenerate the lock after a torch change"


@pytest.mark.parametrize("name", DOCKERFILES)
def test_runtime_installs_the_lock_then_torch_then_the_wheel_alone(name):
    runtime = " ".join(args for kind, args in stages(DOCKER / name)[-1] if kind == "RUN")
    assert "source=deploy/docker/requirements.lock" in runtime
    ignore = (DOCKER / f"{name}.dockerignore").read_text().splitlines()
    assert "!deploy/docker/requirements.lock" in ignore, "the lock must be in the build context"
    lock = runtime.index("pip install --require-hashes --no-deps -r /tmp/requirements.lock")
    torch = runtime.index('pip install --index-url "${TORCH_INDEX}" "torch==${TORCH_VERSION}"')
    wheel = runtime.index("pip install --no-deps /wheels/*.whl")
    check = runtime.index("pip check")
    assert lock < torch < wheel < check, "lock, torch, the wheel without dependencies, then pip check"


@pytest.mark.parametrize("name", DOCKERFILES)
def test_runtime_has_the_oci_labels(name):
    path = DOCKER / name
    runtime = stages(path)[-1]
    text = " ".join(args for kind, args in runtime if kind == "LABEL")
    labels = dict(re.findall(r"org\.opencontainers\.image\.([a-z.]+)=\"([^\"]*)\"", text))
    required = {"title", "description", "version", "revision", "created", "source", "licenses", "base.name"}
    assert required <= set(labels), f"missing OCI labels {required - set(labels)}"
    args = dict(re.findall(r"^ARG (\w+)=(\S+)", path.read_text(), re.M))
    project = _pyproject()["project"]
    assert labels["version"] == "${VERSION}" and args["VERSION"] == project["version"]
    assert labels["licenses"] == project["license"]
    assert labels["revision"] == "${REVISION}" and labels["created"] == "${CREATED}"
    froms = [a for kind, a in runtime if kind == "FROM"]
    assert labels["base.name"] == froms[0].split()[0], "base.name is the image the runtime stage starts from"
