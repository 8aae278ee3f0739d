"""The registry of sources: build one by name, the presets and the check that a source's
columns are the ones the configuration declares.

The interface every source shares (``Chunk``, ``Source``, ``ArraySource``) lives in
``producers.source``; it is re-exported here for the callers that import it from this module.
"""

from __future__ import annotations

import os
import tomllib
from importlib import resources
from pathlib import Path
from typing import Any

from distill.config import Config, load_config, read_file
from distill.exceptions import ConfigError
from producers.file import FileSource
from producers.movielens import MovieLensSource
from producers.source import ArraySource, Chunk, Source
from producers.synthetic import SyntheticSource

__all__ = [
    "PRESETS",
    "SOURCES",
    "ArraySource",
    "Chunk",
    "Source",
    "check_columns",
    "load_config_for",
    "make_source",
    "preset_overrides",
]

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
    problems = []
    if config.features.categorical_names != source.categorical_names:
        problems.append(
            f"features.categorical is {config.features.categorical_names}, the source has {source.categorical_names}"
        )
    if list(config.features.dense) != list(source.dense_names):
        problems.append(f"features.dense is {list(config.features.dense)}, the source has {source.dense_names}")
    cfg_tasks = [(t.name, t.type) for t in config.tasks]
    src_tasks = list(zip(source.task_names, source.task_types, strict=True))
    if cfg_tasks != src_tasks:
        problems.append(f"tasks are {cfg_tasks}, the source has {src_tasks}")
    if problems:
        hint = (
            f"load the preset (distill/presets/{source.name}.toml, or producers.preset_overrides({source.name!r}))"
            if source.name in PRESETS
            else "make the [features] and [tasks] sections match the [file] mapping"
        )
        raise ConfigError(f"the config does not match the {source.name} source: " + "; ".join(problems) + f"; {hint}")


# -- presets --------------------------------------------------------------------------------
PRESETS = ("synthetic", "movielens")


def preset_overrides(source: str) -> dict[str, Any]:
    """The config sections (features, tasks) of a built-in source, from ``distill/presets``.

    Pass them as keyword overrides to ``load_config`` or use ``load_config_for``.
    """
    if source not in PRESETS:
        raise ConfigError(
            f"no preset for source {source!r}; presets exist for {list(PRESETS)}. "
            "A file source takes its columns from the [features] and [tasks] sections."
        )
    text = resources.files("distill").joinpath("presets", f"{source}.toml").read_text()
    return tomllib.loads(text)


def load_config_for(source: str, path: str | Path | None = None, **overrides: Any) -> Config:
    """``load_config`` with the source's preset underneath: the preset fills ``features`` and
    ``tasks`` unless the config file or the environment sets them."""
    preset = preset_overrides(source) if source in PRESETS else {}
    if path is None and os.environ.get("DISTILL_CONFIG"):
        path = os.environ["DISTILL_CONFIG"]
    from_file = read_file(Path(path)) if path else {}
    env_keys = {k[len("DISTILL_") :].lower().split("__")[0] for k in os.environ if k.startswith("DISTILL_")}
    base = {k: v for k, v in preset.items() if k not in from_file and k not in env_keys and k not in overrides}
    return load_config(path, **base, **overrides)
