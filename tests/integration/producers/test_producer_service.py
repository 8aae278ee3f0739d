"""The producer service against the embedded broker: exactly-once counts, partitioning, order,
pacing, back-pressure, resume from the position file, and a graceful stop."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import REGISTRY

from distill.core.exceptions import ConfigError
from distill.core.presets import preset_overrides
from distill.core.service import Service
from producers import position
from producers.service import ProducerService, producer_settings, run_producer
from producers.sources import Chunk, make_source
from producers.synthetic import SyntheticSource

QUIET = {"handle_signals": False, "serve_http": False}


def metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_synthetic_every_example_once_users_sharded(make_config, read_back):
    cfg = make_config(topics={"partitions": 4}, synthetic={"examples": 20_000})
    pid = cfg.producer.producer_id
    before = metric("distill_producer_examples_total", producer=pid, source="synthetic")
    result = run_producer(cfg, "synthetic", batch_size=500, **QUIET)
    assert result["examples"] == result["accepted"] == 20_000 and result["stopped"] == "end_of_data"
    assert result["partitions"] == 4 and result["position"] == 20_000
    assert metric("distill_producer_examples_total", producer=pid, source="synthetic") - before == 20_000

    out = read_back(cfg, result["batches"])
    assert np.array_equal(np.sort(out.ids), np.arange(20_000))
    ids = [b.batch_id for _, _, b in out.batches]
    assert len(set(ids)) == len(ids) == result["batches"]
    assert sorted(b.seq for _, _, b in out.batches) == list(range(result["batches"]))
    assert all(
        i.startswith(f"{pid}-") and i.endswith(f"-{b.seq}") for i, (_, _, b) in zip(ids, out.batches, strict=True)
    )
    assert all(b.size <= 500 and b.truth is not None for _, _, b in out.batches)
    assert len(out.by_partition()) == 4
    out.assert_time_order_per_partition()
    out.assert_users_stay_on_one_partition()
    # What went over the wire is what the source generates.
    first = min(out.batches, key=lambda x: x[2].example_ids[0])[2]
    expected = Chunk.concat(list(SyntheticSource(cfg.synthetic).chunks()))
    rows = first.example_ids
    assert np.array_equal(first.labels, expected.labels[rows]) and np.array_equal(first.truth, expected.truth[rows])


def test_movielens_full_replay(make_config, read_back):
    pytest.importorskip("producers.movielens")
    cfg = make_config(topics={"partitions": 4}, **preset_overrides("movielens"))
    try:
        source = make_source(cfg, "movielens")
    except Exception as exc:  # the data is an optional install
        pytest.skip(str(exc))
    result = run_producer(cfg, source, batch_size=1000, **QUIET)
    assert result["examples"] == 100_000 and result["stopped"] == "end_of_data"
    out = read_back(cfg, result["batches"])
    ids = out.ids
    assert len(ids) == 100_000 and np.array_equal(np.sort(ids), np.arange(100_000))
    out.assert_time_order_per_partition()
    out.assert_users_stay_on_one_partition()
    _, _, b = out.batches[0]
    assert b.task_names == ["like", "rating"] and len(b.dense_names) == 19 and b.truth is None


def test_round_robin_spreads_batches(make_config, read_back):
    cfg = make_config(topics={"partitions": 3}, synthetic={"examples": 3_000})
    result = run_producer(cfg, "synthetic", partitioner="round_robin", batch_size=100, **QUIET)
    assert result["batches"] == 30
    out = read_back(cfg, 30)
    assert sorted(len(v) for v in out.by_partition().values()) == [10, 10, 10]
    assert np.array_equal(np.sort(out.ids), np.arange(3_000))
    out.assert_time_order_per_partition()
    # Batches are cut in stream order, so each is a run of consecutive positions.
    assert all((np.diff(b.example_ids) == 1).all() for _, _, b in out.batches)


def test_rate_limit_and_linger(make_config, read_back):
    cfg = make_config(topics={"partitions": 1}, synthetic={"examples": 10_000})
    t = time.monotonic()
    result = run_producer(cfg, "synthetic", rate=4000, max_examples=2000, batch_size=10_000, linger_ms=40, **QUIET)
    elapsed = time.monotonic() - t
    assert result["examples"] == 2000 and result["stopped"] == "max_examples"
    assert 0.45 < elapsed < 5.0  # 2000 examples at 4000/s
    out = read_back(cfg, result["batches"])
    sizes = [b.size for _, _, b in out.batches]
    # Batches never fill up: linger cuts them at about 4000/s * 40 ms.
    assert len(sizes) >= 8 and max(sizes) < 1000
    assert np.array_equal(np.sort(out.ids), np.arange(2000))


def test_replay_speedup_follows_event_time(make_config, read_back, tmp_path):
    path = tmp_path / "events.csv"
    rows = "\n".join(f"{i},{1_700_000_000 + i * 0.01:.2f},{i % 5},{i % 2}" for i in range(201))
    path.write_text("id,ts,user,y\n" + rows + "\n")
    cfg = make_config(
        topics={"partitions": 2},
        tasks=[{"name": "y"}],
        features={"categorical": [{"name": "user"}], "dense": []},
        file={
            "path": str(path),
            "example_id": "id",
            "event_time": "ts",
            "user": "user",
            "categorical": ["user"],
            "labels": {"y": "y"},
        },
    )
    t = time.monotonic()
    result = run_producer(cfg, "file", speedup=4, linger_ms=20, **QUIET)  # 2 s of events in 0.5 s
    elapsed = time.monotonic() - t
    assert result["examples"] == 201 and 0.45 < elapsed < 3.0
    out = read_back(cfg, result["batches"])
    assert np.array_equal(np.sort(out.ids), np.arange(201))
    out.assert_users_stay_on_one_partition("user")


def test_backpressure_bounds_the_in_flight_window(make_config, read_back):
    cfg = make_config(topics={"partitions": 2}, synthetic={"examples": 4_000})
    result = run_producer(cfg, "synthetic", batch_size=40, max_in_flight_batches=2, **QUIET)
    assert result["examples"] == 4_000 and 1 <= result["max_in_flight"] <= 2
    out = read_back(cfg, result["batches"])
    assert np.array_equal(np.sort(out.ids), np.arange(4_000))


def test_resume_from_position_file(make_config, read_back, tmp_path):
    cfg = make_config(topics={"partitions": 3}, synthetic={"examples": 6_000})
    pos_file = tmp_path / "positions" / "synthetic.json"
    first = run_producer(cfg, "synthetic", position_file=pos_file, max_examples=2_500, batch_size=256, **QUIET)
    assert first["examples"] == 2_500 and first["stopped"] == "max_examples"
    stored = position.load(pos_file, "synthetic", "x")
    assert stored.delivered.watermark == 2_500 and stored.next_seq == first["batches"]
    second = run_producer(cfg, "synthetic", position_file=pos_file, batch_size=256, **QUIET)
    assert second["examples"] == 3_500 and second["stopped"] == "end_of_data"
    third = run_producer(cfg, "synthetic", position_file=pos_file, **QUIET)
    assert third["examples"] == 0 and third["batches"] == 0  # nothing left to send

    out = read_back(cfg, first["batches"] + second["batches"])
    assert np.array_equal(np.sort(out.ids), np.arange(6_000))  # no gap, no repeat
    seqs = sorted(b.seq for _, _, b in out.batches)
    assert seqs == list(range(len(seqs)))  # batch ids continue across runs
    out.assert_time_order_per_partition()
    out.assert_users_stay_on_one_partition()


def test_resume_skips_positions_acknowledged_out_of_order(make_config, read_back, tmp_path):
    """A crash leaves a watermark plus scattered deliveries above it; none is sent again."""
    cfg = make_config(topics={"partitions": 2}, synthetic={"examples": 3_000})
    done = np.concatenate([np.arange(0, 1_000), np.arange(1_200, 1_900, 3), [2_999]])
    stored = position.Position("synthetic", "old")
    stored.delivered.add(done)
    stored.next_seq = 40
    pos_file = tmp_path / "synthetic.json"
    position.save(pos_file, stored)
    result = run_producer(cfg, "synthetic", position_file=pos_file, batch_size=300, **QUIET)
    assert result["skipped"] == len(done) - 1_000
    out = read_back(cfg, result["batches"])
    ids = out.ids
    assert len(np.intersect1d(ids, done)) == 0 and len(ids) == len(set(ids.tolist()))
    assert np.array_equal(np.sort(np.concatenate([ids, done])), np.arange(3_000))
    assert min(b.seq for _, _, b in out.batches) == 40
    assert position.load(pos_file, "synthetic", "x").delivered.watermark == 3_000


def test_stop_flushes_everything_accepted_and_serves_metrics(make_config, read_back, tmp_path):
    cfg = make_config(topics={"partitions": 2}, synthetic={"examples": 1_000_000})
    pcfg = producer_settings(cfg, rate=5_000, batch_size=10_000, linger_ms=5_000, position_file=tmp_path / "p.json")
    service = Service("producer", pcfg.producer_id, port=0, host="127.0.0.1")
    port = service.start_http()
    worker = ProducerService(cfg, SyntheticSource(cfg.synthetic), producer=pcfg, service=service)
    results: list[dict] = []
    thread = threading.Thread(target=lambda: results.append(worker.run()))
    thread.start()
    try:
        # Ready once transactions are initialised and the position is recovered (a few 100 ms).
        deadline = time.monotonic() + 10
        while not service.ready()[0] and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5) as r:
            assert json.load(r)["ok"] is True
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            page = r.read().decode()
        assert f'distill_producer_in_flight_batches{{producer="{pcfg.producer_id}"}}' in page
        # linger 5 s and batches of 10k: everything accepted so far still sits in the buffers.
        assert worker.counts["examples"] == 0 and worker.counts["accepted"] > 1_000
    finally:
        service.stopping.set()
        thread.join(30)
    result = results[0]
    assert result["stopped"] == "signal" and result["examples"] == result["accepted"] > 1_000
    labels = {"producer": pcfg.producer_id, "source": "synthetic"}
    assert metric("distill_producer_examples_total", **labels) == result["examples"]
    assert metric("distill_producer_batches_total", **labels) == result["batches"]
    out = read_back(cfg, result["batches"])
    assert np.array_equal(np.sort(out.ids), np.arange(result["accepted"]))
    assert position.load(tmp_path / "p.json", "synthetic", "x").delivered.watermark == result["accepted"]
    with pytest.raises(OSError):  # the HTTP server is down after the stop
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2)


def test_sigterm_on_the_command_line(make_config, read_back, tmp_path):
    cfg = make_config(topics={"partitions": 2})
    pos_file = tmp_path / "p.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith("DISTILL_")} | {
        "DISTILL_KAFKA__BOOTSTRAP_SERVERS": cfg.kafka.bootstrap_servers,
        "DISTILL_TOPICS__EXAMPLES": cfg.topics.examples,
        "DISTILL_TOPICS__LABELS": cfg.topics.labels,
        "DISTILL_TOPICS__PARTITIONS": "2",
        "DISTILL_PRODUCER__PRODUCER_ID": cfg.producer.producer_id,
    }
    args = "synthetic --rate 3000 --linger-ms 1000 --batch-size 100000 --metrics-port 0".split()
    log = tmp_path / "producer.log"  # a file, not a pipe: a full pipe would block the producer
    with open(log, "w") as stderr_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "producers", *args, "--position-file", str(pos_file)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=stderr_file,
            text=True,
            cwd=Path(__file__).parents[3],
        )
        try:
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline and not pos_file.exists() and proc.poll() is None:
                time.sleep(0.1)  # the first linger flush writes the position file
            assert pos_file.exists(), log.read_text()
            time.sleep(0.3)
            proc.send_signal(signal.SIGTERM)
            stdout, _ = proc.communicate(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
    stderr = log.read_text()
    assert proc.returncode == 0, stderr
    result = json.loads(stdout.strip().splitlines()[-1])
    assert result["stopped"] == "signal" and result["examples"] == result["accepted"] > 0
    out = read_back(cfg, result["batches"])
    assert np.array_equal(np.sort(out.ids), np.arange(result["accepted"]))
    assert position.load(pos_file, "synthetic", "x").delivered.watermark == result["accepted"]


def test_batch_ids_differ_between_runs(make_config, read_back):
    """Readers de-duplicate by batch id: a second run of the same producer must not reuse ids."""
    cfg = make_config(topics={"partitions": 1})
    first = run_producer(cfg, "synthetic", batch_size=100, max_examples=300, **QUIET)
    second = run_producer(cfg, "synthetic", batch_size=100, max_examples=300, **QUIET)
    out = read_back(cfg, first["batches"] + second["batches"])
    ids = [b.batch_id for _, _, b in out.batches]
    assert len(ids) == len(set(ids)) == 6


class StopAtTheEnd(SyntheticSource):
    """The synthetic stream, asking for a stop the moment its last chunk has been taken: the
    stop lands while the run closes at the end of the data."""

    def __init__(self, config, stop: threading.Event):
        super().__init__(config)
        self.stop = stop

    def chunks(self, *args, **kwargs):
        yield from super().chunks(*args, **kwargs)
        self.stop.set()


def test_a_stop_asked_for_as_the_data_ends_is_reported(make_config):
    """``distill produce --hold`` waits for a SIGTERM after the data ends; one that came while
    the run was closing must count (it was lost, and the process held on until killed)."""
    cfg = make_config(topics={"partitions": 2}, synthetic={"examples": 3_000})
    stop = threading.Event()
    result = run_producer(cfg, StopAtTheEnd(cfg.synthetic, stop), stop=stop, **QUIET)
    assert result["stopped"] == "end_of_data" and result["examples"] == 3_000
    assert result["stop_requested"] is True
    calm = run_producer(make_config(synthetic={"examples": 1_000}), "synthetic", **QUIET)
    assert calm["stopped"] == "end_of_data" and calm["stop_requested"] is False


def test_two_producers_with_one_producer_id_stop_the_older_with_a_clear_error(make_config, tmp_path):
    cfg = make_config(topics={"partitions": 2}, synthetic={"examples": 1_000_000})

    def replay(name: str) -> ProducerService:
        pcfg = producer_settings(cfg, rate=20_000, batch_size=500, position_file=tmp_path / f"{name}.json")
        worker = ProducerService(cfg, SyntheticSource(cfg.synthetic), producer=pcfg, service=Service("producer", name))
        worker.start()
        return worker

    older = replay("older")
    newer = None
    try:
        for _ in range(20):
            older.step()
        newer = replay("newer")  # the same transactional id: the broker fences the older one
        with pytest.raises(ConfigError) as err:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                older.step()
        message = str(err.value)
        assert "unique producer.producer_id" in message and f"producer.{cfg.producer.producer_id}" in message
        assert newer.step()  # the newer one goes on
    finally:
        for worker in (older, newer):
            if worker is not None:
                worker.close()
