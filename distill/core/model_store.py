"""The model store: published teacher weights, one file per version, for the labelers.

A directory (locally) or a volume every labeler mounts (in Kubernetes). The trainer writes
``teacher-<version>.pt`` atomically (temp file, fsync, rename) and announces its ``file://``
URI with the sha256 of the file; a labeler verifies the checksum before it loads the weights.
Only weights are published: the optimizer state stays in the trainer's own checkpoints.
"""

from __future__ import annotations

import hashlib
import io
import re
from pathlib import Path
from urllib.parse import unquote, urlparse

import torch

from distill.core.exceptions import CheckpointError
from distill.core.files import atomic_write

_NAME = re.compile(r"^teacher-(\d{12})\.pt$")


class ModelStore:
    def __init__(self, directory: Path | str):
        self.dir = Path(directory)

    def path(self, version: int) -> Path:
        return self.dir / f"teacher-{version:012d}.pt"

    def versions(self) -> list[int]:
        if not self.dir.is_dir():
            return []
        found = (_NAME.match(p.name) for p in self.dir.iterdir())
        return sorted(int(m.group(1)) for m in found if m)

    def publish(self, version: int, weights: dict[str, torch.Tensor]) -> tuple[str, str]:
        """Write the weights of ``version``; returns (uri, sha256 hex)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()
        torch.save({k: v.detach().cpu() for k, v in weights.items()}, buf)
        data = buf.getvalue()
        path = self.path(version)
        atomic_write(path, data)
        return path.resolve().as_uri(), hashlib.sha256(data).hexdigest()

    def describe(self, version: int) -> tuple[str, str] | None:
        """(uri, sha256) of a version already in the store, or None."""
        path = self.path(version)
        if not path.exists():
            return None
        return path.resolve().as_uri(), hashlib.sha256(path.read_bytes()).hexdigest()

    def locate(self, uri: str) -> Path:
        """The file of an announced URI. The trainer and the labelers may mount the store at
        different paths: a URI that does not exist here is looked up by file name in this store."""
        parsed = urlparse(uri)
        if parsed.scheme != "file":
            raise CheckpointError(f"checkpoint URI {uri!r}: only file:// URIs (a directory or a mounted volume)")
        path = Path(unquote(parsed.path))
        if path.exists():
            return path
        local = self.dir / path.name
        if local.exists():
            return local
        raise CheckpointError(
            f"checkpoint {uri} is not there (nor {local}): mount the trainer's model store on this worker "
            "and set teacher.pool.model_store to its path"
        )

    def load(self, uri: str, sha256: str) -> dict[str, torch.Tensor]:
        path = self.locate(uri)
        data = path.read_bytes()
        if hashlib.sha256(data).hexdigest() != sha256:
            raise CheckpointError(f"{path} does not match its announced sha256 (truncated, corrupt or overwritten)")
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)

    def prune(self, keep_from: int, keep_last: int = 2) -> list[int]:
        """Delete versions older than ``keep_from`` (none a labeler may still need), always
        keeping the newest ``keep_last``. Returns the deleted versions."""
        versions = self.versions()
        protected = set(versions[-keep_last:])
        deleted = [v for v in versions if v < keep_from and v not in protected]
        for v in deleted:
            self.path(v).unlink(missing_ok=True)
        return deleted
