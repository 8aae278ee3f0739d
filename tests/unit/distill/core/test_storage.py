"""Storage: one interface over a directory and an fsspec URL (the object-store side is tested
against a real S3 server in tests/integration/distill/core/test_model_store_s3.py)."""

from __future__ import annotations

import pytest

from distill.core.exceptions import CheckpointError
from distill.core.storage import Storage, StorageError


@pytest.mark.parametrize("as_url", [False, True], ids=["directory", "file-url"])
def test_write_read_list_size_and_remove(tmp_path, as_url):
    store = Storage(tmp_path.as_uri() if as_url else tmp_path)
    assert store.local and store.names() == [] and store.size() == 0
    store.write("a/1/model.pt", b"12345")
    store.write("a/LATEST", b"1\n")
    store.write("a/LATEST", b"2\n")  # replaced whole
    assert store.read("a/LATEST") == b"2\n" and store.exists("a/1/model.pt")
    assert store.names("a") == ["1", "LATEST"] and store.names("missing") == []
    assert store.size("a") == 7 and store.size("a/1/model.pt") == 5
    assert not list(tmp_path.rglob("*.tmp"))  # atomic writes leave no temp file
    assert store.url("a/LATEST") == (tmp_path / "a" / "LATEST").as_uri()
    child = store.child("a")
    assert child.read("LATEST") == b"2\n" and child.local_path() == tmp_path / "a"
    store.remove("a/1")
    store.remove("a/nothing")  # not there: nothing to do
    assert store.names("a") == ["LATEST"]
    with pytest.raises(FileNotFoundError):
        store.read("a/1/model.pt")


def test_bad_locations_and_unwritable_places_are_clear_errors(tmp_path):
    with pytest.raises(CheckpointError, match="empty store location"):
        Storage("")
    with pytest.raises(CheckpointError, match="fsspec driver"):
        Storage("nosuchscheme://bucket/prefix")
    (tmp_path / "file").write_bytes(b"")
    blocked = Storage(tmp_path / "file" / "below")
    with pytest.raises(StorageError, match="cannot write .*make the store writable") as failed:
        blocked.write("x", b"1")
    assert isinstance(failed.value, OSError) and isinstance(failed.value, CheckpointError)
