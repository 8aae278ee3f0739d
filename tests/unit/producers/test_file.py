"""The file source: CSV (and Parquet when pyarrow is there) with a column mapping."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from distill.core.config import Config, FileSourceConfig, load_config
from distill.core.exceptions import ConfigError
from producers.file import FileSource
from producers.source import Chunk
from producers.sources import check_columns, make_source

CSV = """id,ts,user,country,price,score,clicked,dwell
10,1700000002,alice,fr,1.5,0.25,1,3.5
11,1700000000,bob,de,2.0,0.50,0,0.0
12,1700000001,alice,fr,2.5,0.75,1,1.25
13,1700000000,carol,us,3.0,1.00,0,0.5
"""


def mapping(path: Path, **over) -> FileSourceConfig:
    base = dict(
        path=path,
        example_id="id",
        event_time="ts",
        user="user",
        categorical=["user", "country"],
        dense=["price", "score"],
        labels={"click": "clicked", "dwell": "dwell"},
    )
    return FileSourceConfig(**(base | over))


@pytest.fixture
def csv_file(tmp_path) -> Path:
    path = tmp_path / "events.csv"
    path.write_text(CSV)
    return path


def test_csv_replayed_in_time_order(csv_file):
    src = FileSource(mapping(csv_file))
    assert src.total == 4
    # Stable sort by time: ties (11 and 13 at ...000) keep the file's order.
    assert src.example_ids.tolist() == [11, 13, 12, 10]
    assert src.event_time_ms.tolist() == [
        1_700_000_000_000,
        1_700_000_000_000,
        1_700_000_001_000,
        1_700_000_002_000,
    ]
    assert src.categorical_names == ["user", "country"] and src.dense_names == ["price", "score"]
    assert src.task_names == ["click", "dwell"] and src.task_types == ["binary", "regression"]
    assert src.dense.dtype == np.float32 and src.dense[0].tolist() == [2.0, 0.5]
    assert src.labels.tolist() == [[0, 0], [0, 0.5], [1, 1.25], [1, 3.5]]
    # Text ids are hashed stably: alice is one id, the same in a second reading.
    users = src.categorical[:, 0]
    assert users[2] == users[3] != users[0]
    assert np.array_equal(FileSource(mapping(csv_file)).categorical, src.categorical)
    assert np.array_equal(src.users, users)
    chunks = list(src.chunks(1, 2))
    assert [len(c) for c in chunks] == [2, 1]
    assert Chunk.concat(chunks).positions.tolist() == [1, 2, 3]


def test_file_order_kept_without_sorting(csv_file):
    src = FileSource(mapping(csv_file, sort_by_time=False))
    assert src.example_ids.tolist() == [10, 11, 12, 13]


def test_defaults_without_id_time_or_user(csv_file):
    src = FileSource(mapping(csv_file, example_id=None, event_time=None, user=None))
    assert src.example_ids.tolist() == [0, 1, 2, 3]
    assert len(set(src.event_time_ms.tolist())) == 1
    assert np.array_equal(src.users, src.example_ids)


def test_iso_and_millisecond_times_and_tsv(tmp_path):
    iso = tmp_path / "iso.tsv"
    iso.write_text("when\tshop\ty\n2024-01-01T00:00:01\t7\t1\n2024-01-01 00:00:00.500\t8\t0\n")
    src = FileSource(FileSourceConfig(path=iso, event_time="when", categorical=["shop"], labels={"y": "y"}))
    base = 1_704_067_200_000
    assert src.event_time_ms.tolist() == [base + 500, base + 1000]
    assert src.categorical[:, 0].tolist() == [8, 7]  # integer ids stay as they are
    ms = tmp_path / "ms.csv"
    ms.write_text("t,y\n1700000000123,1\n")
    assert FileSource(FileSourceConfig(path=ms, event_time="t", labels={"y": "y"})).event_time_ms[0] == 1700000000123


def test_bad_mapping_names_the_column_and_key(csv_file):
    with pytest.raises(ConfigError, match=r"column 'prize' \(file\.dense\) is not in .*events\.csv.*'price'"):
        FileSource(mapping(csv_file, dense=["prize"]))
    with pytest.raises(ConfigError, match=r"column 'click' \(file\.labels\.click\) is not in"):
        FileSource(mapping(csv_file, labels={"click": "click", "dwell": "dwell"}))
    with pytest.raises(ConfigError, match=r"'stamp' \(file\.event_time\)"):
        FileSource(mapping(csv_file, event_time="stamp"))


def test_missing_file_and_missing_path(tmp_path):
    with pytest.raises(ConfigError, match=r"nope\.csv \(file\.path\) does not exist"):
        FileSource(mapping(tmp_path / "nope.csv"))
    with pytest.raises(ConfigError, match=r"needs file\.path"):
        FileSource(FileSourceConfig(labels={"y": "y"}))


def test_bad_values_are_refused(tmp_path, csv_file):
    with pytest.raises(ConfigError, match=r"'country' of .* is not numeric"):
        FileSource(mapping(csv_file, dense=["country"]))
    dup = tmp_path / "dup.csv"
    dup.write_text("id,y\n1,0\n1,1\n")
    with pytest.raises(ConfigError, match=r"repeats values \(e\.g\. 1\)"):
        FileSource(FileSourceConfig(path=dup, example_id="id", labels={"y": "y"}))
    gap = tmp_path / "gap.csv"
    gap.write_text("id,y\n1,0\n2,\n")
    with pytest.raises(ConfigError, match=r"label column 'y' .* 1 empty or non-finite"):
        FileSource(FileSourceConfig(path=gap, labels={"y": "y"}))
    with pytest.raises(ConfigError, match=r"\[tasks\] declares \['click', 'watch'\]"):
        FileSource(mapping(csv_file), task_names=["click", "watch"])


def test_config_must_describe_the_file(csv_file):
    cfg = load_config(
        None,
        environ={},
        file=mapping(csv_file).model_dump(mode="json"),
        tasks=[{"name": "click"}, {"name": "dwell", "type": "regression"}],
    )
    with pytest.raises(ConfigError, match=r"features\.categorical is \['user_id', 'item_id', 'item_group'\]"):
        check_columns(cfg, make_source(cfg, "file"))
    cfg = load_config(
        None,
        environ={},
        file=mapping(csv_file).model_dump(mode="json"),
        tasks=[{"name": "click"}, {"name": "dwell", "type": "regression"}],
        features={
            "categorical": [{"name": "user"}, {"name": "country"}],
            "dense": ["price", "score"],
        },
    )
    check_columns(cfg, make_source(cfg, "file"))


def test_parquet_without_pyarrow_says_how_to_install(tmp_path, monkeypatch):
    path = tmp_path / "events.parquet"
    path.write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # import pyarrow now raises ImportError
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(ConfigError, match=r"needs pyarrow; install it with: pip install 'pyarrow>=14'"):
        FileSource(FileSourceConfig(path=path, labels={"y": "y"}))


def test_parquet_round_trip(tmp_path, csv_file):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    csv_src = FileSource(mapping(csv_file))
    rows = [line.split(",") for line in CSV.strip().splitlines()]
    cols = {name: [r[j] for r in rows[1:]] for j, name in enumerate(rows[0])}
    table = pa.table(
        {
            "id": [int(v) for v in cols["id"]],
            "ts": [int(v) for v in cols["ts"]],
            "user": cols["user"],
            "country": cols["country"],
            "price": [float(v) for v in cols["price"]],
            "score": [float(v) for v in cols["score"]],
            "clicked": [int(v) for v in cols["clicked"]],
            "dwell": [float(v) for v in cols["dwell"]],
            "unused": [0] * 4,
        }
    )
    path = tmp_path / "events.parquet"
    pq.write_table(table, path)
    src = FileSource(mapping(path))
    for field in ("example_ids", "event_time_ms", "categorical", "dense", "labels"):
        assert np.array_equal(getattr(src, field), getattr(csv_src, field)), field
    with pytest.raises(ConfigError, match=r"'prize' \(file\.dense\) is not in"):
        FileSource(mapping(path, dense=["prize"]))
    # Arrow timestamps are read as such.
    stamped = tmp_path / "stamped.parquet"
    seconds = [int(v) for v in cols["ts"]]
    pq.write_table(table.set_column(1, "ts", pa.array(seconds, type=pa.timestamp("s"))), stamped)
    assert np.array_equal(FileSource(mapping(stamped)).event_time_ms, csv_src.event_time_ms)


def test_default_config_has_no_file_path():
    with pytest.raises(ConfigError, match="needs file.path"):
        make_source(Config(), "file")
