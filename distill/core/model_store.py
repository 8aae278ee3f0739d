"""The model store: published teacher weights, one file per version, for the labelers.

A directory (locally, or a volume every labeler mounts) or an fsspec URL such as
``s3://bucket/prefix`` (``distill.core.storage``: credentials from the environment). The
trainer writes ``teacher-<version>.pt`` whole (atomic rename, or one object PUT: an
interrupted upload is never a version) and announces its URI with the sha256 of the file; a
labeler verifies the checksum before it loads the weights. Only weights are published: the
optimizer state stays in the trainer's own checkpoints.
"""

from __future__ import annotations

import hashlib
import io
import re
from pathlib import Path
from urllib.parse import unquote, urlparse

import torch

from distill.core.exceptions import CheckpointError
from distill.core.storage import Storage

_NAME = re.compile(r"^teacher-(\d{12})\.pt$")


class ModelStore:
    def __init__(self, location: Path | str):
        self.storage = Storage(location)
        self.dir = self.storage.location  # for messages: where the store is

    @staticmethod
    def name(version: int) -> str:
        return f"teacher-{version:012d}.pt"

    def path(self, version: int) -> Path:
        """The file of ``version`` in a store that is a directory."""
        return self.storage.local_path(self.name(version))

    def versions(self) -> list[int]:
        found = (_NAME.match(name) for name in self.storage.names())
        return sorted(int(m.group(1)) for m in found if m)

    def publish(self, version: int, weights: dict[str, torch.Tensor]) -> tuple[str, str]:
        """Write the weights of ``version``; returns (uri, sha256 hex). A store that refuses
        the write raises ``StorageError`` (a ``CheckpointError``), a directory or a bucket alike."""
        buf = io.BytesIO()
        torch.save({k: v.detach().cpu() for k, v in weights.items()}, buf)
        data = buf.getvalue()
        self.storage.write(self.name(version), data)
        return self.storage.url(self.name(version)), hashlib.sha256(data).hexdigest()

    def describe(self, version: int) -> tuple[str, str] | None:
        """(uri, sha256) of a version already in the store, or None."""
        try:
            data = self.storage.read(self.name(version))
        except FileNotFoundError:
            return None
        return self.storage.url(self.name(version)), hashlib.sha256(data).hexdigest()

    def _read(self, uri: str) -> bytes:
        """The bytes of an announced URI. The trainer and the labelers may see the store at
        different places (other mount paths, a bucket through another endpoint): a URI that
        cannot be read here is looked up by its file name in this store."""
        parsed = urlparse(uri)
        name = Path(unquote(parsed.path)).name
        if not _NAME.match(name):
            raise CheckpointError(f"checkpoint URI {uri!r} does not name a teacher-<version>.pt file")
        if parsed.scheme == "file":
            path = Path(unquote(parsed.path))
            if path.exists():
                return path.read_bytes()
        try:
            return self.storage.read(name)
        except FileNotFoundError:
            pass
        raise CheckpointError(
            f"checkpoint {uri} is not there (nor {self.storage.url(name)}): give this worker the trainer's model "
            "store (mount its volume, or the same bucket URL) and set teacher.pool.model_store to it"
        )

    def load(self, uri: str, sha256: str) -> dict[str, torch.Tensor]:
        data = self._read(uri)
        if hashlib.sha256(data).hexdigest() != sha256:
            raise CheckpointError(f"{uri} does not match its announced sha256 (truncated, corrupt or overwritten)")
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)

    def prune(self, keep_from: int, keep_last: int = 2) -> list[int]:
        """Delete versions older than ``keep_from`` (none a labeler may still need), always
        keeping the newest ``keep_last``. Returns the deleted versions."""
        versions = self.versions()
        protected = set(versions[-keep_last:])
        deleted = [v for v in versions if v < keep_from and v not in protected]
        for v in deleted:
            self.storage.remove(self.name(v))
        return deleted
