"""The trainer's publisher: snapshots on the caller's thread, writes and announcements in order on
its own, errors raised at the next publish."""

from __future__ import annotations

import threading

import pytest
import torch

from distill.core.exceptions import CheckpointError
from distill.core.model_store import ModelStore
from teacher_worker.publisher import WeightsPublisher


def weights(value: float) -> dict[str, torch.Tensor]:
    return {"table.weight": torch.full((50, 4), value), "dense.bias": torch.full((3,), -value)}


def test_each_version_holds_the_weights_of_its_publish_and_announcements_keep_their_order(tmp_path):
    store = ModelStore(tmp_path / "store")
    publisher = WeightsPublisher(store, "teacher")
    announced: list[tuple[int, str, str]] = []
    release = threading.Event()

    def announce(version: int):
        def send(uri: str, sha: str) -> None:
            release.wait(10)  # the first writes are held: later publishes must not touch their snapshots
            announced.append((version, uri, sha))

        return send

    live = weights(1.0)
    publisher.publish(1, live, announce(1))
    with torch.no_grad():
        for tensor in live.values():
            tensor.add_(1.0)  # the optimizer moves on in place right after the publish
    expected = {1: weights(1.0), 2: {k: v.clone() for k, v in live.items()}, 3: weights(3.0)}
    publisher.publish(2, live, announce(2))
    assert publisher.announced == -1  # nothing out yet: both are held

    third = threading.Thread(target=lambda: publisher.publish(3, weights(3.0), announce(3)))
    third.start()
    third.join(0.5)
    assert third.is_alive()  # both snapshots are being written: the third publish waits for one
    release.set()
    third.join(10)
    publisher.close()

    assert [v for v, _, _ in announced] == [1, 2, 3] and publisher.announced == 3
    for version, uri, sha in announced:
        loaded, want = store.load(uri, sha), expected[version]
        assert loaded.keys() == want.keys() and all(torch.equal(loaded[k], want[k]) for k in want)


def test_a_failed_write_is_raised_at_the_next_publish_and_nothing_is_announced(tmp_path):
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("a file where the store's directory should be")
    publisher = WeightsPublisher(ModelStore(blocker / "store"), "teacher")
    announced: list[int] = []
    publisher.publish(1, weights(1.0), lambda uri, sha: announced.append(1))
    publisher.thread.submit(lambda: None).result()  # the first write has failed by now
    with pytest.raises(CheckpointError, match="cannot write"):
        publisher.publish(2, weights(2.0), lambda uri, sha: announced.append(2))
    publisher.publish(3, weights(3.0), lambda uri, sha: announced.append(3))  # an error is raised once
    with pytest.raises(CheckpointError, match="cannot write"):
        publisher.close()
    assert announced == []
