"""``distill sweep``: which teacher should I run? Answered from data retained in Kafka.

A teacher proves itself only through the students it trains, and every candidate costs
teacher compute (arXiv 2408.14678, the second problem). The sweep replays a retained window of
the examples topic through each candidate teacher exactly as the teacher worker runs it
(predict without gradients, then one training step per batch: every label out-of-sample). A
fixed proxy student distils from each candidate in ``aux`` mode, beside one ``none`` student
that all candidates share. The gain is how much lower the proxy's serving-head log loss (RMSE
for a regression task) is than the ``none`` student's on the same batches.

Successive halving spends the budget on the candidates that help their student most: every
candidate on a first slice of the window, the better half on the next slice (twice as long),
and so on until one is left. Each candidate keeps its models and optimizers between rungs, so
continuing is incremental (``distill.sweep.halving``: the plan, the budget and the rungs).

The live pipeline is never touched: the window is read once into memory, in one event-time
order for every candidate, by a consumer that is assigned its partitions under its own group id
``sweep.<run id>`` and never commits (``distill.sweep.replay``). Nothing is written to Kafka.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from distill.core.config import Config
from distill.core.exceptions import ConfigError
from distill.core.wire import ExampleBatch
from distill.learn.models import resolve_device
from distill.sweep.arms import BaselineArm, CandidateArm, proxy_student
from distill.sweep.candidates import Candidate, load_candidates
from distill.sweep.halving import (
    OBJECTIVES,
    Budget,
    Halving,
    Plan,
    Rung,
    check_warmup,
    plan_rungs,
    score,
    successive_halving,
)
from distill.sweep.render import write_outputs
from distill.sweep.replay import Window, iso_ms, read_window

log = logging.getLogger(__name__)

# Share of the window every candidate trains on before anything is scored (see plan_rungs).
DEFAULT_WARMUP = 0.3


def _device(setting: str) -> torch.device:
    if setting not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"--device {setting!r}: use auto, cpu or cuda")
    try:
        return resolve_device(setting)  # type: ignore[arg-type]
    except RuntimeError as exc:
        raise ConfigError(str(exc)) from None


def pick_task(config: Config, task: str | None) -> tuple[str, str]:
    """The task the gain is measured on (default: the first binary one) and its metric."""
    types = config.task_types()
    if task is None:
        task = next((n for n, t in types.items() if t == "binary"), next(iter(types)))
    if task not in types:
        raise ConfigError(f"--task {task!r} is not a configured task; tasks: {list(types)}")
    return task, "logloss" if types[task] == "binary" else "rmse"


# -- the sweep -----------------------------------------------------------------------------


def new_run_id() -> str:
    return f"{datetime.now(UTC):%Y%m%d-%H%M%S}-{uuid.uuid4().hex[:6]}"


def sweep_batches(
    config: Config,
    candidates: Sequence[Candidate],
    batches: Sequence[ExampleBatch],
    budget: Budget,
    *,
    objective: str = "gain",
    task: str | None = None,
    device: str | None = None,
    warmup: float = DEFAULT_WARMUP,
    on_plan: Callable[[Plan], None] | None = None,
    on_step: Callable[[Rung, int], None] | None = None,
) -> dict[str, Any]:
    """The sweep on batches in memory (already in replay order): plan, halve, report."""
    if objective not in OBJECTIVES:
        raise ConfigError(f"--objective {objective!r}: use one of {', '.join(OBJECTIVES)}")
    task, metric = pick_task(config, task)
    sizes = [b.size for b in batches]
    plan = plan_rungs(sizes, len(candidates), budget.examples, warmup)
    if on_plan is not None:
        on_plan(plan)
    dev = _device(device or config.teacher.device)
    proxy, proxy_from = proxy_student(config)
    arms = [CandidateArm(config, c, proxy, dev, task, metric) for c in candidates]
    baseline = BaselineArm(config, proxy, dev, task, metric)

    halving = successive_halving(arms, baseline, sizes, plan, budget, objective, lambda i: batches[i], on_step)
    by_name = {a.name: a for a in arms}
    ranked = [
        _candidate_report(by_name[n], halving, rank + 1, len(plan.rungs)) for rank, n in enumerate(halving.ranking)
    ]
    winner = ranked[0]["name"] if ranked and ranked[0]["examples"] else None
    return {
        "task": task,
        "metric": metric,
        "objective": objective,
        "device": str(dev),
        "winner": winner,
        "plan": {
            "first_batch": plan.first,
            "left_out_examples": int(sum(sizes[: plan.first])),
            "cost_examples": plan.cost,
            "warmup": None
            if plan.warmup is None
            else {"share": warmup, "batches": [plan.warmup.start, plan.warmup.end], "examples": plan.warmup.examples},
            "rungs": [
                {"rung": r.index + 1, "batches": [r.start, r.end], "examples": r.examples, "candidates": r.candidates}
                for r in plan.rungs
            ],
        },
        "budget": budget.describe() | {"exhausted": halving.stopped},
        "proxy": {
            "from_student": proxy_from,
            "model": proxy.model.model_dump(),
            "soft_weight": proxy.soft_weight,
            "temperature": proxy.temperature,
            "distill_tasks": proxy.distill_tasks,
            "params": baseline.student.model.param_count(),
        },
        "baseline": {"examples": baseline.examples, "metrics": baseline.student.scores.summary()},
        "candidates": ranked,
    }


def _candidate_report(arm: CandidateArm, halving: Halving, rank: int, rungs: int) -> dict[str, Any]:
    res = halving.results[arm.name]
    last = res.rungs[-1] if res.rungs else {}
    cost = arm.cost()
    gain = last.get("gain", float("nan"))
    base_total = halving.baseline_total.get(res.reached, float("nan"))
    return {
        "rank": rank,
        "name": arm.name,
        "model": arm.candidate.model.model_dump(),
        "rung_reached": res.reached + 1,
        "rungs": rungs,
        "eliminated_at_rung": None if res.eliminated_at is None else res.eliminated_at + 1,
        "examples": res.examples,
        "teacher": {
            "params": arm.teacher.model.param_count(),
            "flops_per_example": arm.teacher.model.flops_per_example,
            "gflop_per_1k_examples": cost["gflop_per_1k"],
            "seconds": arm.teacher_s,
            "seconds_per_1k_examples": cost["seconds_per_1k"],
            "nan_steps": arm.teacher.nan_steps,
            "metrics": arm.teacher.scores.summary(),
        },
        "proxy": {
            "gain": gain,
            "loss": last.get("proxy_loss"),
            "baseline_loss": last.get("baseline_loss"),
            "gain_cumulative": base_total - arm.total_loss(),
            "seconds": arm.student_s,
            "metrics": arm.student.scores.summary(),
        },
        "gain_per_gflop": score("gain-per-gflop", gain, cost),
        "gain_per_second": score("gain-per-second", gain, cost),
        "rung_history": res.rungs,
    }


def _progress(console: Console) -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
        disable=not console.is_terminal,
    )


def run_sweep(
    config: Config,
    candidates_path: Path,
    window: Window,
    *,
    budget_examples: int | None = None,
    budget_seconds: float | None = None,
    output: Path | None = None,
    objective: str = "gain",
    task: str | None = None,
    device: str | None = None,
    warmup: float = DEFAULT_WARMUP,
    max_window_mb: int = 2048,
    console: Console | None = None,
    run_id: str | None = None,
) -> dict[str, Any]:
    """Everything ``distill sweep`` does except printing: returns the report it wrote."""
    budget = Budget(budget_examples, budget_seconds)  # the seconds count from here
    started_ms = int(time.time() * 1000)
    # Everything that can be wrong with the arguments fails here, before Kafka is touched.
    candidates = load_candidates(Path(candidates_path), config.teacher.model)
    pick_task(config, task)
    check_warmup(warmup)
    _device(device or config.teacher.device)
    if objective not in OBJECTIVES:
        raise ConfigError(f"--objective {objective!r}: use one of {', '.join(OBJECTIVES)}")
    run_id = run_id or new_run_id()
    group_id = f"sweep.{run_id}"
    out_dir = Path(output) if output else config.state_dir / "sweeps" / run_id
    console = console or Console(stderr=True)
    with _progress(console) as progress:
        reading = progress.add_task("reading the window", total=None)
        data = read_window(
            config,
            window,
            group_id,
            max_bytes=max_window_mb * 2**20,
            started_ms=started_ms,
            on_batch=lambda n: progress.advance(reading, n),
        )
        progress.remove_task(reading)
        bar: dict[str, Any] = {}

        def on_plan(plan: Plan) -> None:
            bar["task"] = progress.add_task("warm-up", total=plan.cost)
            bar["rungs"] = len(plan.rungs)

        def on_step(rung: Rung, n: int) -> None:
            what = "warm-up" if rung.index < 0 else f"rung {rung.index + 1}/{bar['rungs']}"
            progress.update(bar["task"], advance=n, description=f"{what}: {rung.candidates} candidates")

        report = sweep_batches(
            config,
            candidates,
            data.batches,
            budget,
            objective=objective,
            task=task,
            device=device,
            warmup=warmup,
            on_plan=on_plan,
            on_step=on_step,
        )
    report = {
        "run_id": run_id,
        "group_id": group_id,
        "created": iso_ms(started_ms),
        "candidates_file": str(candidates_path),
        "topic": config.topics.examples,
        "window": window.describe()
        | {
            "batches": len(data.batches),
            "examples": data.examples,
            "first_event_time": iso_ms(min(int(b.event_time_ms.min()) for b in data.batches)),
            "last_event_time": iso_ms(max(int(b.event_time_ms.max()) for b in data.batches)),
            "partitions": {str(p): v for p, v in sorted(data.partitions.items())},
            "skipped": data.skipped,
            "bytes": data.bytes,
            "read_seconds": data.seconds,
        },
        **report,
        "seconds": budget.elapsed(),
    }
    write_outputs(report, config, out_dir)
    return report
