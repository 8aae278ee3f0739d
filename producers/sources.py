"""What every source shares: the column chunk, the source interface, presets and the check that
a source's columns are the ones the configuration declares.

A source is a finite or endless stream of examples in event-time order. Each example has a
*position* (0, 1, 2, ... in stream order) that never changes for a given source and settings;
resuming a replay means asking for the chunks from a position on.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from distill.config import Config, load_config, read_file
from distill.exceptions import ConfigError

SOURCES = ("synthetic", "movielens", "file")


@dataclass
class Chunk:
    """Consecutive examples of a stream, column by column (not yet a wire batch)."""

    positions: np.ndarray  # int64[n] stream positions
    event_time_ms: np.ndarray  # int64[n]
    example_ids: np.ndarray  # int64[n]
    users: np.ndarray  # int64[n] the partitioning key
    categorical: np.ndarray  # int64[n, k]
    dense: np.ndarray  # float32[n, d]
    labels: np.ndarray  # float32[n, t]
    truth: np.ndarray | None = None  # float32[n, t]

    def __len__(self) -> int:
        return int(self.positions.shape[0])

    def take(self, rows: np.ndarray | slice) -> Chunk:
        return Chunk(
            positions=self.positions[rows],
            event_time_ms=self.event_time_ms[rows],
            example_ids=self.example_ids[rows],
            users=self.users[rows],
            categorical=self.categorical[rows],
            dense=self.dense[rows],
            labels=self.labels[rows],
            truth=None if self.truth is None else self.truth[rows],
        )

    @staticmethod
    def concat(parts: list[Chunk]) -> Chunk:
        if len(parts) == 1:
            return parts[0]
        truth = None if any(p.truth is None for p in parts) else np.concatenate([p.truth for p in parts])
        return Chunk(
            positions=np.concatenate([p.positions for p in parts]),
            event_time_ms=np.concatenate([p.event_time_ms for p in parts]),
            example_ids=np.concatenate([p.example_ids for p in parts]),
            users=np.concatenate([p.users for p in parts]),
            categorical=np.concatenate([p.categorical for p in parts]),
            dense=np.concatenate([p.dense for p in parts]),
            labels=np.concatenate([p.labels for p in parts]),
            truth=truth,
        )


class Source:
    """Base of the sources. Subclasses set the column names and implement ``chunks``."""

    name: str = "source"
    categorical_names: list[str]
    dense_names: list[str]
    task_names: list[str]
    task_types: list[str]

    @property
    def total(self) -> int | None:
        """Number of examples in the stream, None when it has no end."""
        return None

    def chunks(self, start: int = 0, size: int = 1024) -> Iterator[Chunk]:
        """Examples from position ``start`` on, in order, at most ``size`` rows per chunk."""
        raise NotImplementedError

    def config_sections(self) -> dict[str, Any]:
        """The ``features`` and ``tasks`` config sections that describe this source's columns.

        Bucket sizes are not known here; a preset or the config file sets them.
        """
        return {
            "features": {
                "categorical": [{"name": n} for n in self.categorical_names],
                "dense": list(self.dense_names),
            },
            "tasks": [{"name": n, "type": t} for n, t in zip(self.task_names, self.task_types, strict=True)],
        }


class ArraySource(Source):
    """A source held in memory as columns in stream order (the replays)."""

    event_time_ms: np.ndarray
    example_ids: np.ndarray
    users: np.ndarray
    categorical: np.ndarray
    dense: np.ndarray
    labels: np.ndarray

    @property
    def total(self) -> int:
        return int(self.example_ids.shape[0])

    def chunks(self, start: int = 0, size: int = 4096) -> Iterator[Chunk]:
        for lo in range(max(0, start), self.total, size):
            hi = min(lo + size, self.total)
            yield Chunk(
                positions=np.arange(lo, hi, dtype=np.int64),
                event_time_ms=self.event_time_ms[lo:hi],
                example_ids=self.example_ids[lo:hi],
                users=self.users[lo:hi],
                categorical=self.categorical[lo:hi],
                dense=self.dense[lo:hi],
                labels=self.labels[lo:hi],
            )


def make_source(config: Config, source: str, **options: Any) -> Source:
    """Build the named source from its config section. ``options`` go to the source
    (for example ``data_dir`` for movielens)."""
    if source == "synthetic":
        from producers.synthetic import SyntheticSource

        return SyntheticSource(config.synthetic, **options)
    if source == "movielens":
        from producers.movielens import MovieLensSource

        return MovieLensSource(**options)
    if source == "file":
        from producers.file import FileSource

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
