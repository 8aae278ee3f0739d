"""MovieLens-100k from the recbole wheel: order, features, labels, and the missing-data error."""

from __future__ import annotations

import os
import shutil
from datetime import UTC, datetime
from importlib import util

import numpy as np
import pytest

from distill.core.exceptions import ConfigError
from distill.core.presets import load_config_for, preset_overrides
from producers import movielens
from producers.source import Chunk
from producers.sources import check_columns

needs_data = pytest.mark.skipif(
    util.find_spec("recbole") is None,
    reason=f"MovieLens data not installed: {movielens.INSTALL_HINT}",
)


@pytest.fixture(scope="module")
def source() -> movielens.MovieLensSource:
    return movielens.MovieLensSource()


@pytest.fixture(scope="module")
def raw() -> dict[str, np.ndarray]:
    table = movielens.read_table(movielens.find_data_dir() / "ml-100k.inter")
    return {k: np.array(v, dtype=np.float64).astype(np.int64) for k, v in table.items()}


def test_preset_file_matches_the_source():
    preset = preset_overrides("movielens")
    sections = movielens.config_sections()
    assert {k: preset[k] for k in sections} == sections
    assert set(preset) - set(sections) == {"students"}  # and what suits this data
    dense = movielens.config_sections()["features"]["dense"]
    assert len(dense) == 19 and dense[4] == "genre_childrens" and "genre_sci_fi" in dense


@needs_data
def test_preset_config_matches_the_columns(source, monkeypatch):
    for key in [k for k in os.environ if k.startswith("DISTILL_")]:
        monkeypatch.delenv(key)
    cfg = load_config_for("movielens")
    check_columns(cfg, source)
    assert [t.name for t in cfg.tasks] == ["like", "rating"]
    assert cfg.task_types() == {"like": "binary", "rating": "regression"}


@needs_data
def test_every_rating_once_in_stable_time_order(source, raw):
    assert source.total == 100_000
    ids = source.example_ids
    assert np.array_equal(np.sort(ids), np.arange(100_000))
    assert np.array_equal(source.event_time_ms, raw["timestamp"][ids] * 1000)
    t = source.event_time_ms
    assert (np.diff(t) >= 0).all()
    ties = np.diff(t) == 0
    assert ties.any() and (np.diff(ids)[ties] > 0).all()  # equal times keep the file's order
    assert np.array_equal(source.categorical[:, 0], raw["user_id"][ids])
    assert np.array_equal(source.categorical[:, 1], raw["item_id"][ids])


@needs_data
def test_labels(source, raw):
    rating = raw["rating"][source.example_ids]
    assert np.array_equal(source.labels[:, 1], rating.astype(np.float32))
    assert np.array_equal(source.labels[:, 0], (rating >= 4).astype(np.float32))
    assert set(np.unique(source.labels[:, 1])) == {1.0, 2.0, 3.0, 4.0, 5.0}


@needs_data
def test_user_item_and_time_features(source):
    names = source.categorical_names
    col = {n: source.categorical[:, names.index(n)] for n in names}
    # User 1 is 24, M, technician in u.user.
    row = np.flatnonzero(col["user_id"] == 1)[0]
    assert col["age_bucket"][row] == 2  # 18-24
    assert col["gender"][row] == 1
    assert col["occupation"][row] == movielens.OCCUPATIONS.index("technician") + 1
    # Item 1 is Toy Story (1995): Animation, Children's, Comedy.
    row = np.flatnonzero(col["item_id"] == 1)[0]
    assert col["release_year"][row] == 1995
    genres = [source.dense_names[j] for j in np.flatnonzero(source.dense[row])]
    assert genres == ["genre_animation", "genre_childrens", "genre_comedy"]
    assert (source.dense.sum(axis=1) >= 1).all() and source.dense.dtype == np.float32
    for row in (0, 4321, 99_999):
        when = datetime.fromtimestamp(source.event_time_ms[row] / 1000, tz=UTC)
        assert col["hour"][row] == when.hour and col["weekday"][row] == when.weekday()
    for name, buckets in movielens.BUCKETS.items():
        assert 0 <= col[name].min() and col[name].max() < buckets, name


@needs_data
def test_chunks_resume_at_any_position(source):
    full = Chunk.concat(list(source.chunks(0, 7000)))
    tail = Chunk.concat(list(source.chunks(98_765, 500)))
    assert len(full) == 100_000 and np.array_equal(full.positions, np.arange(100_000))
    assert np.array_equal(tail.example_ids, full.example_ids[98_765:])
    assert tail.truth is None  # real data: no true probability


def test_missing_data_names_the_install_command(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match=r"pip install --no-deps recbole==1\.2\.1"):
        movielens.MovieLensSource(data_dir=tmp_path / "nowhere")
    monkeypatch.setattr(movielens.util, "find_spec", lambda name: None)
    with pytest.raises(ConfigError, match=r"recbole is not installed.*pip install --no-deps recbole"):
        movielens.find_data_dir()


@needs_data
def test_missing_file_names_the_file(tmp_path):
    for name in ("ml-100k.inter", "ml-100k.item"):
        shutil.copy(movielens.find_data_dir() / name, tmp_path / name)
    with pytest.raises(ConfigError, match=r"ml-100k\.user is missing.*recbole==1\.2\.1"):
        movielens.MovieLensSource(data_dir=tmp_path)
