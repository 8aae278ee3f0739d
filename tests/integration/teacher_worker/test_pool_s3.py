"""The teacher pool with its model store in S3 (moto's server on a loopback port) and the
embedded broker: no shared volume between the trainer and the labelers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from distill.core.exceptions import CheckpointError
from distill.core.model_store import ModelStore
from distill.core.wire import Codec
from distill.learn.models import RankingModel, batch_tensors
from teacher_worker.labeler import Labeler
from teacher_worker.ranks import Ranks
from teacher_worker.trainer import Trainer
from tests.integration.s3 import client, make_bucket, moto_s3
from tests.integration.workers import example_batch_ids, produce_synthetic, read_all, read_labels, run_until


@pytest.fixture
def s3(monkeypatch):
    with moto_s3(monkeypatch) as endpoint:
        yield endpoint


def pool_config(make_config, store: str):
    return make_config(
        topics={"partitions": 2},
        teacher={
            "max_batches_per_step": 4,
            "poll_timeout_s": 0.05,
            "model": {"hidden": [16], "embedding_dim": 4, "cross_layers": 0},
            "pool": {
                "model_store": store,
                "publish_every_batches": 4,
                "publish_every_seconds": 60.0,
                "lead_check_seconds": 0.2,
            },
        },
    )


def test_a_labeler_picks_up_the_trainers_checkpoints_from_s3(make_config, s3):
    store_url = make_bucket(s3, "teacher-pool") + "/store"
    config = pool_config(make_config, store_url)
    produced = produce_synthetic(config, 24 * 64, batch_size=64)
    trainer = Trainer(config, Ranks(), torch.device("cpu"))
    trainer.start()
    labeler = Labeler(config)
    labeler.start()  # ready once it loaded version 0 from the bucket
    run_until(
        lambda: labeler.examples_labeled >= produced["examples"] and sum(trainer.trained_through.values()) >= 24,
        [trainer.step, labeler.step],
        timeout=120,
    )
    labeler.close()
    trainer.service.stopping.set()
    trainer.step()
    trainer.close()

    codec = Codec()
    messages = read_all(config, config.topics.checkpoints)
    announced = {a.version: a for a in (codec.decode_announcement(m.value(), m.headers()) for m in messages)}
    assert trainer.version >= 4 and sorted(announced) == list(range(trainer.version + 1))
    assert all(a.uri == f"{store_url}/teacher-{v:012d}.pt" for v, a in announced.items())
    keys = {o["Key"] for o in client(s3).list_objects_v2(Bucket="teacher-pool")["Contents"]}
    assert keys == {f"store/teacher-{v:012d}.pt" for v in ModelStore(store_url).versions()}

    labels = read_labels(config)
    assert sorted(lb.batch_id for _, _, lb in labels) == sorted(example_batch_ids(config))
    used = {lb.teacher_version for _, _, lb in labels}
    assert max(used) > 0 and len(used) >= 2  # announced checkpoints were loaded from the bucket
    # a label recomputed from the object the announcement names
    batches = {
        b.batch_id: b
        for b in (codec.decode_examples(m.value(), m.headers()) for m in read_all(config, config.topics.examples))
    }
    store = ModelStore(store_url)
    _, _, lb = max(labels, key=lambda item: item[2].teacher_version)
    a = announced[lb.teacher_version]
    model = RankingModel(config.features, config.tasks, config.teacher.model)
    model.load_state_dict(store.load(a.uri, a.sha256))
    cat, dense, _ = batch_tensors([batches[lb.batch_id]], torch.device("cpu"))
    with torch.no_grad():
        expected = model.to_raw(model.eval()(cat, dense)[0])  # labels are in raw units
    np.testing.assert_allclose(lb.logits, expected.numpy(), rtol=1e-5, atol=1e-6)


def test_a_trainer_whose_bucket_refuses_writes_fails_clearly_and_announces_nothing(make_config, s3):
    store_url = make_bucket(s3, "teacher-refused", refuse_writes=True) + "/store"
    config = pool_config(make_config, store_url)
    trainer = Trainer(config, Ranks(), torch.device("cpu"))
    with pytest.raises(CheckpointError, match=r"cannot write s3://teacher-refused/store/teacher-000000000000\.pt"):
        trainer.start()  # publishing version 0 is the first write
    trainer.close()
    assert read_all(config, config.topics.checkpoints, timeout=3.0, idle=1.0) == []
