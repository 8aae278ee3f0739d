"""Atomic, verified checkpoints.

A checkpoint file is ``MAGIC + sha256(payload) + payload`` where the payload is ``torch.save``
of a dict. Writing: temp file in the same directory, fsync, rename, fsync the directory; so a
crash leaves either the old or the new file, never a torn one. Reading: newest first; a file
that fails its checksum or does not load is skipped with a warning and the previous one is
used. When files exist but none loads, that is an error, never a silent fresh start.
"""

from __future__ import annotations

import hashlib
import io
import logging
import re
from pathlib import Path
from typing import Any

import torch

from distill.core.exceptions import CheckpointError
from distill.core.files import atomic_write

log = logging.getLogger(__name__)

MAGIC = b"DISTILLCKPT1"
_NAME = re.compile(r"^ckpt-(\d{12})\.pt$")


def serialize(state: dict[str, Any]) -> bytes:
    """The payload of a checkpoint: the state as it is now (its tensors are copied)."""
    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue()


class Checkpointer:
    def __init__(self, directory: Path | str, keep: int = 3):
        self.dir = Path(directory)
        self.keep = keep

    def versions(self) -> list[int]:
        if not self.dir.is_dir():
            return []
        found = (_NAME.match(p.name) for p in self.dir.iterdir())
        return sorted(int(m.group(1)) for m in found if m)

    def path(self, version: int) -> Path:
        return self.dir / f"ckpt-{version:012d}.pt"

    def save(self, version: int, state: dict[str, Any]) -> Path:
        return self.write(version, serialize(state))

    def write(self, version: int, payload: bytes) -> Path:
        """Make a ``serialize``d state durable as ``version``, then drop all but the newest
        ``keep``. Holds no reference to live tensors: it may run on another thread."""
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.path(version)
        atomic_write(path, MAGIC + hashlib.sha256(payload).digest(), payload)
        for old in self.versions()[: -self.keep]:
            self.path(old).unlink(missing_ok=True)
        return path

    def read(self, version: int) -> dict[str, Any]:
        raw = self.path(version).read_bytes()
        head = len(MAGIC) + 32
        if not raw.startswith(MAGIC) or len(raw) < head:
            raise CheckpointError(f"{self.path(version)} is not a checkpoint (bad header)")
        digest, payload = raw[len(MAGIC) : head], raw[head:]
        if hashlib.sha256(payload).digest() != digest:
            raise CheckpointError(f"{self.path(version)} failed its checksum (truncated or corrupt)")
        return torch.load(io.BytesIO(payload), map_location="cpu", weights_only=False)

    def load_latest(self) -> tuple[int, dict[str, Any]] | None:
        """(version, state) of the newest good checkpoint, or None when there is none at all."""
        versions = self.versions()
        errors = []
        for version in reversed(versions):
            try:
                return version, self.read(version)
            except Exception as exc:  # a torn or foreign file: fall back to the previous one
                log.warning(
                    "skipping unreadable checkpoint", extra={"path": str(self.path(version)), "error": str(exc)}
                )
                errors.append(f"{self.path(version).name}: {exc}")
        if versions:
            raise CheckpointError(
                f"no checkpoint in {self.dir} could be read ({'; '.join(errors)}). Refusing to start from "
                "scratch silently: restore a good file, or move the directory away to start fresh."
            )
        return None
