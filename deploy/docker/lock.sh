#!/bin/sh
# Writes deploy/docker/requirements.lock: every Python package the images install, pinned, with
# its hashes (pip --require-hashes), resolved for the images' Python (3.12, Linux x86_64) from
# pyproject.toml's dependencies (no extras: no matplotlib) with torch at the Makefile's version.
# torch itself, triton and the CUDA libraries are left out: each image installs torch from
# PyTorch's index of its build (CPU or CUDA), whose wheels differ from PyPI's.
# Needs uv (pip install uv). Run from anywhere after changing the dependencies:
#   sh deploy/docker/lock.sh
set -eu
cd "$(dirname "$0")/../.."
torch=$(sed -n 's/.*pip install -q torch==\([^ ]*\).*/\1/p' Makefile)
constraints=$(mktemp)
trap 'rm -f "$constraints"' EXIT
echo "torch==$torch" >"$constraints"
target="--python-version 3.12 --python-platform x86_64-manylinux_2_28"
# shellcheck disable=SC2086
skip=$(uv pip compile -q --no-header pyproject.toml -c "$constraints" $target |
  sed -n 's/^\(torch\|triton\|nvidia-[a-z0-9-]*\|cuda-[a-z0-9-]*\)==.*/--no-emit-package \1/p')
# shellcheck disable=SC2086
uv pip compile -q pyproject.toml -c "$constraints" $target --generate-hashes $skip \
  --custom-compile-command "sh deploy/docker/lock.sh  # torch==$torch" -o deploy/docker/requirements.lock
