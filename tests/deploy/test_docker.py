"""Dockerfiles (deploy/docker): no Docker here, so a structural lint of what matters."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

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


@pytest.mark.parametrize("name", DOCKERFILES)
def test_copied_sources_exist_and_are_not_ignored(name):
    path = DOCKER / name
    ignore = (DOCKER / f"{name}.dockerignore").read_text().splitlines()
    kept = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    packages = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
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
