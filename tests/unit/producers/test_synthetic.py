"""The synthetic source: columns, determinism, label model, and drift on its schedule."""

from __future__ import annotations

import numpy as np
import pytest

from distill.core.config import Config, SyntheticConfig
from producers.source import Chunk
from producers.sources import check_columns
from producers.synthetic import BLOCK, SyntheticSource


def stream(cfg: SyntheticConfig, start: int = 0, size: int = 4096) -> Chunk:
    return Chunk.concat(list(SyntheticSource(cfg).chunks(start, size)))


def log_loss(p: np.ndarray, y: np.ndarray) -> float:
    p = np.clip(p, 1e-6, 1 - 1e-6)
    return float(-(y * np.log(p) + (1 - y) * np.log(1 - p)).mean())


@pytest.fixture(scope="module")
def long_stream() -> Chunk:
    # Defaults except the length: 100k examples span 10 popularity epochs and 2 concept changes.
    return stream(SyntheticConfig(examples=100_000, concept_change_every=40_000))


def test_columns_match_the_default_config():
    source = SyntheticSource()
    check_columns(Config(), source)  # raises on any difference
    chunk = next(source.chunks(0, 100))
    assert chunk.categorical.shape == (100, 3) and chunk.categorical.dtype == np.int64
    assert chunk.dense.shape == (100, 8) and chunk.dense.dtype == np.float32
    assert chunk.labels.shape == (100, 2) and chunk.labels.dtype == np.float32
    assert chunk.truth is not None and chunk.truth.shape == (100, 2)
    assert np.array_equal(chunk.users, chunk.categorical[:, 0])


def test_dense_columns_follow_dense_dim():
    for d in (0, 1, 3):
        source = SyntheticSource(SyntheticConfig(dense_dim=d, examples=500))
        assert source.dense_names == [f"ctx{i}" for i in range(d)]
        assert stream(source.cfg).dense.shape == (500, d)


def test_same_seed_same_stream_whatever_the_chunking():
    cfg = SyntheticConfig(examples=5000, popularity_shift_every=700, new_items_every=900, concept_change_every=1100)
    a, b = stream(cfg, size=4096), stream(cfg, size=333)
    for field in (
        "positions",
        "event_time_ms",
        "example_ids",
        "categorical",
        "dense",
        "labels",
        "truth",
    ):
        assert np.array_equal(getattr(a, field), getattr(b, field)), field
    # A fresh source (empty caches) resumed mid-stream gives the same tail.
    tail = stream(cfg, start=3210, size=100)
    assert np.array_equal(tail.labels, a.labels[3210:])
    assert np.array_equal(tail.categorical, a.categorical[3210:])
    other = stream(cfg.model_copy(update={"seed": cfg.seed + 1}))
    assert not np.array_equal(other.categorical, a.categorical)


def test_stream_shape_ids_and_times():
    cfg = SyntheticConfig(examples=2 * BLOCK + 17)
    s = stream(cfg, size=500)
    assert len(s) == cfg.examples
    assert np.array_equal(s.example_ids, np.arange(cfg.examples))
    assert np.array_equal(s.positions, np.arange(cfg.examples))
    assert (np.diff(s.event_time_ms) >= 0).all()
    assert s.categorical[:, 0].max() < cfg.num_users and s.categorical[:, 1].max() < cfg.num_items


def test_labels_are_draws_from_the_truth(long_stream):
    click, watch = long_stream.labels[:, 0], long_stream.labels[:, 1]
    p_click, e_watch = long_stream.truth[:, 0], long_stream.truth[:, 1]
    assert set(np.unique(click)) == {0.0, 1.0}
    assert ((watch >= 0) & (watch <= 1)).all()
    assert (watch[click == 0] == 0).all() and (watch[click == 1] > 0).mean() > 0.99
    assert ((p_click > 0) & (p_click < 1)).all() and (e_watch <= p_click).all()
    assert 0.15 < click.mean() < 0.5
    # Calibrated: in each probability decile the click rate is the mean probability.
    edges = np.quantile(p_click, np.linspace(0, 1, 11))
    bins = np.clip(np.searchsorted(edges, p_click, side="right") - 1, 0, 9)
    for b in range(10):
        sel = bins == b
        assert abs(click[sel].mean() - p_click[sel].mean()) < 0.03
    assert abs(watch.mean() - e_watch.mean()) < 0.01
    # The soft label carries more than the hard one: probabilities are spread, not 0/1.
    assert 0.1 < np.quantile(p_click, 0.5) < 0.6 and np.quantile(p_click, 0.9) > 0.7


def test_interactions_matter(long_stream):
    """Per-id click rates (what a small model learns first) are far from the truth."""
    y, p = long_stream.labels[:, 0], long_stream.truth[:, 0]
    base = y.mean()

    def smoothed_rate(key: np.ndarray) -> np.ndarray:
        clicks, shows = np.bincount(key, weights=y), np.bincount(key)
        return ((clicks + 10 * base) / (shows + 10))[key]

    user_rate = smoothed_rate(long_stream.categorical[:, 0])
    item_rate = smoothed_rate(long_stream.categorical[:, 1])
    logit = lambda q: np.log(q / (1 - q))  # noqa: E731
    additive = 1 / (1 + np.exp(-(logit(user_rate) + logit(item_rate) - logit(base))))
    bayes, ids_only = log_loss(p, y), log_loss(additive, y)
    # Even fitted in-sample, per-user plus per-item rates leave a large gap to the truth.
    assert bayes < ids_only - 0.08, (bayes, ids_only)


def test_group_click_rates_drift(long_stream):
    cfg = SyntheticConfig()
    epoch = long_stream.positions // cfg.popularity_shift_every
    group = long_stream.categorical[:, 2]
    y = long_stream.labels[:, 0]
    moves = []
    for g in range(5):
        rates = [y[(group == g) & (epoch == e)].mean() for e in range(int(epoch.max()) + 1)]
        moves.append(max(rates) - min(rates))
    # Binomial noise on ~500 examples is about 0.02; the drift is several times that.
    assert max(moves) > 0.15, moves


def test_new_items_appear_with_launches():
    cfg = SyntheticConfig(examples=60_000)  # launches at 20k and 40k
    s = SyntheticSource(cfg)
    full = stream(cfg)
    items, pos = full.categorical[:, 1], full.positions
    assert items[pos < cfg.new_items_every].max() < s.initial_items
    newest = items >= s.active_items(1)
    assert not newest[pos < 2 * cfg.new_items_every].any()
    assert newest[pos >= 2 * cfg.new_items_every].mean() > 0.05  # new items are promoted


def test_concept_change_rotates_part_of_the_item_factors():
    s = SyntheticSource(SyntheticConfig())
    r0, r1 = s.rotation(0), s.rotation(1)
    assert np.allclose(r0, np.eye(r0.shape[0]))
    assert np.allclose(r1 @ r1.T, np.eye(r1.shape[0]))  # a rotation: norms are kept
    assert not np.allclose(r1, r0)
    # The same user-item pairs get different click probabilities after a change.
    cfg = SyntheticConfig(
        examples=4 * BLOCK,
        concept_change_every=2 * BLOCK,
        popularity_shift_every=10**9,
        new_items_every=10**9,
        dense_dim=0,
    )
    full = stream(cfg)
    before, after = full.positions < 2 * BLOCK, full.positions >= 2 * BLOCK
    pairs = full.categorical[:, 0] * 10**6 + full.categorical[:, 1]
    common, ib, ia = np.intersect1d(pairs[before], pairs[after], return_indices=True)
    assert len(common) > 20
    diff = np.abs(full.truth[before][ib, 0] - full.truth[after][ia, 0])
    assert diff.mean() > 0.02


def test_generation_is_vectorised_fast():
    import time

    t = time.perf_counter()
    n = len(stream(SyntheticConfig(examples=100_000)))
    assert n == 100_000 and time.perf_counter() - t < 5.0
