"""Presets and the config loader that puts a source's preset under the config file."""

from __future__ import annotations

import os

import pytest

from distill.core.config import Config
from distill.core.exceptions import ConfigError
from distill.core.presets import load_config_for, preset_overrides
from producers.sources import SOURCES, make_source


@pytest.fixture(autouse=True)
def no_distill_env(monkeypatch):
    for key in [k for k in os.environ if k.startswith("DISTILL_")]:
        monkeypatch.delenv(key)


def test_synthetic_preset_is_the_default_layout():
    cfg = load_config_for("synthetic")
    assert cfg.features == Config().features and cfg.tasks == Config().tasks


def test_preset_fills_only_what_the_file_does_not_set(tmp_path):
    cfg = load_config_for("movielens", topics={"partitions": 8})
    assert cfg.tasks[0].name == "like" and cfg.features.categorical_names[2] == "age_bucket"
    assert cfg.topics.partitions == 8
    path = tmp_path / "c.toml"
    path.write_text(
        '[[tasks]]\nname = "like"\n[[tasks]]\nname = "rating"\ntype = "regression"\n[topics]\npartitions = 3\n'
    )
    cfg = load_config_for("movielens", path)
    assert [t.name for t in cfg.tasks] == ["like", "rating"]
    assert "genre_action" in cfg.features.dense and cfg.topics.partitions == 3
    # Keyword overrides win over the preset too.
    cfg = load_config_for("movielens", tasks=[{"name": "like"}])
    assert [t.name for t in cfg.tasks] == ["like"]


def test_unknown_source_and_preset():
    assert SOURCES == ("synthetic", "movielens", "file")
    with pytest.raises(ConfigError, match=r"no preset for source 'file'"):
        preset_overrides("file")
    with pytest.raises(ConfigError, match=r"unknown source 'kafka'; choose one of"):
        make_source(Config(), "kafka")
    load_config_for("file")  # no preset: plain load_config
