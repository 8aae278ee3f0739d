"""The columnar codec without Kafka: round trips, schema evolution and every way to fail."""

from __future__ import annotations

import numpy as np
import pytest

import schemas
from distill.core.exceptions import DecodeError
from distill.core.wire import SCHEMA_HEADER, CheckpointAnnouncement, Codec, LabelBatch, ids_checksum


def assert_batches_equal(a, b) -> None:
    assert (a.batch_id, a.producer_id, a.seq) == (b.batch_id, b.producer_id, b.seq)
    assert a.categorical_names == b.categorical_names
    assert a.dense_names == b.dense_names
    assert a.task_names == b.task_names
    for column in ("event_time_ms", "example_ids", "categorical", "dense", "labels"):
        x, y = getattr(a, column), getattr(b, column)
        assert x.dtype == y.dtype, column
        assert x.shape == y.shape, column
        np.testing.assert_array_equal(x, y, err_msg=column)
    if a.truth is None:
        assert b.truth is None
    else:
        np.testing.assert_array_equal(a.truth, b.truth)


def make_labels(n: int = 8, tasks=("click", "watch"), seed: int = 0) -> LabelBatch:
    rng = np.random.default_rng(seed)
    ids = np.arange(n, dtype=np.int64) + 100
    return LabelBatch(
        batch_id="p-3",
        example_ids_checksum=ids_checksum(ids),
        source_partition=1,
        source_offset=42,
        teacher_version=7,
        watermark=40,
        task_names=list(tasks),
        logits=rng.standard_normal((n, len(tasks)), dtype=np.float32),
        produced_at_ms=1_700_000_000_123,
    )


def examples_record(batch, **changes) -> dict:
    """The Avro record of an ExampleBatch, to be garbled field by field."""
    record = {
        "batch_id": batch.batch_id,
        "producer_id": batch.producer_id,
        "seq": batch.seq,
        "num_examples": batch.size,
        "event_time_ms": batch.event_time_ms.astype("<i8").tobytes(),
        "example_ids": batch.example_ids.astype("<i8").tobytes(),
        "categorical_names": batch.categorical_names,
        "categorical": batch.categorical.astype("<i8").tobytes(),
        "dense_names": batch.dense_names,
        "dense": batch.dense.astype("<f4").tobytes(),
        "task_names": batch.task_names,
        "labels": batch.labels.astype("<f4").tobytes(),
        "truth": None if batch.truth is None else batch.truth.astype("<f4").tobytes(),
    }
    record.update(changes)
    return record


@pytest.fixture
def codec() -> Codec:
    return Codec()


# -- round trips -------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [0, 1, 256])
@pytest.mark.parametrize("truth", [True, False])
def test_examples_round_trip(codec, make_batch, n, truth):
    batch = make_batch(n=n, seq=5, truth=truth)
    value, headers = codec.encode_examples(batch)
    assert isinstance(value, bytes)
    decoded = codec.decode_examples(value, headers)
    assert decoded.size == n
    assert_batches_equal(batch, decoded)
    # summed as it is decoded, for the label that names it (the sum of its ids modulo 2**63)
    assert decoded.example_ids_checksum == ids_checksum(batch.example_ids) == int(batch.example_ids.sum()) % 2**63


def test_decoded_columns_are_zero_copy_views(codec, make_batch):
    value, headers = codec.encode_examples(make_batch(n=32))
    decoded = codec.decode_examples(value, headers)
    # numpy.frombuffer over the Avro bytes: read-only views, no per-example copy.
    assert not decoded.dense.flags.writeable
    assert decoded.dense.dtype == np.float32 and decoded.categorical.dtype == np.int64
    assert decoded.dense.shape == (32, len(decoded.dense_names))


def test_header_names_the_latest_writer_schema(codec, make_batch):
    _, headers = codec.encode_examples(make_batch(n=2))
    assert headers == [(SCHEMA_HEADER, schemas.latest("example_batch").fingerprint_hex.encode())]


def test_non_contiguous_and_other_dtypes_are_packed(codec, make_batch):
    batch = make_batch(n=10)
    batch.dense = np.asfortranarray(batch.dense.astype(np.float64))  # wrong dtype and layout
    batch.example_ids = batch.example_ids.astype(np.int32)
    decoded = codec.decode_examples(*codec.encode_examples(batch))
    np.testing.assert_array_equal(decoded.dense, batch.dense.astype(np.float32))
    np.testing.assert_array_equal(decoded.example_ids, batch.example_ids)


@pytest.mark.parametrize("n", [0, 1, 64])
def test_labels_round_trip(codec, n):
    labels = make_labels(n=n)
    decoded = codec.decode_labels(*codec.encode_labels(labels))
    assert decoded.size == n
    for name in (
        "batch_id",
        "example_ids_checksum",
        "source_partition",
        "source_offset",
        "teacher_version",
        "watermark",
        "task_names",
        "produced_at_ms",
    ):
        assert getattr(decoded, name) == getattr(labels, name), name
    np.testing.assert_array_equal(decoded.logits, labels.logits)


def test_dead_letter_round_trip(codec):
    record = {
        "reason": "undecodable",
        "error": "boom",
        "source_topic": "examples",
        "source_partition": 3,
        "source_offset": 99,
        "worker": "teacher/t0",
        "failed_at_ms": 1,
        "original_headers": [{"key": "a", "value": b"1"}, {"key": "b", "value": None}],
        "payload": b"\x00\xffraw",
    }
    assert codec.decode_dead_letter(*codec.encode_dead_letter(record)) == record


def test_announcement_round_trip(codec):
    a = CheckpointAnnouncement(
        version=7,
        uri="file:///store/teacher-000000000007.pt",
        sha256="ab" * 32,
        watermark={0: 12, 3: 40},
        watermark_time_ms={0: 1_700_000_000_000},
        oldest_kept=4,
        examples_trained=13_000,
        trainer="teacher",
        world_size=2,
        published_at_ms=1_700_000_000_500,
    )
    value, headers = codec.encode_announcement(a)
    back = codec.decode_announcement(value, headers)
    assert back == a
    assert back.trained_through(3) == 40 and back.trained_through(1) == 0  # not trained on: 0


def test_announcement_is_not_a_label(codec):
    value, headers = codec.encode_announcement(CheckpointAnnouncement(0, "file:///x", "00", {}))
    with pytest.raises(DecodeError) as err:
        codec.decode_labels(value, headers)
    assert err.value.reason == "wrong_kind"


def test_ids_checksum_is_order_free_and_wraps():
    ids = np.array([2**62, 2**62, 5, -1], dtype=np.int64)
    assert ids_checksum(ids) == ids_checksum(ids[::-1])
    assert 0 <= ids_checksum(ids) < 2**63
    assert ids_checksum(np.array([], dtype=np.int64)) == 0
    assert ids_checksum(np.arange(5)) != ids_checksum(np.arange(1, 6))


# -- schema evolution --------------------------------------------------------------------------
def test_v1_message_reads_with_truth_none(codec, make_batch):
    v1 = next(s for s in schemas.all_schemas() if s.kind == "example_batch" and s.version == 1)
    assert v1 is not schemas.latest("example_batch")
    batch = make_batch(n=12, truth=False)
    record = examples_record(batch)
    del record["truth"]  # the v1 writer has no such field
    value, headers = Codec.encode_record(v1, record)
    assert headers == [(SCHEMA_HEADER, v1.fingerprint_hex.encode())]
    decoded = codec.decode_examples(value, headers)
    assert decoded.truth is None
    assert_batches_equal(batch, decoded)


# -- failures: every one a DecodeError with a reason for the DLQ -------------------------------
def test_unknown_fingerprint(codec, make_batch):
    value, _ = codec.encode_examples(make_batch(n=3))
    with pytest.raises(DecodeError) as err:
        codec.decode_examples(value, [(SCHEMA_HEADER, b"0123456789abcdef")])
    assert err.value.reason == "unknown_schema"
    assert "0123456789abcdef" in str(err.value)


@pytest.mark.parametrize("header", [b"not hex", b"\xff\xfe", b""])
def test_garbled_fingerprint(codec, make_batch, header):
    value, _ = codec.encode_examples(make_batch(n=3))
    with pytest.raises(DecodeError) as err:
        codec.decode_examples(value, [(SCHEMA_HEADER, header)])
    assert err.value.reason == "unknown_schema"


def test_a_fingerprint_in_upper_case_hex_is_still_known(codec, make_batch):
    value, headers = codec.encode_examples(make_batch(n=3))
    upper = [(k, v.upper()) for k, v in headers]
    assert upper != headers
    assert codec.decode_examples(value, upper).example_ids.tolist() == make_batch(n=3).example_ids.tolist()


@pytest.mark.parametrize("headers", [None, [], [("other", b"x")], [(SCHEMA_HEADER, None)]])
def test_missing_schema_header(codec, make_batch, headers):
    value, _ = codec.encode_examples(make_batch(n=3))
    with pytest.raises(DecodeError) as err:
        codec.decode_examples(value, headers)
    assert err.value.reason == "missing_schema"
    assert SCHEMA_HEADER in err.value.detail


def test_empty_value(codec, make_batch):
    _, headers = codec.encode_examples(make_batch(n=3))
    with pytest.raises(DecodeError) as err:
        codec.decode_examples(None, headers)
    assert err.value.reason == "empty"


def test_header_found_among_others(codec, make_batch):
    value, headers = codec.encode_examples(make_batch(n=3))
    decoded = codec.decode_examples(value, [("trace", b"abc"), *headers, ("x", None)])
    assert decoded.size == 3


@pytest.mark.parametrize("keep", [0.0, 0.1, 0.5, 0.99])
def test_truncated_bytes(codec, make_batch, keep):
    value, headers = codec.encode_examples(make_batch(n=20))
    cut = value[: int(len(value) * keep)] if keep else b""
    with pytest.raises(DecodeError) as err:
        codec.decode_examples(cut, headers)
    assert err.value.reason in ("undecodable", "bad_column")


def test_trailing_bytes(codec, make_batch):
    value, headers = codec.encode_examples(make_batch(n=4))
    with pytest.raises(DecodeError) as err:
        codec.decode_examples(value + b"\x00\x01", headers)
    assert err.value.reason == "undecodable"
    assert "2 trailing bytes" in err.value.detail


@pytest.mark.parametrize("seed", range(50))
def test_random_bytes_never_escape_as_another_error(codec, make_batch, seed):
    rng = np.random.default_rng(seed)
    _, headers = codec.encode_examples(make_batch(n=1))
    garbage = rng.integers(0, 256, size=int(rng.integers(1, 400)), dtype=np.uint8).tobytes()
    with pytest.raises(DecodeError) as err:
        codec.decode_examples(garbage, headers)
    assert err.value.reason in ("undecodable", "bad_column", "non_finite")


@pytest.mark.parametrize("column", ["event_time_ms", "example_ids", "categorical", "dense", "labels", "truth"])
def test_wrong_column_length_names_the_column(codec, make_batch, column):
    batch = make_batch(n=6)
    record = examples_record(batch)
    record[column] = record[column][:-4]  # one value short (or half of one int64)
    value, headers = Codec.encode_record(schemas.latest("example_batch"), record)
    with pytest.raises(DecodeError) as err:
        codec.decode_examples(value, headers)
    assert err.value.reason == "bad_column"
    assert repr(column) in err.value.detail


def test_num_examples_disagreeing_with_columns(codec, make_batch):
    record = examples_record(make_batch(n=6), num_examples=7)
    value, headers = Codec.encode_record(schemas.latest("example_batch"), record)
    with pytest.raises(DecodeError) as err:
        codec.decode_examples(value, headers)
    assert err.value.reason == "bad_column"


def test_negative_num_examples(codec, make_batch):
    record = examples_record(make_batch(n=0), num_examples=-1)
    value, headers = Codec.encode_record(schemas.latest("example_batch"), record)
    with pytest.raises(DecodeError) as err:
        codec.decode_examples(value, headers)
    assert err.value.reason == "bad_column"
    assert "negative" in err.value.detail


def test_wrong_logits_length_names_the_column(codec):
    value, headers = codec.encode_labels(make_labels(n=3))
    record = codec.decode_record(value, headers, "label_batch")
    record["num_examples"] = 4  # the logits column holds 3 rows
    value, headers = Codec.encode_record(schemas.latest("label_batch"), record)
    with pytest.raises(DecodeError) as err:
        codec.decode_labels(value, headers)
    assert err.value.reason == "bad_column"
    assert "'logits'" in err.value.detail


# -- non-finite values -------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_dense_rejected_naming_the_column(codec, make_batch, bad):
    batch = make_batch(n=8)
    batch.dense[3, 2] = bad
    batch.dense[5, 2] = bad
    with pytest.raises(DecodeError) as err:
        codec.decode_examples(*codec.encode_examples(batch))
    assert err.value.reason == "non_finite"
    assert repr(batch.dense_names[2]) in err.value.detail
    assert "2 NaN/inf" in err.value.detail
    assert "zero" in err.value.detail  # says how to change the policy


def test_non_finite_dense_zeroed_under_policy_zero(make_batch):
    batch = make_batch(n=8)
    batch.dense[1, 0] = np.nan
    batch.dense[2, 4] = np.inf
    decoded = Codec(non_finite="zero").decode_examples(*Codec().encode_examples(batch))
    assert np.isfinite(decoded.dense).all()
    assert decoded.dense[1, 0] == 0.0 and decoded.dense[2, 4] == 0.0
    assert decoded.dense.dtype == np.float32
    mask = np.isfinite(batch.dense)
    np.testing.assert_array_equal(decoded.dense[mask], batch.dense[mask])


def test_non_finite_dense_passes_under_policy_allow(make_batch):
    batch = make_batch(n=4)
    batch.dense[0, 0] = np.nan
    decoded = Codec(non_finite="allow").decode_examples(*Codec().encode_examples(batch))
    assert np.isnan(decoded.dense[0, 0])


@pytest.mark.parametrize("policy", ["reject", "zero", "allow"])
def test_non_finite_hard_labels_always_rejected(make_batch, policy):
    batch = make_batch(n=4)
    batch.labels[2, 1] = np.nan
    with pytest.raises(DecodeError) as err:
        Codec(non_finite=policy).decode_examples(*Codec().encode_examples(batch))
    assert err.value.reason == "non_finite"
    assert repr(batch.task_names[1]) in err.value.detail


def test_non_finite_logits_rejected_naming_the_task(codec):
    labels = make_labels(n=5)
    labels.logits[4, 0] = np.inf
    with pytest.raises(DecodeError) as err:
        codec.decode_labels(*codec.encode_labels(labels))
    assert err.value.reason == "non_finite"
    assert "'click'" in err.value.detail


# -- wrong kind --------------------------------------------------------------------------------
def test_labels_read_as_examples_is_wrong_kind(codec):
    value, headers = codec.encode_labels(make_labels())
    with pytest.raises(DecodeError) as err:
        codec.decode_examples(value, headers)
    assert err.value.reason == "wrong_kind"
    assert "example_batch" in err.value.detail and "label_batch" in err.value.detail


def test_examples_read_as_labels_is_wrong_kind(codec, make_batch):
    value, headers = codec.encode_examples(make_batch(n=2))
    with pytest.raises(DecodeError) as err:
        codec.decode_labels(value, headers)
    assert err.value.reason == "wrong_kind"


def test_decode_error_message_carries_reason_and_detail():
    err = DecodeError("bad_column", "column 'dense' is short")
    assert str(err) == "bad_column: column 'dense' is short"
    assert (err.reason, err.detail) == ("bad_column", "column 'dense' is short")
