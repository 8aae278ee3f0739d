"""The registry of sources: build one by name, and check that a source's columns are the
ones the configuration declares. The presets live in ``distill.core.presets``; the interface
every source shares (``Chunk``, ``Source``, ``ArraySource``) in ``producers.source``.
"""

from __future__ import annotations

from typing import Any

from distill.core.config import Config
from distill.core.exceptions import ConfigError
from distill.core.layout import layout_problems
from distill.core.presets import PRESETS
from producers.file import FileSource
from producers.movielens import MovieLensSource
from producers.source import ArraySource, Chunk, Source
from producers.synthetic import SyntheticSource

__all__ = ["SOURCES", "ArraySource", "Chunk", "Source", "check_columns", "make_source"]

SOURCES = ("synthetic", "movielens", "file")


def make_source(config: Config, source: str, **options: Any) -> Source:
    """Build the named source from its config section. ``options`` go to the source
    (for example ``data_dir`` for movielens)."""
    if source == "synthetic":
        return SyntheticSource(config.synthetic, **options)
    if source == "movielens":
        return MovieLensSource(**options)
    if source == "file":
        return FileSource(
            config.file,
            task_names=[t.name for t in config.tasks],
            task_types=[t.type for t in config.tasks],
            **options,
        )
    raise ConfigError(f"unknown source {source!r}; choose one of {list(SOURCES)}")


def check_columns(config: Config, source: Source) -> None:
    """The batches must carry exactly the columns the config declares, in its order:
    the teacher and the students build their models from the config."""
    tasks = list(zip(source.task_names, source.task_types, strict=True))
    problems = layout_problems(config, source.categorical_names, source.dense_names, tasks, "the source")
    if problems:
        hint = (
            f"load the preset (distill/core/presets/{source.name}.toml, or producers.preset_overrides({source.name!r}))"
            if source.name in PRESETS
            else "make the [features] and [tasks] sections match the [file] mapping"
        )
        raise ConfigError(f"the config does not match the {source.name} source: " + "; ".join(problems) + f"; {hint}")
