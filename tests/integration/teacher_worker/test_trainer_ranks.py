"""The trainer data-parallel: two CPU ranks under torchrun (gloo) against the embedded broker."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import torch

from distill.learn.models import RankingModel
from teacher_worker.trainer import weights_digest
from tests.integration.teacher_worker.test_pool import announcements
from tests.integration.workers import example_batch_ids, produce_synthetic, write_config


def test_two_gloo_ranks_train_their_partitions_and_keep_identical_weights(make_config, tmp_path):
    config = make_config(
        topics={"partitions": 4},
        teacher={
            "device": "cpu",
            "poll_timeout_s": 0.05,
            "model": {"hidden": [32], "embedding_dim": 8, "cross_layers": 0},
            "pool": {"publish_every_batches": 10, "publish_every_seconds": 1.0, "backend": "gloo"},
        },
    )
    produced = produce_synthetic(config, 50 * 128, batch_size=128)
    path = write_config(config, tmp_path / "trainer.yaml")
    log = open(tmp_path / "torchrun.log", "ab")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    proc = subprocess.Popen(
        [*launcher, "-m", "distill", "teacher", "--config", str(path), "--role", "trainer"],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
    )
    try:
        deadline = time.monotonic() + 120
        latest = None
        while time.monotonic() < deadline and proc.poll() is None:
            found = announcements(config)
            latest = found[-1] if found else None
            if latest is not None and latest.examples_trained >= produced["examples"]:
                break
            time.sleep(1.0)
        assert proc.poll() is None, (tmp_path / "torchrun.log").read_text()[-3000:]
        assert latest is not None and latest.examples_trained == produced["examples"]
        # torchrun passes SIGTERM to both ranks (they stop together at the next step) and then
        # exits non-zero itself, whatever the ranks did: their summaries show a graceful stop.
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)

    summaries = [config.progress_dir() / f"teacher-teacher.rank{r}.summary.json" for r in (0, 1)]
    assert all(s.exists() for s in summaries), (tmp_path / "torchrun.log").read_text()[-3000:]
    ranks = [json.loads(s.read_text()) for s in summaries]
    assert [r["partitions"] for r in ranks] == [[0, 2], [1, 3]]  # a fixed share each
    assert all(r["world_size"] == 2 and r["examples_trained"] > 0 for r in ranks)
    assert sum(r["examples_trained"] for r in ranks) == produced["examples"]
    # Gradients were all-reduced: the same weights on both ranks, and not the initial ones.
    assert ranks[0]["weights_sha256"] == ranks[1]["weights_sha256"]
    torch.manual_seed(config.teacher.model.seed)
    initial = RankingModel(config.features, config.tasks, config.teacher.model)
    assert ranks[0]["weights_sha256"] != weights_digest(initial)
    # The announced watermark covers both ranks' partitions: every batch was trained through.
    last = {}
    for partition, offset in example_batch_ids(config).values():
        last[partition] = max(last.get(partition, -1), offset)
    assert latest.world_size == 2
    assert latest.watermark == {p: o + 1 for p, o in last.items()}
