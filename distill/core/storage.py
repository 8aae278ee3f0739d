"""Where published files live: a local directory or an fsspec URL (``s3://bucket/prefix``,
``file:///path``, any filesystem fsspec has a driver for).

Writes are whole files and atomic on both: locally a temp file, fsync and rename
(``atomic_write``); on an object store one PUT (or a multipart upload, completed only once
every part is there), so a reader never sees a torn file and an interrupted upload leaves no
object. Credentials and endpoints come from the environment the driver reads (for S3:
``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_ENDPOINT_URL_S3``, an IAM role, ...).

A failed write raises ``StorageError``: a ``CheckpointError`` (the project's error for
published files) that is also an ``OSError``, so callers that hold their commits back on a
failed disk write do the same for a bucket that refuses it.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import fsspec
from fsspec.implementations.local import LocalFileSystem

from distill.core.exceptions import CheckpointError
from distill.core.files import atomic_write


class StorageError(CheckpointError, OSError):
    """A file could not be written to, or removed from, a store."""


class Storage:
    """A directory or a URL prefix; every name below is relative to it (``a/b``)."""

    def __init__(self, location: str | Path):
        text = str(location)
        if not text:
            raise CheckpointError("an empty store location: give a directory or an fsspec URL (s3://bucket/prefix)")
        try:
            fs, root = fsspec.core.url_to_fs(text)
        except (ImportError, ValueError) as exc:
            raise CheckpointError(
                f"store {text!r}: {exc} (for s3:// install s3fs; other schemes need their fsspec driver)"
            ) from exc
        self.location = text
        self.fs = fs
        self.root = root.rstrip("/") or "/"
        self.local = isinstance(fs, LocalFileSystem)

    def __str__(self) -> str:
        return self.location

    # -- names ----------------------------------------------------------------------------
    def _full(self, name: str) -> str:
        return f"{self.root}/{name}" if name else self.root

    def local_path(self, name: str = "") -> Path:
        """The local path of ``name``; only for a store that is a directory."""
        if not self.local:
            raise CheckpointError(f"store {self.location} is not a local directory")
        return Path(self._full(name))

    def url(self, name: str = "") -> str:
        """A URL of ``name`` that any process can open (file:// for a directory)."""
        if self.local:
            return self.local_path(name).resolve().as_uri()
        return str(self.fs.unstrip_protocol(self._full(name)))

    def child(self, name: str) -> Storage:
        """The store one level down, for example a student's directory under the export root."""
        if self.local:
            return Storage(self.local_path(name))
        return Storage(self.url(name))

    # -- reads ------------------------------------------------------------------------------
    def read(self, name: str) -> bytes:
        """The bytes of ``name``; FileNotFoundError if it is not there."""
        if self.local:
            return self.local_path(name).read_bytes()
        return bytes(self.fs.cat_file(self._full(name)))

    def exists(self, name: str) -> bool:
        if self.local:
            return self.local_path(name).exists()
        self.fs.invalidate_cache(self._full(name))
        return bool(self.fs.exists(self._full(name)))

    def names(self, name: str = "") -> list[str]:
        """The entries directly under ``name`` (files and folders), sorted; [] if none."""
        if self.local:
            folder = self.local_path(name)
            return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
        full = self._full(name)
        self.fs.invalidate_cache(full)  # another process writes here: no stale listing
        try:
            found = self.fs.ls(full, detail=False)
        except FileNotFoundError:
            return []
        return sorted({str(p).rstrip("/").rsplit("/", 1)[-1] for p in found} - {""})

    def size(self, name: str = "") -> int:
        """Bytes of every file under ``name``."""
        if self.local:
            root = self.local_path(name)
            if root.is_file():
                return root.stat().st_size
            return sum(p.stat().st_size for p in root.rglob("*") if p.is_file()) if root.is_dir() else 0
        full = self._full(name)
        self.fs.invalidate_cache(full)
        try:
            return int(self.fs.du(full, total=True))
        except FileNotFoundError:
            return 0

    # -- writes -----------------------------------------------------------------------------
    def write(self, name: str, data: bytes) -> None:
        """Write ``name`` whole and atomically (no reader sees a part of it)."""
        try:
            if self.local:
                path = self.local_path(name)
                path.parent.mkdir(parents=True, exist_ok=True)
                atomic_write(path, data)
            else:
                self.fs.pipe_file(self._full(name), data)
        except OSError as exc:
            raise StorageError(
                f"cannot write {self.url(name)}: {exc}; make the store writable (directory permissions, "
                "the bucket's policy or the credentials in the environment) - nothing is committed past it"
            ) from exc

    def remove(self, name: str) -> None:
        """Delete a file or a folder and what it holds; nothing if it is not there."""
        try:
            if self.local:
                path = self.local_path(name)
                if path.is_dir():
                    shutil.rmtree(path)
                else:
                    path.unlink(missing_ok=True)
                return
            full = self._full(name)
            self.fs.invalidate_cache(full)
            if self.fs.exists(full):
                self.fs.rm(full, recursive=True)
                self.fs.invalidate_cache(full)
                # a bulk delete reports refusals per key, not as an error: look again
                if self.fs.exists(full):
                    raise PermissionError("the store refused the delete (the bucket's policy or the credentials)")
        except FileNotFoundError:
            return
        except OSError as exc:
            raise StorageError(f"cannot delete {self.url(name)}: {exc}") from exc
