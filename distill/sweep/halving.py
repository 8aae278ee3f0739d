"""Successive halving within a budget: the search strategy of ``distill sweep``.

Torch-free: an *arm* is anything that can take a batch and report a loss on the current slice
and on everything so far (``distill.sweep.arms`` makes arms of a candidate teacher and its proxy
student). Every live arm processes the same batches in the same order, batch by batch, so a
budget that runs out in the middle of a rung still leaves the live arms comparable.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from distill.core.exceptions import ConfigError

log = logging.getLogger(__name__)

OBJECTIVES: tuple[str, ...] = ("gain", "gain-per-gflop", "gain-per-second")


# -- the plan ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rung:
    index: int  # -1: the warm-up
    start: int  # batch indices [start, end) of the window
    end: int
    examples: int
    candidates: int  # how many run this rung


@dataclass(frozen=True)
class Plan:
    first: int  # first batch used: older ones are left out to fit --budget-examples
    warmup: Rung | None  # every candidate trains, nothing is scored
    rungs: list[Rung]

    @property
    def cost(self) -> int:
        """Examples processed by candidates if every rung runs to its end."""
        steps = ([self.warmup] if self.warmup else []) + self.rungs
        return sum(r.examples * r.candidates for r in steps)


def rung_count(candidates: int) -> int:
    return max(1, math.ceil(math.log2(candidates))) if candidates > 1 else 1


def _cut(cum: np.ndarray, share: float) -> int:
    """How many leading batches hold ``share`` of the examples (rounded to a batch)."""
    return int(np.searchsorted(cum, cum[-1] * share, side="left")) + 1 if share > 0 else 0


def check_warmup(warmup: float) -> None:
    if not 0.0 <= warmup < 1.0:
        raise ConfigError(f"--warmup {warmup}: give the share of the window to warm up on, 0 (none) up to below 1")


def plan_rungs(sizes: Sequence[int], candidates: int, budget_examples: int | None = None, warmup: float = 0.0) -> Plan:
    """First a warm-up share of the window for every candidate, unscored: teachers start cold
    here while the live one is warm, and a cold teacher's labels can hurt a student for a long
    while before they help, so scoring from the first batch would prune late bloomers. Then
    the rungs: rung r is twice as long as rung r-1, and ``ceil(k/2)`` of its k candidates go on,
    so the last rung's better candidate is the winner. The slices tile the window (or, when
    ``budget_examples`` cannot pay for all of it, its newest part)."""
    check_warmup(warmup)
    rungs = rung_count(candidates)
    survivors = [candidates]
    for _ in range(rungs - 1):
        survivors.append(math.ceil(survivors[-1] / 2))
    weights = [2**r for r in range(rungs)]
    scored = sum(k * w for k, w in zip(survivors, weights, strict=True)) / sum(weights)
    per_example = warmup * candidates + (1 - warmup) * scored
    first = 0
    if budget_examples is not None:
        affordable, kept, first = budget_examples / per_example, 0, len(sizes)
        while first > 0 and kept + sizes[first - 1] <= affordable:
            first -= 1
            kept += sizes[first]
    cum = np.cumsum(np.asarray(sizes[first:], dtype=np.int64))
    warm = min(_cut(cum, warmup), len(cum) - rungs) if len(cum) else 0
    if len(cum) - max(warm, 0) < rungs or warm < 0:
        if budget_examples is not None and first > 0:
            need = math.ceil(per_example * (rungs + 1) * max(sizes))
            raise ConfigError(
                f"--budget-examples {budget_examples} cannot pay for {rungs} rung(s) of at least "
                f"one batch for {candidates} candidates; give at least {need} or fewer candidates"
            )
        raise ConfigError(
            f"the window has {len(cum)} batches, too few for {rungs} rungs of "
            f"halving over {candidates} candidates; widen the window or use fewer "
            "candidates"
        )

    def examples(a: int, b: int) -> int:
        return int(cum[b - 1] - (cum[a - 1] if a else 0)) if b > a else 0

    warm_rung = Rung(-1, first, first + warm, examples(0, warm), candidates) if warm else None
    rest = cum[warm:] - (cum[warm - 1] if warm else 0)
    out, prev = [], 0
    for r in range(rungs):
        end = len(rest)
        if r < rungs - 1:
            end = _cut(rest, (2 ** (r + 1) - 1) / sum(weights))
            end = max(prev + 1, min(end, len(rest) - (rungs - 1 - r)))
        out.append(Rung(r, first + warm + prev, first + warm + end, examples(warm + prev, warm + end), survivors[r]))
        prev = end
    return Plan(first, warm_rung, out)


# -- budget --------------------------------------------------------------------------------


class Budget:
    """Examples processed by candidates (the shared ``none`` student is not a candidate) and
    wall-clock seconds since ``started``. ``allows`` is asked before each step: the seconds
    budget uses the measured pace, so a step that would overrun is not started."""

    def __init__(
        self,
        examples: int | None = None,
        seconds: float | None = None,
        clock: Callable[[], float] = time.monotonic,
        started: float | None = None,
    ):
        if examples is not None and examples < 1:
            raise ConfigError(f"--budget-examples must be a positive number (got {examples})")
        if seconds is not None and seconds <= 0:
            raise ConfigError(f"--budget-seconds must be positive (got {seconds})")
        self.examples, self.seconds, self.clock = examples, seconds, clock
        self.started = clock() if started is None else started
        self.spent = 0
        self._pace: float | None = None  # seconds per example, recent

    def elapsed(self) -> float:
        return self.clock() - self.started

    def allows(self, examples: int) -> str | None:
        """None when ``examples`` more fit; else which budget would be exceeded."""
        if self.examples is not None and self.spent + examples > self.examples:
            return "examples"
        ahead = examples * (self._pace or 0.0)
        if self.seconds is not None and self.elapsed() + ahead > self.seconds:
            return "seconds"
        return None

    def spend(self, examples: int, seconds: float) -> None:
        self.spent += examples
        pace = seconds / max(examples, 1)
        self._pace = pace if self._pace is None else 0.7 * self._pace + 0.3 * pace

    def describe(self) -> dict[str, Any]:
        return {
            "examples": self.examples,
            "seconds": self.seconds,
            "spent_examples": self.spent,
            "spent_seconds": round(self.elapsed(), 3),
        }


# -- successive halving (models behind a small interface, so it is testable without torch) --


class Arm(Protocol):
    name: str

    def step(self, batch: Any) -> None: ...
    def new_slice(self) -> None: ...
    def slice_loss(self) -> float: ...
    def total_loss(self) -> float: ...
    def cost(self) -> dict[str, float]: ...  # gflop_per_1k, seconds_per_1k


def score(objective: str, gain: float, cost: dict[str, float]) -> float:
    if objective == "gain":
        return gain
    per = cost["gflop_per_1k"] if objective == "gain-per-gflop" else cost["seconds_per_1k"]
    return gain / per if per > 0 else float("nan")


@dataclass
class ArmResult:
    name: str
    examples: int = 0
    reached: int = -1  # index of the last rung it was scored on (-1: none)
    eliminated_at: int | None = None
    rungs: list[dict[str, Any]] = field(default_factory=list)

    @property
    def last_score(self) -> float:
        s = self.rungs[-1]["score"] if self.rungs else float("nan")
        return -math.inf if s is None or math.isnan(s) else s


@dataclass
class Halving:
    results: dict[str, ArmResult]
    ranking: list[str]  # best first
    stopped: str | None  # the budget that ran out, if one did
    baseline_total: dict[int, float]  # the none student's loss over everything, after each rung


def _rank_key(r: ArmResult) -> tuple:
    # Further is better; at the same rung a survivor beats the eliminated; then the score
    # (arms at the same rung were scored on the same batches).
    return (-r.reached, r.eliminated_at is not None, -r.last_score, r.name)


def successive_halving(
    arms: Sequence[Arm],
    baseline: Arm,
    sizes: Sequence[int],
    plan: Plan,
    budget: Budget,
    objective: str = "gain",
    prepare: Callable[[int], Any] = lambda i: i,
    on_step: Callable[[Rung, int], None] | None = None,
) -> Halving:
    """Run the plan: every live arm on every batch of a rung, in window order, batch by batch
    (so a budget that runs out mid-rung leaves the live arms on the same batches); then the
    better half by ``objective`` of the proxy's gain over ``baseline`` on the rung goes on."""
    results = {a.name: ArmResult(a.name) for a in arms}
    alive = list(arms)
    baseline_total: dict[int, float] = {}

    def run(rung: Rung) -> tuple[int, str | None]:
        """Every live arm (and the baseline) on the rung's batches; (rows done, budget out)."""
        baseline.new_slice()
        for a in alive:
            a.new_slice()
        for rows, i in enumerate(range(rung.start, rung.end)):
            need = sizes[i] * len(alive)
            out = budget.allows(need)
            if out:
                return rows, out
            started = budget.clock()
            batch = prepare(i)
            baseline.step(batch)  # shared by every candidate: not charged to the budget
            for a in alive:
                a.step(batch)
                results[a.name].examples += sizes[i]
            budget.spend(need, budget.clock() - started)
            if on_step is not None:
                on_step(rung, need)
        return rung.end - rung.start, None

    stopped = run(plan.warmup)[1] if plan.warmup else None
    for rung in plan.rungs if not stopped else []:
        rows, stopped = run(rung)
        if rows == 0:
            break
        baseline_total[rung.index] = baseline.total_loss()
        base = baseline.slice_loss()
        for a in alive:
            loss = a.slice_loss()
            results[a.name].reached = rung.index
            results[a.name].rungs.append(
                {
                    "rung": rung.index + 1,
                    "batches": [rung.start, rung.start + rows],
                    "examples": int(sum(sizes[rung.start : rung.start + rows])),
                    "complete": stopped is None,
                    "proxy_loss": loss,
                    "baseline_loss": base,
                    "gain": base - loss,
                    "score": score(objective, base - loss, a.cost()),
                }
            )
        alive.sort(key=lambda a: _rank_key(results[a.name]))
        if stopped:
            break
        keep = math.ceil(len(alive) / 2)
        for a in alive[keep:]:
            results[a.name].eliminated_at = rung.index
        log.info("rung %d/%d: %s go on", rung.index + 1, len(plan.rungs), [a.name for a in alive[:keep]])
        alive = alive[:keep]
    ranking = sorted(results, key=lambda n: _rank_key(results[n]))
    return Halving(results, ranking, stopped, baseline_total)
