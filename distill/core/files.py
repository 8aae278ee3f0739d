"""Crash-safe file writes, without torch (the progress log, the sweep report, the model store
and the checkpoints share them).

``atomic_write`` writes a temp file in the same directory, fsyncs it, renames it over the target
and fsyncs the directory: a crash leaves either the old or the new file, never a torn one.
"""

from __future__ import annotations

import os
from pathlib import Path


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes, *more: bytes) -> None:
    """``data`` and then ``more`` (pieces written one after another: no joined copy)."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        for piece in (data, *more):
            f.write(piece)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)
