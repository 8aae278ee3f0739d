"""The model store and the students' export root on S3 (moto's server on a loopback port):
the same guarantees as a directory - whole files only, checksums, a clear error when the
bucket refuses writes."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

from distill.core.config import CategoricalFeature, ExportConfig, FeaturesConfig, ModelConfig, TaskConfig
from distill.core.exceptions import CheckpointError
from distill.core.model_store import ModelStore
from distill.core.storage import Storage, StorageError
from distill.learn.export import export_serving_model, load_serving_model
from distill.learn.models import RankingModel
from distill.learn.repository import ModelRepository
from tests.integration.s3 import client, make_bucket, moto_s3


@pytest.fixture
def s3(monkeypatch):
    with moto_s3(monkeypatch) as endpoint:
        yield endpoint


def weights(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(40, 30, generator=g), "b": torch.randn(30, generator=g)}


def test_publish_list_load_and_prune_on_s3(s3):
    url = make_bucket(s3, "teacher-store") + "/pool/a"
    trainer_side = ModelStore(url)
    assert trainer_side.versions() == []
    published = {v: trainer_side.publish(v, weights(v)) for v in range(4)}
    uri, sha = published[2]
    assert uri == f"{url}/teacher-000000000002.pt" and len(sha) == 64
    # another process's view of the same bucket: it lists what was published since
    labeler_side = ModelStore(url)
    assert labeler_side.versions() == [0, 1, 2, 3]
    assert torch.equal(labeler_side.load(uri, sha)["w"], weights(2)["w"])
    assert labeler_side.describe(3) == published[3] and labeler_side.describe(9) is None
    trainer_side.publish(4, weights(4))
    assert labeler_side.versions() == [0, 1, 2, 3, 4]  # no stale listing
    assert trainer_side.prune(keep_from=3) == [0, 1, 2]
    assert labeler_side.versions() == [3, 4]
    with pytest.raises(CheckpointError, match="teacher.pool.model_store"):
        labeler_side.load(uri, sha)  # pruned
    keys = {o["Key"] for o in client(s3).list_objects_v2(Bucket="teacher-store")["Contents"]}
    assert keys == {"pool/a/teacher-000000000003.pt", "pool/a/teacher-000000000004.pt"}


def test_a_corrupt_object_fails_its_checksum(s3):
    url = make_bucket(s3, "teacher-store")
    store = ModelStore(url)
    uri, sha = store.publish(1, weights(1))
    body = client(s3).get_object(Bucket="teacher-store", Key="teacher-000000000001.pt")["Body"].read()
    client(s3).put_object(Bucket="teacher-store", Key="teacher-000000000001.pt", Body=body[:-50])
    with pytest.raises(CheckpointError, match="sha256"):
        store.load(uri, sha)


_CRASH_MID_UPLOAD = textwrap.dedent(
    """
    import os, signal, sys
    import fsspec
    fs, root = fsspec.core.url_to_fs(sys.argv[1])
    # What s3fs does for a large file: a multipart upload, completed only after the last part.
    f = fs.open(root + "/teacher-000000000007.pt", "wb", block_size=5 * 2**20)
    f.write(os.urandom(6 * 2**20))
    f.flush()  # the first part is uploaded
    print("part uploaded", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)  # the trainer dies before the upload completes
    """
)


def test_an_upload_interrupted_by_a_crash_is_never_a_version(s3):
    url = make_bucket(s3, "teacher-store") + "/pool"
    store = ModelStore(url)
    store.publish(6, weights(6))
    done = subprocess.run(
        [sys.executable, "-c", _CRASH_MID_UPLOAD, url], capture_output=True, text=True, env=os.environ, timeout=120
    )
    assert done.returncode == -signal.SIGKILL and "part uploaded" in done.stdout, done.stderr[-2000:]
    pending = client(s3).list_multipart_uploads(Bucket="teacher-store").get("Uploads", [])
    assert [u["Key"] for u in pending] == ["pool/teacher-000000000007.pt"]  # it was mid-upload
    parts = client(s3).list_parts(Bucket="teacher-store", Key=pending[0]["Key"], UploadId=pending[0]["UploadId"])
    assert len(parts["Parts"]) == 1
    fresh = ModelStore(url)
    assert fresh.versions() == [6] and fresh.describe(7) is None
    with pytest.raises(CheckpointError, match="not there"):
        fresh.load(f"{url}/teacher-000000000007.pt", "0" * 64)


def test_a_bucket_refusing_writes_is_the_same_error_as_an_unwritable_directory(s3, tmp_path):
    refusing = ModelStore(make_bucket(s3, "read-only-store", refuse_writes=True) + "/pool")
    blocker = tmp_path / "a-file"
    blocker.write_bytes(b"")
    unwritable = ModelStore(blocker / "store")  # a directory that cannot be made
    for store in (refusing, unwritable):
        with pytest.raises(CheckpointError, match="cannot write .*teacher-000000000001.pt.*make the store writable"):
            store.publish(1, weights(1))
        with pytest.raises(OSError):  # what a student catches to hold its commits back
            store.publish(1, weights(1))
        assert store.versions() == []


FEATURES = FeaturesConfig(
    categorical=[CategoricalFeature(name="user", buckets=31), CategoricalFeature(name="item", buckets=17)],
    dense=["a", "b"],
)
TASKS = [TaskConfig(name="click"), TaskConfig(name="watch", type="regression")]
MODEL = ModelConfig(embedding_dim=4, hidden=[8], cross_layers=0, dropout=0.0)


def test_students_export_to_s3_in_the_triton_layout_with_retention(s3):
    root = make_bucket(s3, "serving-models") + "/models"
    torch.manual_seed(0)
    model = RankingModel(FEATURES, TASKS, MODEL).eval()
    for v in range(1, 5):
        state = export_serving_model(model, FEATURES, TASKS, MODEL, f"{root}/aux", v, export=ExportConfig(keep=2))
    assert state.kept == [3, 4] and state.deleted == [2] and state.promoted == 4 and state.bytes > 0
    objects = {o["Key"] for o in client(s3).list_objects_v2(Bucket="serving-models")["Contents"]}
    assert {"models/aux/config.pbtxt", "models/aux/LATEST", "models/aux/PROMOTED"} <= objects
    assert {k.split("/")[2] for k in objects if k.count("/") == 3} == {"3", "4"}
    assert {k.rsplit("/", 1)[1] for k in objects if k.startswith("models/aux/4/")} == {
        "model.pt",
        "model.pt2",
        "signature.json",
        "metrics.json",
        "serving.pt",
    }
    cat, dense = torch.randint(-(2**40), 2**40, (9, 2)), torch.randn(9, 2)
    with torch.no_grad():
        expected = model.to_raw(model(cat, dense)[0])
        torch.testing.assert_close(load_serving_model(f"{root}/aux")(cat, dense), expected)
        body = Storage(f"{root}/aux").read("4/model.pt")
        torch.testing.assert_close(torch.jit.load(io.BytesIO(body))(cat, dense), expected, rtol=0, atol=1e-5)

    # a version whose upload stopped before signature.json (written last) is not a version
    client(s3).put_object(Bucket="serving-models", Key="models/aux/5/model.pt", Body=b"half")
    assert ModelRepository(f"{root}/aux").versions() == [3, 4]

    # the same version again (a retried checkpoint): the new weights replace the old ones
    torch.manual_seed(1)
    retrained = RankingModel(FEATURES, TASKS, MODEL).eval()
    export_serving_model(retrained, FEATURES, TASKS, MODEL, f"{root}/aux", 4, export=ExportConfig(keep=2))
    with torch.no_grad():
        expected = retrained.to_raw(retrained(cat, dense)[0])
        torch.testing.assert_close(load_serving_model(f"{root}/aux")(cat, dense), expected)


def test_an_export_to_a_refusing_bucket_is_an_oserror_the_student_holds_back_on(s3):
    root = make_bucket(s3, "serving-refused", refuse_writes=True)
    model = RankingModel(FEATURES, TASKS, MODEL).eval()
    with pytest.raises(StorageError, match="cannot write") as failed:
        export_serving_model(model, FEATURES, TASKS, MODEL, f"{root}/aux", 1)
    assert isinstance(failed.value, OSError) and isinstance(failed.value, CheckpointError)
    assert ModelRepository(f"{root}/aux").versions() == []


def test_a_bucket_refusing_deletes_keeps_old_versions_but_exports_and_promotes(s3):
    root = make_bucket(s3, "serving-no-delete", refuse_deletes=True)
    model = RankingModel(FEATURES, TASKS, MODEL).eval()
    for v in (1, 2, 3):
        state = export_serving_model(model, FEATURES, TASKS, MODEL, f"{root}/aux", v, export=ExportConfig(keep=1))
    # retention could not delete: the exports went on (commits are not held back for it)
    assert state.exported == state.latest == state.promoted == 3
    assert state.kept == [1, 2, 3] and state.deleted == []
    with pytest.raises(StorageError, match="cannot delete"):
        ModelRepository(f"{root}/aux").prune(keep=1)
