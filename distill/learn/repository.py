"""A student's exported versions, in the layout of a Triton model repository.

``<model root>/<student>/`` holds one numbered directory per version, ``config.pbtxt`` (whose
``version_policy`` names the promoted version, so Triton serves that one), and two pointer
files: ``LATEST`` (the newest version) and ``PROMOTED`` (the version to serve). The model root
is a directory or an fsspec URL (``distill.core.storage``).

A version appears whole: in a directory it is written under ``.staging-<version>`` and
renamed; in an object store its files are uploaded one by one with ``signature.json`` last,
and a version without it is not a version (an interrupted upload). Retention keeps the newest
``keep`` versions and the promoted one; nothing in flight is deleted.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass, field
from typing import Any

from distill.core.exceptions import CheckpointError
from distill.core.storage import Storage, StorageError
from distill.learn.promotion import Decision

MAX_BATCH = 4096  # Triton's max_batch_size in config.pbtxt: requests are batched up to this
COMPLETE = "signature.json"  # written last: a version directory without it is incomplete
_NUMBER = re.compile(r"^[1-9]\d*$")  # Triton ignores other names (and those starting with 0)
_STAGING = re.compile(r"^\.staging-(\d+)$")
_TRITON_TYPES = {"int64": "TYPE_INT64", "float32": "TYPE_FP32"}

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class VersionInfo:
    version: int
    bytes: int
    latest: bool
    promoted: bool
    figures: dict[str, float]


@dataclass
class RepositoryState:
    """The repository after an export, a promotion or a prune (what the metrics report)."""

    exported: int | None
    latest: int | None
    promoted: int | None
    kept: list[int]
    deleted: list[int] = field(default_factory=list)
    bytes: int = 0
    decision: Decision | None = None


def triton_config(name: str, signature: dict[str, Any], promoted: int | None) -> str:
    """config.pbtxt for Triton's PyTorch backend; the batch dimension is implicit."""

    def tensor(spec: dict[str, Any]) -> str:
        return f'  {{ name: "{spec["name"]}" data_type: {_TRITON_TYPES[spec["dtype"]]} dims: [ {spec["shape"][1]} ] }}'

    versions = "" if promoted is None else str(promoted)
    lines = [
        f'name: "{name}"',
        'platform: "pytorch_libtorch"',
        f"max_batch_size: {MAX_BATCH}",
        "# the promoted version (distill models promote, or the promotion rule); none: nothing is served",
        f"version_policy: {{ specific: {{ versions: [ {versions} ] }} }}",
        "input [",
        ",\n".join(tensor(s) for s in signature["inputs"]),
        "]",
        "output [",
        ",\n".join(tensor(s) for s in signature["outputs"]),
        "]",
        "dynamic_batching { }",
        "",
    ]
    return "\n".join(lines)


class ModelRepository:
    def __init__(self, location: str | os.PathLike[str]):
        text = str(location).rstrip("/")
        self.storage = Storage(text)
        self.parent, _, self.name = text.rpartition("/")

    # -- reading --------------------------------------------------------------------------
    def _numbered(self) -> list[int]:
        return sorted(int(n) for n in self.storage.names() if _NUMBER.match(n))

    def versions(self) -> list[int]:
        """The complete versions, oldest first."""
        return [v for v in self._numbered() if self.storage.exists(f"{v}/{COMPLETE}")]

    def _pointer(self, name: str) -> int | None:
        try:
            text = self.storage.read(name).decode().strip()
        except FileNotFoundError:
            return None
        return int(text) if text.isdigit() else None

    def latest(self) -> int | None:
        return self._pointer("LATEST")

    def promoted(self) -> int | None:
        return self._pointer("PROMOTED")

    def read(self, version: int, filename: str) -> bytes:
        return self.storage.read(f"{version}/{filename}")

    def figures(self, version: int) -> dict[str, float]:
        try:
            return dict(json.loads(self.read(version, "metrics.json")).get("windowed", {}))
        except FileNotFoundError:
            return {}

    def sibling_figures(self, student: str) -> dict[str, float] | None:
        """The windowed figures of another student's newest export under the same root."""
        other = ModelRepository(f"{self.parent}/{student}")
        latest = other.latest()
        return other.figures(latest) if latest is not None else None

    def entries(self) -> list[VersionInfo]:
        latest, promoted = self.latest(), self.promoted()
        return [
            VersionInfo(v, self.storage.size(str(v)), v == latest, v == promoted, self.figures(v))
            for v in self.versions()
        ]

    def require(self) -> list[int]:
        """The complete versions; an error naming the place if there are none."""
        versions = self.versions()
        if not versions:
            raise CheckpointError(
                f"no exported versions in {self.storage}: check the student's name and model_root "
                "(a student exports at each checkpoint)"
            )
        return versions

    # -- writing ----------------------------------------------------------------------------
    def write_version(self, version: int, files: dict[str, bytes]) -> None:
        """Write a version's files; it becomes visible whole (see the module's text)."""
        ordered = sorted(files.items(), key=lambda item: item[0] == COMPLETE)  # the marker last
        if not self.storage.local:
            self.storage.remove(f"{version}/{COMPLETE}")  # the same version again: incomplete until rewritten
            for name, data in ordered:
                self.storage.write(f"{version}/{name}", data)
            return
        staging = self.storage.child(f".staging-{version}")
        self.storage.remove(f".staging-{version}")  # left by a crash
        for name, data in ordered:
            staging.write(name, data)
        target = self.storage.local_path(str(version))
        try:
            if target.exists():  # the same version again (a retried checkpoint): the new one wins
                self.storage.remove(str(version))
            os.replace(staging.local_path(), target)
            fd = os.open(target.parent, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            raise StorageError(f"cannot move version {version} into {self.storage}: {exc}") from exc

    def _set_promoted(self, version: int) -> None:
        signature = json.loads(self.read(version, COMPLETE))
        self.storage.write("PROMOTED", f"{version}\n".encode())
        self.storage.write("config.pbtxt", triton_config(self.name, signature, version).encode())

    def after_export(self, version: int, decision: Decision, signature: dict[str, Any], keep: int) -> RepositoryState:
        """LATEST to the new version, PROMOTED to it if the decision says so, then retention."""
        self.storage.write("LATEST", f"{version}\n".encode())
        if decision.promote:
            self._set_promoted(version)
        elif not self.storage.exists("config.pbtxt"):
            self.storage.write("config.pbtxt", triton_config(self.name, signature, self.promoted()).encode())
        try:
            state = self.prune(keep)
        except StorageError as exc:
            # The version is durable and served as decided; only the old ones stay a while
            # longer (the versions-kept metric shows it), retried at the next export.
            log.warning("old exported versions could not be deleted", extra={"error": str(exc)})
            state = self.state()
        state.exported, state.decision = version, decision
        return state

    def promote(self, version: int | None = None) -> RepositoryState:
        """Serve ``version`` (None: the newest), whatever the rule said (an operator's call)."""
        versions = self.require()
        chosen = versions[-1] if version is None else version
        if chosen not in versions:
            raise CheckpointError(
                f"version {chosen} is not a complete export in {self.storage}; versions there: {versions}"
            )
        self._set_promoted(chosen)
        return self.state()

    def prune(self, keep: int) -> RepositoryState:
        """Delete all but the newest ``keep`` complete versions and the promoted one. A version
        or staging directory newer than the newest complete version may be in flight: kept."""
        if keep < 1:
            raise CheckpointError(f"keep must be at least 1, got {keep}")
        complete = self.versions()
        newest = complete[-1] if complete else 0
        kept = set(complete[-keep:])
        promoted = self.promoted()
        if promoted is not None:
            kept.add(promoted)
        deleted = [v for v in self._numbered() if v not in kept and v <= newest]
        for v in deleted:
            self.storage.remove(str(v))
        for name in self.storage.names():
            staged = _STAGING.match(name)
            if staged and int(staged.group(1)) <= newest:
                self.storage.remove(name)  # left by a crash before its rename
        state = self.state()
        state.deleted = deleted
        return state

    def state(self) -> RepositoryState:
        return RepositoryState(
            exported=None,
            latest=self.latest(),
            promoted=self.promoted(),
            kept=self.versions(),
            bytes=self.storage.size(),
        )
