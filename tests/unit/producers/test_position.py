"""The delivered-position set and its file: exact resume whatever the acknowledgement order."""

from __future__ import annotations

import json

import numpy as np
import pytest

from distill.core.exceptions import ConfigError
from producers import position
from producers.position import Delivered, Position


def test_watermark_advances_over_contiguous_deliveries():
    d = Delivered()
    d.add(np.array([2, 3]))
    assert d.watermark == 0 and d.above().tolist() == [False, False, True, True]
    d.add(np.array([0]))
    assert d.watermark == 1
    d.add(np.array([1]))
    assert d.watermark == 4 and d.above().size == 0
    assert d.contains(np.array([0, 3, 4, 10])).tolist() == [True, True, False, False]
    with pytest.raises(ValueError, match="already delivered"):
        d.add(np.array([3]))


def test_random_acknowledgement_order_and_growth():
    rng = np.random.default_rng(0)
    n = 50_000
    # Batches of scattered positions (as with the user partitioner), acknowledged shuffled
    # within a sliding window.
    batches = np.array_split(rng.permutation(n), 400)
    batches = [np.sort(b) for b in batches]
    d = Delivered()
    seen = np.zeros(n, dtype=bool)
    for i in rng.permutation(len(batches)):
        d.add(batches[i])
        seen[batches[i]] = True
        w = d.watermark
        assert seen[:w].all() and (w == n or not seen[w])
        probe = rng.integers(0, n, 200)
        assert np.array_equal(d.contains(probe), seen[probe])
    assert d.watermark == n


def test_file_round_trip_is_exact(tmp_path):
    d = Delivered()
    d.add(np.arange(0, 1000))
    d.add(np.arange(1500, 1700, 3))
    pos = Position("synthetic", "p0", d, next_seq=17, examples=1067, batches=17)
    path = tmp_path / "sub" / "position.json"
    position.save(path, pos)
    assert not list(path.parent.glob(".*.tmp"))  # written atomically via a temporary file
    back = position.load(path, "synthetic", "p1")
    assert back.delivered.watermark == 1000 and back.next_seq == 17 and back.examples == 1067
    probe = np.arange(0, 2000)
    assert np.array_equal(back.delivered.contains(probe), d.contains(probe))
    assert back.producer_id == "p1"


def test_missing_file_starts_fresh_and_bad_files_are_explained(tmp_path):
    fresh = position.load(tmp_path / "none.json", "movielens", "p")
    assert fresh.delivered.watermark == 0 and fresh.next_seq == 0
    path = tmp_path / "position.json"
    position.save(path, Position("movielens", "p"))
    with pytest.raises(ConfigError, match=r"belongs to the 'movielens' source, not 'synthetic'"):
        position.load(path, "synthetic", "p")
    path.write_text("{not json")
    with pytest.raises(ConfigError, match=r"not valid JSON.*delete it"):
        position.load(path, "movielens", "p")
    path.write_text(json.dumps({"version": 1, "source": "movielens"}))
    with pytest.raises(ConfigError, match=r"not readable.*delete it"):
        position.load(path, "movielens", "p")


def test_copy_is_independent_and_add_new_tolerates_repeats():
    d = Delivered()
    d.add(np.array([0, 1, 5]))
    c = d.copy()
    c.add(np.array([2, 3, 4]))
    assert d.watermark == 2 and c.watermark == 6
    c.add_new(np.array([4, 5, 6, 6]))  # recovery may see a position twice
    assert c.watermark == 7


def test_offsets_round_trip_and_old_files_have_none(tmp_path):
    path = tmp_path / "p.json"
    position.save(path, Position("synthetic", "p", offsets={0: 12, 3: 7}))
    assert position.load(path, "synthetic", "p").offsets == {0: 12, 3: 7}
    data = json.loads(path.read_text())
    del data["offsets"]
    path.write_text(json.dumps(data))
    assert position.load(path, "synthetic", "p").offsets == {}
