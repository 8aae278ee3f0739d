"""Synthetic multi-task recommendation events from latent user and item factors, with drift.

The true click logit of user u, item i and context x is

    1.5 * <U_u, V_i> / sqrt(k)          user-item affinity (a model needs both embeddings)
  + (x W) . V_i / sqrt(k)               context x item-factor interaction
  + 0.6 * x_0 * x_1                     a dense feature cross
  + 0.5 * pop_i                         item popularity bias (drifts)
  + b_u - 2.0                           user bias, intercept

so a model with embeddings and crosses beats one that only learns per-id rates. ``click`` is a
Bernoulli draw from sigmoid(logit); ``watch`` is the watched fraction: 0 without a click,
otherwise a Beta draw around a mean that shares the affinity. The true probability and the true
expected watch travel in the ``truth`` column (evaluation only), so a teacher's soft label can
carry more than the hard label does.

Drift, all on the schedule of ``SyntheticConfig``:
- every ``popularity_shift_every`` examples, item and item-group popularity take an AR(1) step
  (which items are shown and how often they are clicked both move);
- every ``new_items_every`` examples, a slice of not-yet-seen items appears (half the catalogue
  is there at the start) with a popularity boost;
- every ``concept_change_every`` examples, the first half of the item factors is rotated.

Every value is a function of (seed, position): a block of ``BLOCK`` examples draws from its own
generator, and the drift state of an epoch is derived from the seed. The stream is the same
however it is chunked, and resuming at any position costs nothing.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np

from distill.core.config import SyntheticConfig
from producers.source import Chunk, Source

BLOCK = 1024
NUM_GROUPS = 20
START_MS = 1_700_000_000_000  # 2023-11-14, a fixed start so event times are reproducible
GAP_MS = 50  # mean time between events
WATCH_CONCENTRATION = 4.0

# Streams of the seed sequence: one per kind of draw, so adding a kind never shifts another.
_STATIC, _BLOCK, _POP, _ROT = 0, 1, 2, 3


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-z))


class SyntheticSource(Source):
    name = "synthetic"
    categorical_names = ["user_id", "item_id", "item_group"]
    task_names = ["click", "watch"]
    task_types = ["binary", "regression"]

    def __init__(self, cfg: SyntheticConfig | None = None):
        self.cfg = cfg = cfg or SyntheticConfig()
        self.dense_names = [f"ctx{i}" for i in range(cfg.dense_dim)]
        k, d = cfg.latent_dim, cfg.dense_dim
        self.k, self.d = k, d
        rng = np.random.default_rng([cfg.seed, _STATIC])
        self.user_factors = rng.standard_normal((cfg.num_users, k))
        self.user_bias = 0.3 * rng.standard_normal(cfg.num_users)
        self.user_patience = 0.5 * rng.standard_normal(cfg.num_users)
        self.item_factors = rng.standard_normal((cfg.num_items, k))
        self.item_length = 0.5 * rng.standard_normal(cfg.num_items)  # long items are watched less
        self.num_groups = min(NUM_GROUPS, cfg.num_items)
        self.item_group = rng.integers(0, self.num_groups, cfg.num_items)
        self.ctx_item = rng.standard_normal((d, k)) / math.sqrt(max(d, 1))
        self.ctx_watch = rng.standard_normal((d, k)) / math.sqrt(max(d, 1))
        # A few heavy users and a long tail, as in real logs.
        activity = 1.0 / (np.arange(cfg.num_users) + 10.0) ** 0.8
        activity = activity[rng.permutation(cfg.num_users)]
        self.user_cdf = np.cumsum(activity) / activity.sum()
        # Catalogue growth: half the items at the start, the rest in equal slices.
        self.initial_items = max(1, cfg.num_items // 2)
        launches = max(1, cfg.examples // cfg.new_items_every)
        self.items_per_launch = max(1, math.ceil((cfg.num_items - self.initial_items) / launches))
        self._pop_cache: tuple[int, np.ndarray, np.ndarray] | None = None
        self._rot_cache: tuple[int, np.ndarray] | None = None
        self._cdf_cache: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}

    @property
    def total(self) -> int:
        return self.cfg.examples

    # -- drift state, a pure function of the epoch ------------------------------------------
    def popularity(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(group popularity, item popularity) after ``epoch`` AR(1) steps."""
        cached = self._pop_cache
        if cached is None or cached[0] > epoch:
            rng = np.random.default_rng([self.cfg.seed, _POP, 0])
            cached = (
                0,
                rng.standard_normal(self.num_groups),
                rng.standard_normal(self.cfg.num_items),
            )
        e, group, item = cached
        while e < epoch:
            e += 1
            rng = np.random.default_rng([self.cfg.seed, _POP, e])
            group = 0.3 * group + math.sqrt(1 - 0.3**2) * rng.standard_normal(self.num_groups)
            item = 0.8 * item + 0.6 * rng.standard_normal(self.cfg.num_items)
        self._pop_cache = (e, group, item)
        return group, item

    def rotation(self, epoch: int) -> np.ndarray:
        """The cumulative rotation of the first half of the item factors after ``epoch`` changes."""
        r = max(1, self.k // 2)
        cached = self._rot_cache
        if cached is None or cached[0] > epoch:
            cached = (0, np.eye(r))
        e, rot = cached
        while e < epoch:
            e += 1
            q, upper = np.linalg.qr(np.random.default_rng([self.cfg.seed, _ROT, e]).standard_normal((r, r)))
            rot = rot @ (q * np.sign(np.diag(upper)))  # sign fix: a uniformly random rotation
        self._rot_cache = (e, rot)
        return rot

    def active_items(self, launch: int) -> int:
        return min(self.cfg.num_items, self.initial_items + launch * self.items_per_launch)

    def _exposure(self, pop_epoch: int, launch: int) -> tuple[np.ndarray, np.ndarray]:
        """(cdf of the item draw over the active items, popularity of every item)."""
        key = (pop_epoch, launch)
        if key not in self._cdf_cache:
            group, item = self.popularity(pop_epoch)
            n = self.active_items(launch)
            pop = group[self.item_group] + item
            # Items of the latest launch are promoted: new things get shown and clicked.
            fresh = np.zeros(self.cfg.num_items)
            if launch > 0:
                fresh[self.active_items(launch - 1) : n] = 1.0
            pop = pop + fresh
            weights = np.exp(pop[:n] - pop[:n].max())
            cdf = np.cumsum(weights) / weights.sum()
            if len(self._cdf_cache) > 8:
                self._cdf_cache.clear()
            self._cdf_cache[key] = (cdf, pop)
        return self._cdf_cache[key]

    # -- generation --------------------------------------------------------------------------
    def block(self, index: int) -> Chunk:
        """Examples ``index * BLOCK`` .. ``(index + 1) * BLOCK - 1``, cut at the stream's end."""
        cfg = self.cfg
        lo = index * BLOCK
        n = max(0, min(BLOCK, cfg.examples - lo))
        pos = np.arange(lo, lo + n, dtype=np.int64)
        rng = np.random.default_rng([cfg.seed, _BLOCK, index])
        # Every draw is made for the whole block in a fixed order: determinism does not
        # depend on where the drift epochs cut the block.
        users = np.searchsorted(self.user_cdf, rng.random(n), side="right").clip(0, cfg.num_users - 1)
        u_item = rng.random(n)
        x = rng.standard_normal((n, self.d))
        u_click = rng.random(n)
        jitter = rng.random(n)

        items = np.empty(n, dtype=np.int64)
        pop = np.empty(n)
        rot_first = np.empty((n, max(1, self.k // 2)))
        pop_epoch = pos // cfg.popularity_shift_every
        launch = pos // cfg.new_items_every
        concept = pos // cfg.concept_change_every
        # Epochs only grow with the position: each (popularity, launch, concept) state is one
        # contiguous run of rows, usually the whole block.
        change = (np.diff(pop_epoch) != 0) | (np.diff(launch) != 0) | (np.diff(concept) != 0)
        starts = np.concatenate([[0], np.flatnonzero(change) + 1, [n]])
        r = max(1, self.k // 2)
        for a, b in zip(starts[:-1], starts[1:], strict=True):
            rows = slice(int(a), int(b))
            cdf, item_pop = self._exposure(int(pop_epoch[a]), int(launch[a]))
            chosen = np.searchsorted(cdf, u_item[rows], side="right").clip(0, len(cdf) - 1)
            items[rows] = chosen
            pop[rows] = item_pop[chosen]
            rot_first[rows] = self.item_factors[chosen, :r] @ self.rotation(int(concept[a]))
        v = self.item_factors[items].copy()
        v[:, :r] = rot_first
        u = self.user_factors[users]
        sk = math.sqrt(self.k)

        affinity = (u * v).sum(axis=1) / sk
        context = ((x @ self.ctx_item) * v).sum(axis=1) / sk if self.d else np.zeros(n)
        cross = 0.6 * x[:, 0] * x[:, 1] if self.d >= 2 else np.zeros(n)
        logit = 1.5 * affinity + context + cross + 0.5 * pop + self.user_bias[users] - 2.0
        p_click = _sigmoid(logit)
        click = (u_click < p_click).astype(np.float32)

        watch_ctx = ((x @ self.ctx_watch) * v).sum(axis=1) / sk if self.d else np.zeros(n)
        watch_mean = _sigmoid(
            0.8 * affinity + 0.7 * watch_ctx + self.user_patience[users] - self.item_length[items] + 0.3
        )
        watched = rng.beta(watch_mean * WATCH_CONCENTRATION, (1 - watch_mean) * WATCH_CONCENTRATION)
        watch = np.where(click > 0, watched, 0.0)

        return Chunk(
            positions=pos,
            event_time_ms=START_MS + pos * GAP_MS + np.floor(jitter * GAP_MS).astype(np.int64),
            example_ids=pos.copy(),
            users=users.astype(np.int64),
            categorical=np.stack([users, items, self.item_group[items]], axis=1).astype(np.int64),
            dense=x.astype(np.float32),
            labels=np.stack([click, watch], axis=1).astype(np.float32),
            truth=np.stack([p_click, p_click * watch_mean], axis=1).astype(np.float32),
        )

    def chunks(self, start: int = 0, size: int = BLOCK) -> Iterator[Chunk]:
        pos = max(0, start)
        while pos < self.cfg.examples:
            index = pos // BLOCK
            block = self.block(index)
            offset = pos - index * BLOCK
            while offset < len(block):
                part = block.take(slice(offset, offset + size))
                offset += len(part)
                pos += len(part)
                yield part
