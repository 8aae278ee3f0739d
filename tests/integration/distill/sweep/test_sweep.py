"""distill sweep against the embedded broker: the ranking, the budget, the window, and that the
live pipeline's consumer groups are left exactly as they were."""

from __future__ import annotations

import json
import time

import pytest
import yaml
from confluent_kafka import ConsumerGroupTopicPartitions, TopicPartition
from typer.testing import CliRunner

from distill.cli import app
from distill.core.config import load_config, read_file
from distill.core.kafka import Clients
from distill.sweep.replay import Window, read_window
from distill.sweep.run import run_sweep
from producers.service import run_producer

# Hashing 300 users and 200 items into 2003 rows instead of 20011 changes no collision that
# matters and makes every model's embedding update ten times cheaper.
SMALL_TABLES = {
    "categorical": [
        {"name": "user_id", "buckets": 2003},
        {"name": "item_id", "buckets": 2003},
        {"name": "item_group", "buckets": 101},
    ]
}

TINY_AND_LARGE = """
[[candidates]]
name = "tiny"
model = { hidden = [8], embedding_dim = 2, cross_layers = 0 }

[[candidates]]
name = "large"  # the default teacher model, as it is
"""


def _produce(config, examples: int, **overrides) -> dict:
    return run_producer(config, "synthetic", handle_signals=False, serve_http=False, max_examples=examples, **overrides)


def _committed(config, group: str) -> dict[int, int]:
    admin = Clients(config.kafka, "test-admin").admin()
    futures = admin.list_consumer_group_offsets([ConsumerGroupTopicPartitions(group)])
    parts = futures[group].result().topic_partitions or []
    return {tp.partition: tp.offset for tp in parts if tp.offset >= 0}


def test_sweep_ranks_the_larger_teacher_first_and_leaves_live_groups_alone(make_config, tmp_path, one_thread):
    """A cold-started teacher pays off for its students only once it is well ahead of them:
    on this stream the default teacher's labels *hurt* an aux student for the first ~80k
    examples (the sweep starts every candidate cold) and help after ~100k. So the
    window is 160k examples and the first half is the warm-up.

    The stream is deterministic: one partition, full 256-example batches (a long linger) and
    one torch thread; synthetic seed 7 is the project's reference drift scenario. The proxy's
    gain over `none` on examples 80k-160k (large / tiny, click log loss), measured the same
    way in memory for seeds 1-8: 1: +0.0003/+0.0020, 2: +0.0019/+0.0008, 3: +0.0100/+0.0028,
    4: -0.0018/+0.0002, 5: +0.0028/-0.0014, 6: +0.0037/-0.0014, 7: +0.0088/+0.0032,
    8: +0.0056/-0.0014. So at this length the larger teacher is truly better for its students
    in 6 seeds of 8, by 0.0057 at seed 7; the test asks for half of that margin: it guards the
    sweep's learning path (a broken teacher, proxy or order loses it), not a lucky draw.
    """
    config = make_config(topics={"partitions": 1}, features=SMALL_TABLES, synthetic={"seed": 7, "examples": 160_000})
    produced = _produce(config, 160_000, linger_ms=60_000)
    assert produced["examples"] == 160_000
    live = config.teacher.group_id
    consumer = Clients(config.kafka, "fake-live").consumer(live)
    consumer.commit(offsets=[TopicPartition(config.topics.examples, 0, 123)], asynchronous=False)
    consumer.close()
    before = _committed(config, live)
    assert before == {0: 123}

    candidates = tmp_path / "candidates.toml"
    candidates.write_text(TINY_AND_LARGE)
    started = time.monotonic()
    report = run_sweep(config, candidates, Window(), warmup=0.5, output=tmp_path / "out", run_id="it", device="cpu")
    seconds = time.monotonic() - started

    assert _committed(config, live) == before  # the live group's offsets are untouched
    assert _committed(config, "sweep.it") == {}  # and the sweep's own group committed nothing
    assert report["window"]["batches"] == 625 and report["window"]["examples"] == 160_000
    ranked = {c["name"]: c for c in report["candidates"]}
    large, tiny = ranked["large"], ranked["tiny"]
    assert report["winner"] == "large" and large["rank"] == 1, report["candidates"]
    assert large["proxy"]["gain"] > 0
    assert large["proxy"]["gain"] - tiny["proxy"]["gain"] >= 0.0028, (large["proxy"], tiny["proxy"])
    # The large teacher is also the better model itself, and the costlier one.
    logloss = {n: c["teacher"]["metrics"]["click"]["logloss"] for n, c in ranked.items()}
    assert logloss["large"] < logloss["tiny"]
    assert large["teacher"]["flops_per_example"] > 100 * tiny["teacher"]["flops_per_example"]
    assert large["gain_per_gflop"] == pytest.approx(large["proxy"]["gain"] / large["teacher"]["gflop_per_1k_examples"])
    assert large["examples"] == tiny["examples"] == 160_000  # two candidates: one rung each
    saved = json.loads((tmp_path / "out" / "sweep.json").read_text())
    assert saved["winner"] == "large" and saved["group_id"] == "sweep.it"
    print(
        f"sweep of 160k examples: {seconds:.1f}s; gains large {large['proxy']['gain']:+.5f} "
        f"tiny {tiny['proxy']['gain']:+.5f}"
    )


def test_cli_sweep_respects_the_budget_and_writes_a_loadable_winner(make_config, tmp_path):
    config = make_config(features=SMALL_TABLES, teacher={"model": {"hidden": [32], "embedding_dim": 8}})
    _produce(config, 24_000)
    config_file = tmp_path / "config.yaml"
    config_file.write_text(yaml.safe_dump(config.model_dump(mode="json")))
    candidates = tmp_path / "grid.toml"
    candidates.write_text("[grid]\nhidden = [[8], [16], [32], [64]]\n")
    out = tmp_path / "out"
    result = CliRunner().invoke(
        app,
        [
            "sweep",
            "--config",
            str(config_file),
            "--candidates",
            str(candidates),
            "--budget-examples",
            "40000",
            "--warmup",
            "0.2",
            "--output",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "winner:" in result.output and "gain/GFLOP" in result.output
    report = json.loads((out / "sweep.json").read_text())
    spent = report["budget"]["spent_examples"]
    assert spent <= 40_000 and spent == sum(c["examples"] for c in report["candidates"])
    assert report["plan"]["left_out_examples"] > 0  # 4 x 24k would not fit: the newest part
    reached = sorted(c["rung_reached"] for c in report["candidates"])
    assert reached == [1, 1, 2, 2]  # 4 candidates, 2 rungs: half of them go on
    winner = out / "winner-teacher.toml"
    merged = load_config(config_file, environ={}, **read_file(winner))
    won = next(c for c in report["candidates"] if c["name"] == report["winner"])
    assert merged.teacher.model.hidden == won["model"]["hidden"]
    assert merged.topics == config.topics  # the rest of the config is the base one


def test_window_by_time_and_offsets(make_config):
    config = make_config()
    first = _produce(config, 3_000)
    time.sleep(0.3)
    between = int(time.time() * 1000)
    time.sleep(0.3)
    second = _produce(config, 2_000)
    later = read_window(config, Window(from_ms=between), "sweep.test-time", max_bytes=2**30)
    assert later.examples == second["examples"]
    assert later.skipped["outside_window"] <= 2  # a broker may answer by record batch
    everything = read_window(config, Window(), "sweep.test-all", max_bytes=2**30)
    assert everything.examples == first["examples"] + second["examples"]
    counts = {p: v["batches"] for p, v in everything.partitions.items()}
    some = read_window(config, Window(from_offset={0: 1}, to_offset={0: 3}), "sweep.test-offsets", max_bytes=2**30)
    assert some.partitions[0]["batches"] == 2 and some.partitions[0]["first"] == 1
    assert some.partitions[1]["batches"] == counts[1]
    times = [int(b.event_time_ms.min()) for b in later.batches]
    assert times == sorted(times)  # one event-time order over both partitions
