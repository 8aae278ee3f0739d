"""A real ratings file through `distill up --source file`, with only the column mapping given."""

from __future__ import annotations

from pathlib import Path

import pytest

from distill.core.exceptions import ConfigError
from producers.movielens import find_data_dir
from tests.e2e.test_up import _gains, _up

CONFIG = """
[features]
categorical = [{{ name = "user_id" }}, {{ name = "item_id" }}]
dense = []

[[tasks]]
name = "like"
type = "binary"

[[tasks]]
name = "rating"
type = "regression"

[file]
path = "{path}"
user = "user_id"
event_time = "timestamp"
categorical = ["user_id", "item_id"]
labels = {{ like = "like", rating = "rating" }}

# One partition: the same order in every run. With four, the order follows the timing and the
# labels' lead moved between 0.48% and 0.72%.
[topics]
partitions = 1
"""


def _ratings_csv(target: Path) -> Path:
    """MovieLens-100k's ratings as a plain file: user, item, time, rating, like (rating >= 4)."""
    inter = find_data_dir() / "ml-100k.inter"
    rows = inter.read_text().splitlines()[1:]
    lines = ["user_id,item_id,timestamp,rating,like"]
    for row in rows:
        user, item, rating, ts = row.split("\t")
        lines.append(f"{user},{item},{int(float(ts))},{rating},{int(float(rating) >= 4)}")
    target.write_text("\n".join(lines) + "\n")
    return target


def test_default_models_on_a_real_ratings_file(tmp_path):
    """Default teacher and students. In memory on one partition the labels lead `none` by
    0.77% and aux gains 0.04% (four partitions, three orders: +0.66% to +0.72%, aux +0.01% to
    +0.16%)."""
    try:
        csv = _ratings_csv(tmp_path / "ratings.csv")
    except ConfigError as exc:  # the data ships in the recbole wheel
        pytest.skip(f"MovieLens-100k is not installed: {exc}")
    config = tmp_path / "ratings.toml"
    config.write_text(CONFIG.format(path=csv))
    _done, r = _up(tmp_path, "--source", "file", "--config", str(config))
    assert r["examples_produced"] == 100_000
    g = _gains(r, "like")
    assert g["lead"] >= 0.5, g
    assert g["aux"] >= -0.25, g  # never worse beyond the order-to-order spread (the gate)
    assert r["students"]["aux"]["gate"]["like"]["enabled"]
    assert "rating" not in r["students"]["aux"]["gate"]  # binary tasks only, by default
