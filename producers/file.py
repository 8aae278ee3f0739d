"""Replay any CSV or Parquet file with the column mapping of the ``[file]`` config section.

The file is read once into numpy columns, so it must fit in memory (sorting by event time
needs all of it anyway):
- categorical columns: integers as they are, anything else hashed to a stable int64
  (blake2b of the text, the same on every machine and run);
- dense and label columns: float32; a label that is not a finite number is refused;
- event time: integers or floats (values below 1e11 are taken as seconds, others as ms) or
  ISO-8601 text; without an event-time column every row gets the load time;
- example id: an integer column with unique values, or the row number when not mapped;
- user (the partitioning key): the mapped column hashed like a categorical one, or the example
  id when not mapped.
Parquet needs pyarrow; CSV needs nothing beyond the standard library and numpy.
"""

from __future__ import annotations

import csv
import hashlib
import time
from pathlib import Path

import numpy as np

from distill.core.config import FileSourceConfig
from distill.core.exceptions import ConfigError
from producers.source import ArraySource

PARQUET_HINT = "pip install 'pyarrow>=14' (or: pip install 'online-distill[parquet]')"
SECONDS_BELOW = 100_000_000_000  # 1e11 s is year 5138; 1e11 ms is 1973


def text_id(text: str) -> int:
    """The stable int64 id of a text value (the events source maps text the same way)."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") & (2**63 - 1)


def check_label_tasks(labels: dict[str, str], task_names: list[str], key: str, what: str) -> None:
    """``labels`` (the config's ``key``) must map every configured task to a ``what`` (column,
    field) and nothing else; the records of a file and of the events source map alike."""
    unknown = [n for n in task_names if n not in labels]
    extra = [n for n in labels if n not in task_names]
    if unknown or extra:
        raise ConfigError(
            f"{key} maps tasks {list(labels)} but [tasks] declares {task_names}; "
            f"map every configured task to a {what} and nothing else"
        )


def _hash_text(values: np.ndarray) -> np.ndarray:
    """Stable int64 ids for text: hash each distinct value once."""
    uniq, inverse = np.unique(values.astype(str), return_inverse=True)
    hashed = np.array([text_id(v) for v in uniq], dtype=np.int64)
    return hashed[inverse.reshape(-1)]


def _as_int_or_hash(values: np.ndarray) -> np.ndarray:
    if values.dtype.kind in "iub":
        return values.astype(np.int64)
    if values.dtype.kind == "f" and np.isfinite(values).all() and (values == np.round(values)).all():
        return values.astype(np.int64)
    if values.dtype.kind in "US" or values.dtype == object:
        try:
            return np.asarray(values, dtype=np.int64)
        except (ValueError, TypeError, OverflowError):
            pass
    return _hash_text(values)


def _as_float(values: np.ndarray, column: str, path: Path) -> np.ndarray:
    try:
        return np.asarray(
            np.where(values == "", "nan", values) if values.dtype.kind in "US" else values,
            dtype=np.float64,
        )
    except (ValueError, TypeError) as exc:
        raise ConfigError(
            f"column {column!r} of {path} is not numeric ({exc}); map only numeric columns as dense features or labels"
        ) from None


def _event_time_ms(values: np.ndarray, column: str, path: Path) -> np.ndarray:
    if values.dtype.kind == "M":
        return values.astype("datetime64[ms]").astype(np.int64)
    try:
        numeric = np.asarray(values, dtype=np.float64)
    except (ValueError, TypeError):
        try:
            return np.asarray(values, dtype="datetime64[ms]").astype(np.int64)
        except (ValueError, TypeError) as exc:
            raise ConfigError(
                f"event-time column {column!r} of {path} is neither a number nor ISO-8601 text "
                f"({exc}); map a column of epoch seconds, epoch ms or ISO timestamps"
            ) from None
    if not np.isfinite(numeric).all():
        raise ConfigError(f"event-time column {column!r} of {path} has empty or non-finite values")
    if numeric.size and np.abs(numeric).max() < SECONDS_BELOW:
        numeric = numeric * 1000.0
    return np.round(numeric).astype(np.int64)


def _read_csv(path: Path, wanted: dict[str, str]) -> tuple[list[str], dict[str, np.ndarray]]:
    delimiter = "\t" if path.suffix.lower() in (".tsv", ".tab") else ","
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f, delimiter=delimiter)
        header = next(reader, None)
        if header is None:
            raise ConfigError(f"file {path} is empty; it needs a header row naming its columns")
        header = [h.strip() for h in header]
        _check_columns(path, header, wanted)
        index = [header.index(c) for c in wanted]
        rows = [[row[i] if i < len(row) else "" for i in index] for row in reader if row]
    if not rows:
        return header, {c: np.array([], dtype=str) for c in wanted}
    columns = list(zip(*rows, strict=True))
    return header, {c: np.array(col, dtype=str) for c, col in zip(wanted, columns, strict=True)}


def _read_parquet(path: Path, wanted: dict[str, str]) -> tuple[list[str], dict[str, np.ndarray]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ConfigError(f"reading the Parquet file {path} needs pyarrow; install it with: {PARQUET_HINT}") from None
    header = list(pq.read_schema(path).names)
    _check_columns(path, header, wanted)
    table = pq.read_table(path, columns=list(wanted))
    out = {}
    for c in wanted:
        col = table.column(c)
        arr = col.to_numpy()
        out[c] = arr.astype(str) if arr.dtype == object else arr
    return header, out


def _check_columns(path: Path, header: list[str], wanted: dict[str, str]) -> None:
    """``wanted`` maps each column to the config key that names it, for the error message."""
    missing = [c for c in wanted if c not in header]
    if missing:
        also = f" (nor are {missing[1:]})" if len(missing) > 1 else ""
        raise ConfigError(
            f"column {missing[0]!r} ({wanted[missing[0]]}) is not in {path}{also}; "
            f"the file has columns {header}. Fix the mapping in the [file] section "
            "or point file.path at the right file."
        )


class FileSource(ArraySource):
    name = "file"

    def __init__(
        self,
        cfg: FileSourceConfig,
        task_names: list[str] | None = None,
        task_types: list[str] | None = None,
    ):
        if cfg.path is None:
            raise ConfigError("the file source needs file.path: set it in the [file] section to a CSV or Parquet file")
        path = Path(cfg.path)
        if not path.is_file():
            raise ConfigError(
                f"file {path} (file.path) does not exist; set file.path to an existing CSV or Parquet file"
            )
        if not cfg.labels:
            raise ConfigError('file.labels is empty: map each task to a column, e.g. labels = {click = "clicked"}')
        fmt = cfg.format
        if fmt == "auto":
            fmt = "parquet" if path.suffix.lower() in (".parquet", ".pq") else "csv"
        self.path, self.format, self.cfg = path, fmt, cfg
        # Tasks in the config's order when given, so the batches match [tasks].
        names = list(task_names) if task_names else list(cfg.labels)
        check_label_tasks(cfg.labels, names, "file.labels", "column")
        self.task_names = names
        self.categorical_names = list(cfg.categorical)
        self.dense_names = list(cfg.dense)
        self._load()
        # Without [tasks] to follow, a 0/1 column is a binary task, anything else regression.
        self.task_types = (
            list(task_types)
            if task_types
            else ["binary" if np.isin(self.labels[:, j], (0.0, 1.0)).all() else "regression" for j in range(len(names))]
        )

    def _load(self) -> None:
        cfg, path = self.cfg, self.path
        label_cols = [cfg.labels[n] for n in self.task_names]
        wanted: dict[str, str] = {}
        for key, column in (
            ("example_id", cfg.example_id),
            ("event_time", cfg.event_time),
            ("user", cfg.user),
        ):
            if column:
                wanted.setdefault(column, f"file.{key}")
        for key, columns in (("categorical", self.categorical_names), ("dense", self.dense_names)):
            for column in columns:
                wanted.setdefault(column, f"file.{key}")
        for task, column in zip(self.task_names, label_cols, strict=True):
            wanted.setdefault(column, f"file.labels.{task}")
        reader = _read_parquet if self.format == "parquet" else _read_csv
        _header, cols = reader(path, wanted)
        n = len(next(iter(cols.values()))) if cols else 0

        if cfg.example_id:
            ids = cols[cfg.example_id]
            try:
                ids = np.asarray(ids, dtype=np.int64)
            except (ValueError, TypeError):
                raise ConfigError(
                    f"example-id column {cfg.example_id!r} of {path} is not integer; "
                    "map an integer "
                    "column or leave file.example_id empty to number the rows"
                ) from None
            uniq, counts = np.unique(ids, return_counts=True)
            if (counts > 1).any():
                raise ConfigError(
                    f"example-id column {cfg.example_id!r} of {path} repeats values "
                    f"(e.g. {int(uniq[counts > 1][0])}); map a unique column or leave "
                    "file.example_id empty to number the rows"
                )
        else:
            ids = np.arange(n, dtype=np.int64)
        if cfg.event_time:
            times = _event_time_ms(cols[cfg.event_time], cfg.event_time, path)
        else:
            times = np.full(n, int(time.time() * 1000), dtype=np.int64)
        categorical = (
            np.stack([_as_int_or_hash(cols[c]) for c in self.categorical_names], axis=1)
            if self.categorical_names
            else np.zeros((n, 0), dtype=np.int64)
        )
        dense = (
            np.stack([_as_float(cols[c], c, path) for c in self.dense_names], axis=1).astype(np.float32)
            if self.dense_names
            else np.zeros((n, 0), dtype=np.float32)
        )
        labels = np.stack([_as_float(cols[c], c, path) for c in label_cols], axis=1) if label_cols else np.zeros((n, 0))
        bad = ~np.isfinite(labels)
        if bad.any():
            j = int(np.flatnonzero(bad.any(axis=0))[0])
            raise ConfigError(
                f"label column {label_cols[j]!r} of {path} has {int(bad[:, j].sum())} empty or "
                "non-finite values; every example needs a label for every task"
            )
        users = _as_int_or_hash(cols[cfg.user]) if cfg.user else ids

        order = np.argsort(times, kind="stable") if cfg.sort_by_time else np.arange(n)
        self.event_time_ms = times[order]
        self.example_ids = ids[order]
        self.users = users[order]
        self.categorical = categorical[order]
        self.dense = dense[order]
        self.labels = labels[order].astype(np.float32)
