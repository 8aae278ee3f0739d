"""The pool's labels stay fresh: a labeler never labels with a checkpoint more than
``max_label_staleness_examples`` behind the batch while a fresher one can still come; it waits,
and the trainer publishes early for it."""

from __future__ import annotations

import torch

from distill.core import metrics as m
from teacher_worker.labeler import Labeler
from teacher_worker.ranks import Ranks
from teacher_worker.trainer import Trainer
from tests.integration.workers import example_batch_ids, produce_synthetic, read_labels, run_until

BATCH = 64
BOUND = 4 * BATCH  # examples


def test_labelers_ahead_of_a_slow_trainer_wait_for_a_fresh_checkpoint(make_config):
    config = make_config(
        topics={"partitions": 2},
        teacher={
            "max_batches_per_step": 4,
            "poll_timeout_s": 0.05,
            "model": {"hidden": [16], "embedding_dim": 4, "cross_layers": 0},
            # Only the labelers' need makes the trainer publish here.
            "pool": {
                "publish_every_batches": 10_000,
                "publish_every_seconds": 600.0,
                "lead_check_seconds": 0.1,
                "max_label_staleness_examples": BOUND,
            },
        },
    )
    produced = produce_synthetic(config, 40 * BATCH, batch_size=BATCH)
    trainer = Trainer(config, Ranks(), torch.device("cpu"))
    trainer.start()  # announces version 0: trained on nothing
    labeler = Labeler(config)
    labeler.start()
    waits = m.TEACHER_STALE_WAITS.labels(labeler.name)
    waited_before = waits._value.get()

    # The trainer does not step: on each partition only the first batches are close enough to
    # version 0, the labeler labels those and then waits.
    run_until(lambda: waits._value.get() > waited_before, [labeler.step], timeout=60)
    for _ in range(20):
        labeler.step()
    early = read_labels(config)
    assert early and labeler.examples_labeled == sum(lb.size for _, _, lb in early) < produced["examples"] // 2
    assert all(lb.teacher_version == 0 and lb.source_offset * lb.size <= BOUND for _, _, lb in early)
    labeler.service.heartbeat()  # as its loop would; the steps here are called directly
    assert labeler.service.ready() == (True, "waiting for a fresh enough checkpoint from the trainer")

    run_until(
        lambda: labeler.examples_labeled == trainer.examples_trained == produced["examples"],
        [trainer.step, labeler.step],
        timeout=120,
    )
    assert trainer.version >= 3  # published early, for the waiting labeler
    for worker in (trainer, labeler):
        worker.close()

    labels = read_labels(config)
    assert sorted(lb.batch_id for _, _, lb in labels) == sorted(example_batch_ids(config))  # each batch once
    for _, _, lb in labels:
        assert 0 <= (lb.source_offset - lb.watermark) * lb.size <= BOUND  # out-of-sample and fresh
    assert m.TEACHER_STALE_LABELS.labels(labeler.name)._value.get() == 0
