"""The columnar wire codec: micro-batches to and from Avro bytes.

Dense columns travel as packed little-endian arrays inside Avro ``bytes`` fields and are read
back with ``numpy.frombuffer``: the cost is per message, never per example. Every message
carries its writer schema's fingerprint in the ``distill.schema`` header; the reader resolves
older writer schemas from ``schemas/`` (schema evolution without a registry service).
"""

from __future__ import annotations

import io
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import fastavro
import numpy as np

import schemas
from distill.core.config import NonFinitePolicy
from distill.core.exceptions import DecodeError

SCHEMA_HEADER = "distill.schema"
# As confluent_kafka takes them; a message's own headers come back as a sequence of pairs.
Headers = list[tuple[str, str | bytes | None]]
ReadHeaders = Sequence[tuple[str, str | bytes | None]]

_I64 = np.dtype("<i8")
_F32 = np.dtype("<f4")


@dataclass
class ExampleBatch:
    batch_id: str
    producer_id: str
    seq: int
    event_time_ms: np.ndarray  # int64[n]
    example_ids: np.ndarray  # int64[n]
    categorical_names: list[str]
    categorical: np.ndarray  # int64[n, k]
    dense_names: list[str]
    dense: np.ndarray  # float32[n, d]
    task_names: list[str]
    labels: np.ndarray  # float32[n, t]
    truth: np.ndarray | None = None  # float32[n, t], evaluation only
    # Summed once, as the batch is decoded with the others of its poll: a worker that labels or
    # checks it later does so between two training steps, where numpy's calls run with the
    # caches the step evicted (70 us for this sum, against 5 us warm).
    example_ids_checksum: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.example_ids_checksum = ids_checksum(self.example_ids)

    @property
    def size(self) -> int:
        return int(self.example_ids.shape[0])


@dataclass
class LabelBatch:
    batch_id: str
    example_ids_checksum: int
    source_partition: int
    source_offset: int
    teacher_version: int
    watermark: int
    task_names: list[str]
    logits: np.ndarray  # float32[n, t]
    produced_at_ms: int = field(default_factory=lambda: int(time.time() * 1000))

    @property
    def size(self) -> int:
        return int(self.logits.shape[0])

    @classmethod
    def of(
        cls,
        batch: ExampleBatch,
        message: Any,
        version: int,
        watermark: int,
        task_names: list[str],
        logits: np.ndarray,
        produced_at_ms: int,
    ) -> LabelBatch:
        """The label of ``batch``, read from ``message`` (its partition and offset)."""
        return cls(
            batch_id=batch.batch_id,
            example_ids_checksum=batch.example_ids_checksum,
            source_partition=message.partition(),
            source_offset=message.offset(),
            teacher_version=version,
            watermark=watermark,
            task_names=task_names,
            logits=np.ascontiguousarray(logits),
            produced_at_ms=produced_at_ms,
        )


@dataclass
class CheckpointAnnouncement:
    """A published teacher checkpoint: the labelers load ``uri`` and label a batch at (p, o)
    with the newest announcement whose ``watermark.get(p, 0) <= o`` (the out-of-sample rule)."""

    version: int
    uri: str
    sha256: str
    watermark: dict[int, int]  # partition -> trained on offsets < this
    watermark_time_ms: dict[int, int] = field(default_factory=dict)  # partition -> timestamp of the last one
    oldest_kept: int = 0  # the oldest version still in the model store
    examples_trained: int = 0
    trainer: str = "trainer"
    world_size: int = 1
    published_at_ms: int = field(default_factory=lambda: int(time.time() * 1000))

    def trained_through(self, partition: int) -> int:
        return self.watermark.get(partition, 0)


def ids_checksum(example_ids: np.ndarray) -> int:
    """Sum of the ids modulo 2**63: cheap, order-free, catches a label joined to the wrong batch."""
    ids = np.asarray(example_ids, dtype=np.int64)
    return int(ids.view(np.uint64).sum(dtype=np.uint64)) & (2**63 - 1)


def _pack(arr: np.ndarray, dtype: np.dtype) -> bytes:
    return np.ascontiguousarray(arr, dtype=dtype).tobytes()


def _unpack(raw: bytes, dtype: np.dtype, rows: int, cols: int | None, column: str) -> np.ndarray:
    expected = rows * (cols if cols is not None else 1) * dtype.itemsize
    if len(raw) != expected:
        shape = f"{rows}x{cols}" if cols is not None else f"{rows}"
        raise DecodeError(
            "bad_column",
            f"column {column!r} has {len(raw)} bytes, expected {expected} ({shape} {dtype.name})",
        )
    arr = np.frombuffer(raw, dtype=dtype)
    return arr.reshape(rows, cols) if cols is not None else arr


def _check_finite(arr: np.ndarray, names: list[str], what: str, policy: NonFinitePolicy) -> np.ndarray:
    if policy == "allow" or arr.size == 0:
        return arr
    finite = np.isfinite(arr)
    if finite.all():
        return arr
    if policy == "zero":
        return np.where(finite, arr, 0.0).astype(arr.dtype)
    bad_cols = np.flatnonzero(~finite.all(axis=0))
    col = names[bad_cols[0]] if len(names) > bad_cols[0] else str(bad_cols[0])
    raise DecodeError(
        "non_finite",
        f"{what} column {col!r} has {int((~finite[:, bad_cols[0]]).sum())} NaN/inf values "
        f"(policy wire.non_finite=reject; set it to 'zero' to replace them)",
    )


class Codec:
    """Encodes and decodes the three message kinds. One instance per worker; stateless otherwise."""

    def __init__(self, non_finite: NonFinitePolicy = "reject", max_message_bytes: int | None = None):
        self.non_finite = non_finite
        self.max_message_bytes = max_message_bytes  # wire.max_message_bytes; None: no limit
        self._examples = schemas.latest("example_batch")
        self._labels = schemas.latest("label_batch")
        self._dead = schemas.latest("dead_letter")
        self._announcements = schemas.latest("checkpoint_announcement")
        self._known = schemas.by_fingerprint()
        # looked up per message: the header's hex as it arrives, and the reader of each kind
        self._by_header = {fp.hex().encode(): schema for fp, schema in self._known.items()}
        self._readers = {s.kind: s for s in (self._examples, self._labels, self._dead, self._announcements)}

    # -- generic -----------------------------------------------------------------------------
    @staticmethod
    def encode_record(schema: schemas.Schema, record: dict) -> tuple[bytes, Headers]:
        buf = io.BytesIO()
        fastavro.schemaless_writer(buf, schema.parsed, record)
        return buf.getvalue(), [(SCHEMA_HEADER, schema.fingerprint_hex.encode())]

    def decode_record(self, value: bytes | None, headers: ReadHeaders | None, kind: str) -> dict:
        if value is None:
            raise DecodeError("empty", "message has no value")
        if self.max_message_bytes is not None and len(value) > self.max_message_bytes:
            raise DecodeError(
                "too_large", f"{len(value)} bytes is over wire.max_message_bytes={self.max_message_bytes}"
            )
        fp_raw = next((v for k, v in (headers or []) if k == SCHEMA_HEADER), None)
        if fp_raw is None:
            raise DecodeError("missing_schema", f"no {SCHEMA_HEADER!r} header; was it written by this codec?")
        writer = self._by_header.get(fp_raw)
        if writer is None:
            writer = self._writer(fp_raw)
        if writer.kind != kind:
            raise DecodeError("wrong_kind", f"expected a {kind} message, got {writer.kind}")
        reader = self._readers[kind]
        buf = io.BytesIO(value)
        try:
            record = fastavro.schemaless_reader(buf, writer.parsed, None if writer is reader else reader.parsed)
        except Exception as exc:  # fastavro raises several types for truncated or garbled bytes
            raise DecodeError("undecodable", f"{kind} could not be read: {type(exc).__name__}: {exc}") from None
        if buf.tell() != len(value):
            raise DecodeError("undecodable", f"{len(value) - buf.tell()} trailing bytes after the {kind} record")
        return record

    def _writer(self, fp_raw: bytes) -> schemas.Schema:
        """The writer's schema of a header that is not the exact lower-case hex of a known one."""
        try:
            return self._known[bytes.fromhex(fp_raw.decode())]
        except (ValueError, UnicodeDecodeError, KeyError):
            raise DecodeError(
                "unknown_schema",
                f"schema fingerprint {fp_raw[:32]!r} is not in schemas/; upgrade this worker to one that ships it",
            ) from None

    # -- examples ----------------------------------------------------------------------------
    def encode_examples(self, b: ExampleBatch) -> tuple[bytes, Headers]:
        return self.encode_record(
            self._examples,
            {
                "batch_id": b.batch_id,
                "producer_id": b.producer_id,
                "seq": b.seq,
                "num_examples": b.size,
                "event_time_ms": _pack(b.event_time_ms, _I64),
                "example_ids": _pack(b.example_ids, _I64),
                "categorical_names": list(b.categorical_names),
                "categorical": _pack(b.categorical, _I64),
                "dense_names": list(b.dense_names),
                "dense": _pack(b.dense, _F32),
                "task_names": list(b.task_names),
                "labels": _pack(b.labels, _F32),
                "truth": None if b.truth is None else _pack(b.truth, _F32),
            },
        )

    def decode_examples(self, value: bytes | None, headers: ReadHeaders | None) -> ExampleBatch:
        r = self.decode_record(value, headers, "example_batch")
        n = r["num_examples"]
        if n < 0:
            raise DecodeError("bad_column", f"num_examples is negative ({n})")
        k, d, t = len(r["categorical_names"]), len(r["dense_names"]), len(r["task_names"])
        dense = _unpack(r["dense"], _F32, n, d, "dense")
        labels = _unpack(r["labels"], _F32, n, t, "labels")
        truth = None if r.get("truth") is None else _unpack(r["truth"], _F32, n, t, "truth")
        dense = _check_finite(dense, r["dense_names"], "dense", self.non_finite)
        _check_finite(labels, r["task_names"], "label", "reject")
        return ExampleBatch(
            batch_id=r["batch_id"],
            producer_id=r["producer_id"],
            seq=r["seq"],
            event_time_ms=_unpack(r["event_time_ms"], _I64, n, None, "event_time_ms"),
            example_ids=_unpack(r["example_ids"], _I64, n, None, "example_ids"),
            categorical_names=r["categorical_names"],
            categorical=_unpack(r["categorical"], _I64, n, k, "categorical"),
            dense_names=r["dense_names"],
            dense=dense,
            task_names=r["task_names"],
            labels=labels,
            truth=truth,
        )

    # -- labels ------------------------------------------------------------------------------
    def encode_labels(self, b: LabelBatch) -> tuple[bytes, Headers]:
        return self.encode_record(
            self._labels,
            {
                "batch_id": b.batch_id,
                "num_examples": b.size,
                "example_ids_checksum": b.example_ids_checksum,
                "source_partition": b.source_partition,
                "source_offset": b.source_offset,
                "teacher_version": b.teacher_version,
                "watermark": b.watermark,
                "task_names": list(b.task_names),
                "logits": _pack(b.logits, _F32),
                "produced_at_ms": b.produced_at_ms,
            },
        )

    def decode_labels(self, value: bytes | None, headers: ReadHeaders | None) -> LabelBatch:
        r = self.decode_record(value, headers, "label_batch")
        n, t = r["num_examples"], len(r["task_names"])
        if n < 0:
            raise DecodeError("bad_column", f"num_examples is negative ({n})")
        logits = _unpack(r["logits"], _F32, n, t, "logits")
        _check_finite(logits, r["task_names"], "logit", "reject")
        return LabelBatch(
            batch_id=r["batch_id"],
            example_ids_checksum=r["example_ids_checksum"],
            source_partition=r["source_partition"],
            source_offset=r["source_offset"],
            teacher_version=r["teacher_version"],
            watermark=r["watermark"],
            task_names=r["task_names"],
            logits=logits,
            produced_at_ms=r["produced_at_ms"],
        )

    # -- checkpoint announcements -------------------------------------------------------------
    def encode_announcement(self, a: CheckpointAnnouncement) -> tuple[bytes, Headers]:
        return self.encode_record(
            self._announcements,
            {
                "version": a.version,
                "uri": a.uri,
                "sha256": a.sha256,
                "watermark": [
                    {"partition": p, "offset": o, "timestamp_ms": a.watermark_time_ms.get(p, -1)}
                    for p, o in sorted(a.watermark.items())
                ],
                "oldest_kept": a.oldest_kept,
                "examples_trained": a.examples_trained,
                "trainer": a.trainer,
                "world_size": a.world_size,
                "published_at_ms": a.published_at_ms,
            },
        )

    def decode_announcement(self, value: bytes | None, headers: ReadHeaders | None) -> CheckpointAnnouncement:
        r = self.decode_record(value, headers, "checkpoint_announcement")
        if r["version"] < 0:
            raise DecodeError("bad_column", f"checkpoint version is negative ({r['version']})")
        return CheckpointAnnouncement(
            version=r["version"],
            uri=r["uri"],
            sha256=r["sha256"],
            watermark={w["partition"]: w["offset"] for w in r["watermark"]},
            watermark_time_ms={w["partition"]: w["timestamp_ms"] for w in r["watermark"] if w["timestamp_ms"] >= 0},
            oldest_kept=r["oldest_kept"],
            examples_trained=r["examples_trained"],
            trainer=r["trainer"],
            world_size=r["world_size"],
            published_at_ms=r["published_at_ms"],
        )

    # -- dead letters ------------------------------------------------------------------------
    def encode_dead_letter(self, record: dict) -> tuple[bytes, Headers]:
        return self.encode_record(self._dead, record)

    def decode_dead_letter(self, value: bytes | None, headers: ReadHeaders | None) -> dict:
        return self.decode_record(value, headers, "dead_letter")
