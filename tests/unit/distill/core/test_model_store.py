"""The model store: atomic, checksummed weight files that labelers can find from an announced URI."""

from __future__ import annotations

import pytest
import torch

from distill.core.exceptions import CheckpointError
from distill.core.model_store import ModelStore


def weights(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(4, 3, generator=g), "b": torch.randn(3, generator=g)}


def test_publish_and_load_round_trip(tmp_path):
    store = ModelStore(tmp_path / "store")
    uri, sha = store.publish(3, weights(1))
    assert uri.startswith("file://") and uri.endswith("teacher-000000000003.pt") and len(sha) == 64
    loaded = store.load(uri, sha)
    assert loaded.keys() == {"w", "b"} and torch.equal(loaded["w"], weights(1)["w"])
    assert store.describe(3) == (uri, sha) and store.describe(4) is None
    assert store.versions() == [3]


def test_checksum_mismatch_is_refused(tmp_path):
    store = ModelStore(tmp_path)
    uri, sha = store.publish(1, weights(1))
    raw = bytearray(store.path(1).read_bytes())
    raw[-5] ^= 0xFF
    store.path(1).write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="sha256"):
        store.load(uri, sha)


def test_a_store_mounted_elsewhere_is_found_by_file_name(tmp_path):
    uri, sha = ModelStore(tmp_path / "trainer-mount").publish(2, weights(2))
    (tmp_path / "trainer-mount").rename(tmp_path / "labeler-mount")
    here = ModelStore(tmp_path / "labeler-mount")
    assert torch.equal(here.load(uri, sha)["b"], weights(2)["b"])
    with pytest.raises(CheckpointError, match="teacher.pool.model_store"):
        ModelStore(tmp_path / "elsewhere").load(uri, sha)
    # an announced URL of another scheme is looked up by file name in this store too
    assert torch.equal(here.load("s3://bucket/prefix/teacher-000000000002.pt", sha)["b"], weights(2)["b"])
    with pytest.raises(CheckpointError, match="teacher.pool.model_store"):
        here.load("s3://bucket/prefix/teacher-000000000009.pt", sha)
    with pytest.raises(CheckpointError, match="teacher-<version>.pt"):
        here.load("s3://bucket/prefix/weights.bin", sha)


def test_prune_keeps_what_labelers_may_need_and_the_newest(tmp_path):
    store = ModelStore(tmp_path)
    for v in range(6):
        store.publish(v, weights(v))
    assert store.prune(keep_from=3) == [0, 1, 2]
    assert store.versions() == [3, 4, 5]
    assert store.prune(keep_from=10) == [3]  # the newest two always stay
    assert store.versions() == [4, 5]


def test_a_file_url_is_the_same_store_as_its_directory(tmp_path):
    by_url = ModelStore((tmp_path / "store").as_uri())
    uri, sha = by_url.publish(5, weights(5))
    by_path = ModelStore(tmp_path / "store")
    assert by_path.versions() == [5] and by_path.describe(5) == (uri, sha)
    assert torch.equal(by_path.load(uri, sha)["w"], weights(5)["w"])
    assert by_url.path(5) == by_path.path(5) == tmp_path / "store" / "teacher-000000000005.pt"
