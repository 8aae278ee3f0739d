"""A labeler is ready when it is connected and able to work, whether or not it owns partitions:
with more labelers than partitions (a surge pod at the top of the KEDA range) the one without
a partition must be ready too, or a rollout waits for it forever. Ownership is the metric
distill_teacher_assigned_partitions. Real broker, real HTTP."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request

import torch

from distill.core.service import Service
from teacher_worker.labeler import Labeler
from teacher_worker.ranks import Ranks
from teacher_worker.trainer import Trainer
from tests.integration.workers import produce_synthetic, run_until


def get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def labeler(config, name: str) -> Labeler:
    named = config.model_copy(update={"teacher": config.teacher.model_copy(update={"name": name})})
    service = Service("teacher", name, port=0, host="127.0.0.1")
    service.start_http()
    return Labeler(named, service=service)


def step(w: Labeler) -> bool:
    w.service.heartbeat()  # as Service.run does: /readyz fails on a step older than busy_ready_s
    return w.step()


def test_a_labeler_without_partitions_is_ready_and_says_so_in_a_metric(make_config):
    config = make_config(
        topics={"partitions": 1},
        teacher={
            "max_batches_per_step": 4,
            "poll_timeout_s": 0.05,
            "model": {"hidden": [16], "embedding_dim": 4, "cross_layers": 0},
        },
    )
    produce_synthetic(config, 8 * 64, batch_size=64)
    trainer = Trainer(config, Ranks(), torch.device("cpu"))
    trainer.start()  # announces version 0, which the labelers wait for
    first, second = labeler(config, "labeler-a"), labeler(config, "labeler-b")
    workers = [first, second]
    try:
        for w in workers:
            w.start()
        # Both joined the group; its one partition went to one of them.
        run_until(
            lambda: all(w.consumer.memberid() for w in workers) and len(first.assigned) + len(second.assigned) == 1,
            [lambda: step(first), lambda: step(second)],
            timeout=60,
        )
        owner, idle = (first, second) if first.assigned else (second, first)
        deadline = time.monotonic() + 1.0  # idle steps (the broker probe) must keep it ready
        while time.monotonic() < deadline:
            step(first)
            step(second)
        assert idle.assigned == set() and owner.assigned == {0}

        for w in workers:
            code, body = get(w.service.port, "/readyz")
            assert code == 200, f"{w.name} ({len(w.assigned)} partitions) not ready: {body}"
            assert json.loads(body)["ok"] is True
        _, metrics = get(owner.service.port, "/metrics")
        assert f'distill_teacher_assigned_partitions{{teacher="{owner.name}"}} 1.0' in metrics
        assert f'distill_teacher_assigned_partitions{{teacher="{idle.name}"}} 0.0' in metrics
        assert f'distill_ready{{role="teacher",worker="{idle.name}"}} 1.0' in metrics

        # The owner leaves: the partition moves to the idle one, and the gauge follows it.
        owner.close()
        workers.remove(owner)
        run_until(lambda: idle.assigned == {0}, [lambda: step(idle)], timeout=60)
        _, metrics = get(idle.service.port, "/metrics")
        assert f'distill_teacher_assigned_partitions{{teacher="{idle.name}"}} 1.0' in metrics
        assert f'distill_teacher_assigned_partitions{{teacher="{owner.name}"}} 0.0' in metrics
        assert get(idle.service.port, "/readyz")[0] == 200
    finally:
        for w in workers:
            w.close()
        for w in (first, second):
            w.service.shutdown_http()
        trainer.service.stopping.set()
        trainer.step()
        trainer.close()
