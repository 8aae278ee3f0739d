"""The wire codec against a plain copy of the same bytes.

A 256-example ExampleBatch of the default synthetic layout (``Config()``'s features and tasks,
with the truth column) is encoded and decoded over and over; beside it, in the same rounds, the
encoded message is merely copied. The ratio says how close the codec comes to the cost of
touching the bytes at all: dense columns travel as packed arrays, so the codec should be a small
constant factor away from a copy, not a per-example Python loop away.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import numpy as np

from distill.core.config import Config
from distill.core.wire import Codec, ExampleBatch

BATCH = 256
ROUNDS = 7
ROUND_SECONDS = 0.25  # per measured function and round; the whole module takes about 10 s


def synthetic_batch(n: int = BATCH, seed: int = 0) -> ExampleBatch:
    cfg = Config()
    cats, dense = cfg.features.categorical_names, list(cfg.features.dense)
    tasks = [t.name for t in cfg.tasks]
    rng = np.random.default_rng(seed)
    truth = rng.random((n, len(tasks)), dtype=np.float32)
    return ExampleBatch(
        batch_id=f"bench-{seed}",
        producer_id="bench",
        seq=seed,
        event_time_ms=1_700_000_000_000 + np.arange(n, dtype=np.int64) * 7,
        example_ids=np.arange(n, dtype=np.int64) + seed * n,
        categorical_names=list(cats),
        categorical=np.stack([rng.integers(0, c.buckets * 10, n) for c in cfg.features.categorical], axis=1).astype(
            np.int64
        ),
        dense_names=dense,
        dense=rng.standard_normal((n, len(dense)), dtype=np.float32),
        task_names=tasks,
        labels=(rng.random((n, len(tasks)), dtype=np.float32) < truth).astype(np.float32),
        truth=truth,
    )


def calls_per_second(fn: Callable[[], object], seconds: float) -> float:
    calls, start = 0, time.perf_counter()
    while True:
        for _ in range(8):
            fn()
        calls += 8
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            return calls / elapsed


def run() -> list[dict]:
    codec = Codec()
    batch = synthetic_batch()
    value, headers = codec.encode_examples(batch)
    decoded = codec.decode_examples(value, headers)  # a wrong round trip is a failed benchmark
    np.testing.assert_array_equal(decoded.dense, batch.dense)
    np.testing.assert_array_equal(decoded.categorical, batch.categorical)

    def codec_both() -> None:
        v, h = codec.encode_examples(batch)
        codec.decode_examples(v, h)

    def encode() -> None:
        codec.encode_examples(batch)

    def decode() -> None:
        codec.decode_examples(value, headers)

    def copy_bytes() -> None:
        bytes(bytearray(value))

    def copy_numpy() -> None:
        np.frombuffer(value, dtype=np.uint8).copy()

    def copy_both() -> None:
        copy_bytes()
        copy_numpy()

    fns = {
        "both": codec_both,
        "copy_both": copy_both,
        "encode": encode,
        "copy_bytes": copy_bytes,
        "decode": decode,
        "copy_numpy": copy_numpy,
    }
    measured: dict[str, list[float]] = {name: [] for name in fns}
    for fn in fns.values():  # warm up
        calls_per_second(fn, 0.02)
    # Interleaved rounds: each codec figure and its baseline are measured back to back, so a
    # frequency change or a noisy neighbour affects both; ratios are taken per round.
    for _ in range(ROUNDS):
        for name, fn in fns.items():
            measured[name].append(calls_per_second(fn, ROUND_SECONDS))

    def median_rate(name: str) -> float:
        return statistics.median(measured[name]) * BATCH

    def median_ratio(a: str, b: str) -> float:
        return statistics.median(x / y for x, y in zip(measured[a], measured[b], strict=True))

    raw_bytes = sum(
        getattr(batch, c).nbytes for c in ("event_time_ms", "example_ids", "categorical", "dense", "labels", "truth")
    )
    layout = (
        f"{len(batch.categorical_names)} categorical, {len(batch.dense_names)} dense, "
        f"{len(batch.task_names)} tasks + truth"
    )
    return [
        {
            "name": f"encode+decode, {BATCH}-example batches",
            "value": median_rate("both"),
            "unit": "examples/s",
            "ratio": median_ratio("both", "copy_both"),
            "vs": "plain copy of the same message: bytes(bytearray(msg)) + numpy copy",
        },
        {
            "name": "encode",
            "value": median_rate("encode"),
            "unit": "examples/s",
            "ratio": median_ratio("encode", "copy_bytes"),
            "vs": "bytes(bytearray(msg))",
        },
        {
            "name": "decode (numpy.frombuffer views)",
            "value": median_rate("decode"),
            "unit": "examples/s",
            "ratio": median_ratio("decode", "copy_numpy"),
            "vs": "numpy copy of msg",
        },
        {"name": "plain copy (baseline of encode+decode)", "value": median_rate("copy_both"), "unit": "examples/s"},
        {
            "name": f"message size ({layout})",
            "value": len(value) / BATCH,
            "unit": "bytes/example",
            "ratio": len(value) / raw_bytes,
            "vs": "packed column bytes alone",
        },
    ]
