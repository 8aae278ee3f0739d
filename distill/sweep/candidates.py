"""The candidates file of ``distill sweep``: teacher model settings to race, with grids
expanded and every entry checked against ``ModelConfig``."""

from __future__ import annotations

import itertools
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from distill.core.config import ModelConfig
from distill.core.exceptions import ConfigError

# -- candidates ----------------------------------------------------------------------------

_MODEL_FIELDS = [f for f in ModelConfig.model_fields if f != "kind"]


class _Entry(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, pattern=r"^\S+$")
    model: dict[str, Any] = Field(default_factory=dict)


class _CandidatesFile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    candidates: list[_Entry] = Field(default_factory=list)
    grid: dict[str, list[Any]] = Field(default_factory=dict)


@dataclass(frozen=True)
class Candidate:
    name: str
    model: ModelConfig


def _read_candidates_file(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"candidates file {path} does not exist; pass one with --candidates")
    try:
        if path.suffix == ".toml":
            data = tomllib.loads(path.read_text())
        elif path.suffix in (".yaml", ".yml"):
            data = yaml.safe_load(path.read_text()) or {}
        else:
            raise ConfigError(f"candidates file {path}: use a .toml, .yaml or .yml file")
    except (tomllib.TOMLDecodeError, yaml.YAMLError) as exc:
        kind = path.suffix[1:].upper()
        raise ConfigError(f"candidates file {path} is not valid {kind}: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"candidates file {path}: the top level must be a table")
    return data


def _entry_error(err: dict, loc: str) -> str:
    if err["type"] == "extra_forbidden" and len(err["loc"]) == 3 and err["loc"][0] == "candidates":
        return f"{loc}: unknown key; a candidate has a `name` and a `model` table, e.g. model = {{ hidden = [128] }}"
    if err["type"] == "extra_forbidden":
        return f"{loc}: unknown key; allowed: candidates, grid"
    return f"{loc}: {err['msg']}"


def _model_errors(exc: ValidationError, where: str) -> list[str]:
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"])
        if err["type"] == "extra_forbidden":
            msg = f"unknown field; a teacher model takes {', '.join(_MODEL_FIELDS)}"
        else:
            got = f" (got {err['input']!r})" if err["type"] == "literal_error" else ""
            msg = err["msg"] + got
        lines.append(f"{where}.model.{loc}: {msg}")
    return lines


def _short(value: Any) -> str:
    return "x".join(str(v) for v in value) if isinstance(value, list) else str(value)


def load_candidates(path: Path, base: ModelConfig) -> list[Candidate]:
    """Candidates from a TOML or YAML file: ``[[candidates]]`` entries (a name and a partial
    teacher model) and/or a ``[grid]`` of model fields, each a list of values (every
    combination is a candidate). Each model is merged over ``base`` (the config's teacher)."""
    data = _read_candidates_file(path)
    try:
        spec = _CandidatesFile.model_validate(data)
    except ValidationError as exc:
        lines = [_entry_error(e, ".".join(str(p) for p in e["loc"])) for e in exc.errors()]
        raise ConfigError(f"candidates file {path} is invalid:\n  " + "\n  ".join(lines)) from None
    entries = [(f"candidates[{i}] ({e.name!r})", e.name, e.model) for i, e in enumerate(spec.candidates)]
    errors: list[str] = []
    for key, values in spec.grid.items():
        if key not in _MODEL_FIELDS:
            errors.append(f"grid.{key}: not a teacher model field; use {', '.join(_MODEL_FIELDS)}")
        elif not values:
            errors.append(f"grid.{key}: give at least one value")
    if not errors and spec.grid:
        keys = list(spec.grid)
        for combo in itertools.product(*(spec.grid[k] for k in keys)):
            name = ",".join(f"{k}={_short(v)}" for k, v in zip(keys, combo, strict=True))
            entries.append((f"grid ({name!r})", name, dict(zip(keys, combo, strict=True))))
    if not entries and not errors:
        errors.append(
            "no candidates: add [[candidates]] entries (a name and a partial teacher model) or a [grid] table"
        )
    out: list[Candidate] = []
    seen: dict[str, str] = {}
    for where, name, partial in entries:
        if name in seen:
            errors.append(f"{where}: the name {name!r} is taken by {seen[name]}; names are unique")
            continue
        seen[name] = where
        try:
            model = ModelConfig.model_validate(base.model_dump() | partial)
        except ValidationError as exc:
            errors += _model_errors(exc, where)
            continue
        if model.kind != "ranking":
            errors.append(f"{where}.model.kind: a {model.kind!r} teacher learns nothing; sweep ranking models only")
            continue
        out.append(Candidate(name, model))
    if errors:
        raise ConfigError(f"candidates file {path} is invalid:\n  " + "\n  ".join(errors))
    return out
