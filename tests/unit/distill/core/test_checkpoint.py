"""Atomic, verified checkpoints: round trips, pruning, fallback past torn files, loud failure."""

from __future__ import annotations

import hashlib
import os

import pytest
import torch

from distill.core import checkpoint as ckpt_mod
from distill.core import files as files_mod
from distill.core.checkpoint import MAGIC, Checkpointer
from distill.core.exceptions import CheckpointError
from distill.core.files import atomic_write


def state(i: int) -> dict:
    g = torch.Generator().manual_seed(i)
    return {
        "model": {"w": torch.randn(4, 3, generator=g), "b": torch.arange(3, dtype=torch.long) + i},
        "offsets": {0: {"examples": 10 * i, "labels_resume": 10 * i - 1}},
        "counts": {"joined": i},
        "version": i,
    }


def assert_state_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    torch.testing.assert_close(a["model"]["w"], b["model"]["w"], rtol=0, atol=0)
    torch.testing.assert_close(a["model"]["b"], b["model"]["b"], rtol=0, atol=0)
    assert a["offsets"] == b["offsets"] and a["counts"] == b["counts"] and a["version"] == b["version"]


def test_save_load_round_trip_with_tensors(tmp_path):
    ck = Checkpointer(tmp_path / "ck", keep=3)
    path = ck.save(5, state(5))
    assert path == ck.path(5) and path.is_file()
    assert path.read_bytes().startswith(MAGIC)
    version, loaded = ck.load_latest()
    assert version == 5
    assert_state_equal(loaded, state(5))
    assert loaded["model"]["w"].device.type == "cpu"
    assert_state_equal(ck.read(5), state(5))


def test_load_latest_returns_the_newest(tmp_path):
    ck = Checkpointer(tmp_path, keep=5)
    for v in (3, 1, 7, 5):
        ck.save(v, state(v))
    assert ck.versions() == [1, 3, 5, 7]
    version, loaded = ck.load_latest()
    assert version == 7
    assert_state_equal(loaded, state(7))


@pytest.mark.parametrize("keep", [1, 2, 3])
def test_keep_prunes_old_versions(tmp_path, keep):
    ck = Checkpointer(tmp_path, keep=keep)
    for v in range(1, 7):
        ck.save(v, state(v))
        assert len(ck.versions()) == min(v, keep)
    assert ck.versions() == list(range(7 - keep, 7))
    assert sorted(p.name for p in tmp_path.iterdir()) == [ck.path(v).name for v in range(7 - keep, 7)]


def test_versions_ignore_foreign_files(tmp_path):
    ck = Checkpointer(tmp_path, keep=3)
    ck.save(2, state(2))
    (tmp_path / "notes.txt").write_text("hi")
    (tmp_path / "ckpt-12.pt").write_bytes(b"x")  # wrong width: not ours
    (tmp_path / "ckpt-000000000009.pt.bak").write_bytes(b"x")
    assert ck.versions() == [2]
    assert ck.load_latest()[0] == 2


def test_truncated_newest_falls_back_to_previous(tmp_path, caplog):
    ck = Checkpointer(tmp_path, keep=3)
    for v in (1, 2, 3):
        ck.save(v, state(v))
    raw = ck.path(3).read_bytes()
    ck.path(3).write_bytes(raw[: len(raw) // 2])
    with caplog.at_level("WARNING", logger="distill.core.checkpoint"):
        version, loaded = ck.load_latest()
    assert version == 2
    assert_state_equal(loaded, state(2))
    assert any("skipping" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("where", ["header", "digest", "payload", "last"])
def test_corrupted_byte_in_newest_falls_back_to_previous(tmp_path, where):
    ck = Checkpointer(tmp_path, keep=3)
    for v in (1, 2):
        ck.save(v, state(v))
    raw = bytearray(ck.path(2).read_bytes())
    at = {
        "header": 2,
        "digest": len(MAGIC) + 5,
        "payload": len(MAGIC) + 32 + 40,
        "last": len(raw) - 1,
    }[where]
    raw[at] ^= 0x01
    ck.path(2).write_bytes(bytes(raw))
    with pytest.raises(CheckpointError):
        ck.read(2)
    version, loaded = ck.load_latest()
    assert version == 1
    assert_state_equal(loaded, state(1))


def test_truncated_to_nothing_and_foreign_content_fall_back(tmp_path):
    ck = Checkpointer(tmp_path, keep=5)
    for v in (1, 2, 3):
        ck.save(v, state(v))
    ck.path(3).write_bytes(b"")
    ck.path(2).write_bytes(b"PK\x03\x04 not a checkpoint at all")
    version, loaded = ck.load_latest()
    assert version == 1
    assert_state_equal(loaded, state(1))


@pytest.mark.parametrize("damage", ["truncate", "unloadable"])
def test_all_files_corrupt_raises_naming_the_directory(tmp_path, damage):
    directory = tmp_path / "student-x"
    ck = Checkpointer(directory, keep=3)
    for v in (1, 2):
        ck.save(v, state(v))
    for v in (1, 2):
        if damage == "truncate":
            ck.path(v).write_bytes(ck.path(v).read_bytes()[:-3])
        else:  # a valid frame around a payload torch cannot load: its error names no path
            payload = b"not a torch pickle"
            ck.path(v).write_bytes(MAGIC + hashlib.sha256(payload).digest() + payload)
    with pytest.raises(CheckpointError) as info:
        ck.load_latest()
    message = str(info.value)
    assert str(directory) in message
    assert ck.path(1).name in message and ck.path(2).name in message


def test_empty_or_missing_directory_gives_none(tmp_path):
    assert Checkpointer(tmp_path / "does-not-exist").load_latest() is None
    (tmp_path / "empty").mkdir()
    assert Checkpointer(tmp_path / "empty").load_latest() is None


def test_no_temp_file_remains_after_save(tmp_path):
    ck = Checkpointer(tmp_path, keep=2)
    for v in range(1, 5):
        ck.save(v, state(v))
        names = sorted(p.name for p in tmp_path.iterdir())
        assert not [n for n in names if n.endswith(".tmp") or n.startswith(".")], names
    assert sorted(p.name for p in tmp_path.iterdir()) == [ck.path(3).name, ck.path(4).name]


def test_failed_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    ck = Checkpointer(tmp_path, keep=1)
    ck.save(1, state(1))

    def broken_replace(src, dst):
        raise OSError("disk on fire")

    monkeypatch.setattr(files_mod.os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk on fire"):
        ck.save(2, state(2))
    monkeypatch.undo()
    assert ck.versions() == [1]  # not pruned, no half-written version 2
    version, loaded = ck.load_latest()
    assert version == 1
    assert_state_equal(loaded, state(1))


def test_atomic_write_replaces_the_file(tmp_path, monkeypatch):
    target = tmp_path / "LATEST"
    atomic_write(target, b"1\n")
    assert target.read_bytes() == b"1\n"

    replaced: list[tuple[str, str]] = []
    real_replace = os.replace

    def spy(src, dst):
        # the new content is complete in the temp file before the rename, and the old one is intact
        assert open(src, "rb").read() == b"22\n"
        assert open(dst, "rb").read() == b"1\n"
        replaced.append((os.fspath(src), os.fspath(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(files_mod.os, "replace", spy)
    atomic_write(target, b"22\n")
    assert target.read_bytes() == b"22\n"
    assert len(replaced) == 1
    src, dst = replaced[0]
    assert dst == os.fspath(target)
    assert os.path.dirname(src) == os.fspath(tmp_path)  # same directory: rename is atomic
    assert not os.path.exists(src)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["LATEST"]


def test_atomic_write_failure_leaves_the_old_content(tmp_path, monkeypatch):
    target = tmp_path / "LATEST"
    atomic_write(target, b"old\n")

    def broken_fsync(fd):
        raise OSError("io error")

    monkeypatch.setattr(files_mod.os, "fsync", broken_fsync)
    with pytest.raises(OSError):
        atomic_write(target, b"new\n")
    monkeypatch.undo()
    assert target.read_bytes() == b"old\n"


def test_atomic_write_is_still_importable_from_checkpoint():
    assert ckpt_mod.atomic_write is atomic_write
