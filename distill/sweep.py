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
continuing is incremental (``distill.halving``: the plan, the budget and the rungs).

The live pipeline is never touched: the window is read once into memory, in one event-time
order for every candidate, by a consumer that is assigned its partitions under its own group id
``sweep.<run id>`` and never commits (``distill.replay``). Nothing is written to Kafka.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import time
import tomllib
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from rich import box
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from distill.checkpoint import atomic_write
from distill.config import Config, DistillMode, ModelConfig, StudentConfig
from distill.evaluation import ProgressiveEvaluator
from distill.exceptions import ConfigError
from distill.gate import TeacherGate
from distill.halving import (
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
from distill.models import resolve_device
from distill.progress import clean_json
from distill.replay import Window, iso_ms, read_window
from distill.step import Learner, Objective
from distill.wire import ExampleBatch

log = logging.getLogger(__name__)

# Share of the window every candidate trains on before anything is scored (see plan_rungs).
DEFAULT_WARMUP = 0.3
# A teacher's compute per example: the labelling forward pass plus a training step, counted
# as three forward passes (forward + backward).
TRAIN_PASSES = 4

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


# -- the models: teacher (predict, then train) and proxy students --------------------------


class _Scores:
    """Progressive metrics of one model over everything it processed and, where the halving
    compares on it, over the current slice."""

    def __init__(self, config: Config, slices: bool = True):
        self.names = [t.name for t in config.tasks]
        self.kinds = [t.type for t in config.tasks]
        self.total = ProgressiveEvaluator(self.names, self.kinds)
        self.slice = ProgressiveEvaluator(self.names, self.kinds) if slices else None

    def update(self, outputs: np.ndarray, labels: np.ndarray) -> None:
        self.total.update("main", outputs, labels)
        if self.slice is not None:
            self.slice.update("main", outputs, labels)

    def new_slice(self) -> None:
        self.slice = ProgressiveEvaluator(self.names, self.kinds)

    @staticmethod
    def get(ev: ProgressiveEvaluator | None, task: str, metric: str) -> float:
        m = ev.metrics.get((task, "main")) if ev is not None else None
        return m.cumulative().get(metric, float("nan")) if m is not None else float("nan")

    def summary(self) -> dict[str, dict[str, float]]:
        return {task: m.cumulative() for (task, _), m in self.total.metrics.items()}


class SweepTeacher:
    """The teacher worker's learning, without Kafka: ``Learner.step`` with the teacher's
    objective; the step's pre-step scores are the labels."""

    def __init__(self, config: Config, model: ModelConfig, device: torch.device):
        self.learner = Learner.build(config, model, Objective.teacher(config), device)
        self.model = self.learner.model
        self.scores = _Scores(config, slices=False)  # reported over everything it processed
        self.nan_steps = 0

    def label_then_train(self, batch: ExampleBatch) -> np.ndarray:
        scored = self.learner.step(self.learner.tensors(batch))
        assert scored is not None
        self.scores.update(scored.main, batch.labels)
        self.nan_steps += 0 if scored.stepped else 1  # the worker skips the step too
        return scored.main


class ProxyStudent:
    """The student worker's learning: ``Learner.step`` with the student's objective and gate."""

    def __init__(self, config: Config, sc: StudentConfig, mode: DistillMode, device: torch.device):
        objective = Objective.student(config, sc, mode)
        # the same seed for aux and none: the same initial shared layers
        self.learner = Learner.build(config, sc.model, objective, device, config.features.subset(sc.features))
        self.model = self.learner.model
        self.distilled = objective.distilled
        self.gate = TeacherGate.of(sc, objective.distilled, objective.kinds, mode)
        self.scores = _Scores(config)
        self.nan_steps = 0

    def step(self, batch: ExampleBatch, teacher: np.ndarray | None) -> None:
        scored = self.learner.step(self.learner.tensors(batch), teacher, self.gate.soft_weight, self.gate.fractions())
        assert scored is not None
        self.scores.update(scored.main, batch.labels)
        if teacher is not None:
            self.gate.update(scored.main, teacher, batch.labels)
        self.nan_steps += 0 if scored.stepped else 1


def proxy_student(config: Config) -> tuple[StudentConfig, str | None]:
    """The config's first ``aux`` student (its model, weight, temperature, tasks), or a default."""
    for s in config.students:
        if s.mode == "aux":
            return s, s.name
    return StudentConfig(name="proxy", mode="aux", soft_weight=1.0), None


class _ProxyScores:
    """The proxy student's progressive loss, per halving slice and in total."""

    student: ProxyStudent
    task: str
    metric: str

    def new_slice(self) -> None:
        self.student.scores.new_slice()

    def slice_loss(self) -> float:
        return _Scores.get(self.student.scores.slice, self.task, self.metric)

    def total_loss(self) -> float:
        return _Scores.get(self.student.scores.total, self.task, self.metric)


class CandidateArm(_ProxyScores):
    """A candidate teacher and the proxy student that distils from it."""

    def __init__(
        self, config: Config, candidate: Candidate, proxy: StudentConfig, device: torch.device, task: str, metric: str
    ):
        self.name, self.candidate = candidate.name, candidate
        self.teacher = SweepTeacher(config, candidate.model, device)
        self.student = ProxyStudent(config, proxy, "aux", device)
        self.task, self.metric, self.device = task, metric, device
        self.examples = 0
        self.teacher_s = 0.0
        self.student_s = 0.0

    def step(self, b: ExampleBatch) -> None:
        started = time.perf_counter()
        logits = self.teacher.label_then_train(b)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # the teacher's seconds, not queued work
        middle = time.perf_counter()
        self.student.step(b, logits)
        self.teacher_s += middle - started
        self.student_s += time.perf_counter() - middle
        self.examples += b.size

    def cost(self) -> dict[str, float]:
        flops = TRAIN_PASSES * self.teacher.model.flops_per_example
        per_1k = 1000 * self.teacher_s / self.examples if self.examples else float("nan")
        return {"gflop_per_1k": flops * 1000 / 1e9, "seconds_per_1k": per_1k}


class BaselineArm(_ProxyScores):
    """The ``none`` proxy student, shared by every candidate: trained once on the window."""

    name = "none"

    def __init__(self, config: Config, proxy: StudentConfig, device: torch.device, task: str, metric: str):
        self.student = ProxyStudent(config, proxy, "none", device)
        self.task, self.metric = task, metric
        self.examples = 0

    def step(self, b: ExampleBatch) -> None:
        self.student.step(b, None)
        self.examples += b.size

    def cost(self) -> dict[str, float]:
        return {"gflop_per_1k": 0.0, "seconds_per_1k": 0.0}


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


# -- output ----------------------------------------------------------------------------------


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return json.dumps(str(v))  # a TOML basic string


def winner_toml(report: dict[str, Any]) -> str:
    """The winner's ``[teacher.model]``, to merge over the config the sweep ran with."""
    win = next(c for c in report["candidates"] if c["name"] == report["winner"])
    model, gain = win["model"], win["proxy"]["gain"]
    how = f"rung {win['rung_reached']} of {win['rungs']}, {win['examples']:,} examples"
    if gain is not None and not math.isnan(gain):
        how += f"; proxy-student {report['task']} {report['metric']} {gain:+.5f} vs `none`"
    lines = [
        f"# distill sweep {report.get('run_id', '')}: {win['name']!r} won among "
        f"{len(report['candidates'])} candidates ({how}).",
        "# Use it over the config the sweep ran with: paste the table into that file, or run",
        f"#   DISTILL_TEACHER__MODEL='{json.dumps(model, separators=(',', ':'))}' distill teacher --config CONFIG",
        "",
        "[teacher.model]",
        *(f"{k} = {_toml_value(v)}" for k, v in model.items()),
    ]
    return "\n".join(lines) + "\n"


def write_outputs(report: dict[str, Any], config: Config, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    if report["winner"] is not None:
        text = winner_toml(report)
        # The file must say exactly what won: read it back as the teacher worker would.
        parsed = ModelConfig.model_validate(tomllib.loads(text)["teacher"]["model"])
        won = next(c["model"] for c in report["candidates"] if c["name"] == report["winner"])
        if parsed.model_dump() != won:
            raise RuntimeError(f"winner-teacher.toml reads back as {parsed}, not {won}")
        atomic_write(out_dir / "winner-teacher.toml", text.encode())
        report["winner_file"] = str(out_dir / "winner-teacher.toml")
    report["output"] = str(out_dir)
    atomic_write(out_dir / "sweep.json", json.dumps(clean_json(report), indent=2).encode())


def _f(value: Any, spec: str = ".4f") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return format(value, spec)


def render_table(report: dict[str, Any]) -> Table:
    task, metric = report["task"], report["metric"]
    spent = report["budget"].get("exhausted")
    table = Table(
        box=box.SIMPLE_HEAD,
        title=f"distill sweep: gain = `none` student's {task} {metric} - aux proxy's "
        f"(objective {report['objective']}" + (f"; --budget-{spent} ran out)" if spent else ")"),
        caption="teacher metrics: progressive, on what it processed; cost: teacher compute "
        "(label + train) per 1,000 examples; * winner",
    )
    binary = metric == "logloss"
    cols = [
        "#",
        "candidate",
        "rung",
        "examples",
        *(["AUC"] if binary else []),
        metric,
        "gain",
        "params",
        "kFLOP/ex",
        "teacher s",
        "gain/GFLOP",
        "gain/s",
    ]
    for col in cols:
        table.add_column(col, justify="left" if col == "candidate" else "right")
    for c in report["candidates"]:
        t = c["teacher"]
        tm = t["metrics"].get(task, {})
        table.add_row(
            str(c["rank"]),
            c["name"] + (" *" if c["name"] == report["winner"] else ""),
            f"{c['rung_reached']}/{c['rungs']}",
            f"{c['examples']:,}",
            *([_f(tm.get("auc"))] if binary else []),
            _f(tm.get(metric)),
            _f(c["proxy"]["gain"], "+.4f"),
            f"{t['params']:,}",
            _f(t["flops_per_example"] / 1e3, ",.1f"),
            _f(t["seconds"], ".1f"),
            _f(c["gain_per_gflop"], "+.3g"),
            _f(c["gain_per_second"], "+.3g"),
        )
    return table
