"""The built-in sources' presets (``<source>.toml`` beside this file: their features and tasks)
and the config loader that puts a preset underneath a user's file and environment."""

from __future__ import annotations

import os
import tomllib
from importlib import resources
from pathlib import Path
from typing import Any

from distill.core.config import Config, load_config, read_file
from distill.core.exceptions import ConfigError

PRESETS = ("synthetic", "movielens")


def preset_overrides(source: str) -> dict[str, Any]:
    """The config sections (features, tasks) of a built-in source.

    Pass them as keyword overrides to ``load_config`` or use ``load_config_for``.
    """
    if source not in PRESETS:
        raise ConfigError(
            f"no preset for source {source!r}; presets exist for {list(PRESETS)}. "
            "A file source takes its columns from the [features] and [tasks] sections."
        )
    return tomllib.loads(resources.files(__package__).joinpath(f"{source}.toml").read_text())


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
