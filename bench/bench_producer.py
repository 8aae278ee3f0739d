"""The producer service end to end against the codec alone, on the same batches.

The synthetic source is produced to the embedded broker (4 partitions, user partitioner,
acks=all, idempotent) and every delivery is acknowledged; beside it, the same examples, cut into
batches of the same size, are only encoded. The ratio says how much of the codec's speed the
whole path keeps (generation, partitioning, Kafka client, broker round trips). The producer
figure includes the client's start (0.5 to 1 s for the idempotent producer id on this broker),
hence a long enough stream.

The second row is the same stream as an exactly-once replay (a position file): batches go out
in transactions with the replay's position, many batches per transaction.
"""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path

from distill.core.config import load_config
from distill.core.wire import Codec
from distill.local.broker import EmbeddedBroker
from producers.service import run_producer
from producers.sources import Chunk
from producers.synthetic import SyntheticSource

EXAMPLES = 1_500_000
BATCH = 256
PARTITIONS = 4


def encode_rate(source: SyntheticSource, batch_size: int) -> tuple[float, float]:
    """(examples/s of encoding alone, examples/s of generating alone) for the whole stream."""
    codec = Codec()
    t = time.perf_counter()
    stream = Chunk.concat(list(source.chunks(0, 8192)))
    generate_s = time.perf_counter() - t
    batches = []
    for seq, lo in enumerate(range(0, len(stream), batch_size)):
        c = stream.take(slice(lo, lo + batch_size))
        batches.append(c.to_batch(f"bench-{seq}", "bench", seq, source))
    t = time.perf_counter()
    for b in batches:
        codec.encode_examples(b)
    encode_s = time.perf_counter() - t
    return len(stream) / encode_s, len(stream) / generate_s


def run() -> list[dict]:
    logging.getLogger("distill").setLevel(logging.WARNING)
    logging.getLogger("producers").setLevel(logging.WARNING)
    with (
        tempfile.TemporaryDirectory() as tmp,
        EmbeddedBroker(log_file=Path(tmp) / "broker.log") as broker,
    ):
        cfg = load_config(
            None,
            environ={},
            kafka={"bootstrap_servers": broker.bootstrap},
            topics={"partitions": PARTITIONS},
            synthetic={"examples": EXAMPLES},
            producer={"batch_size": BATCH},
        )
        result = run_producer(cfg, "synthetic", handle_signals=False, serve_http=False)
        eos_cfg = cfg.model_copy(update={"topics": cfg.topics.model_copy(update={"examples": "examples-eos"})})
        eos = run_producer(
            eos_cfg, "synthetic", handle_signals=False, serve_http=False, position_file=Path(tmp) / "position.json"
        )
    for r in (result, eos):
        if r["examples"] != EXAMPLES:
            raise RuntimeError(f"produced {r['examples']} of {EXAMPLES} examples: {r}")
    produced = result["examples_per_s"]
    exactly_once = eos["examples_per_s"]
    encoded, generated = encode_rate(SyntheticSource(cfg.synthetic), BATCH)
    mb_per_s = result["bytes"] / result["seconds"] / 1e6
    return [
        {
            "name": f"producer to embedded broker ({BATCH}-example batches, {PARTITIONS} partitions, acks=all)",
            "value": produced,
            "unit": "examples/s",
            "ratio": produced / encoded,
            "vs": "codec encode of the same batches alone",
        },
        {
            "name": f"the same, exactly-once replay ({eos['transactions']} transactions with the position)",
            "value": exactly_once,
            "unit": "examples/s",
            "ratio": exactly_once / produced,
            "vs": "the producer without transactions",
        },
        {"name": "codec encode of the same batches", "value": encoded, "unit": "examples/s"},
        {
            "name": "synthetic source generation",
            "value": generated,
            "unit": "examples/s",
            "ratio": generated / encoded,
            "vs": "codec encode",
        },
        {"name": "producer payload", "value": mb_per_s, "unit": "MB/s"},
    ]


if __name__ == "__main__":
    rows = run()
    for row in rows:
        ratio = f"  ({row['ratio']:.2f}x {row['vs']})" if "ratio" in row else ""
        print(f"{row['name']}: {row['value']:,.0f} {row['unit']}{ratio}")
