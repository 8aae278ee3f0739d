"""What distillation gains, measured in memory: ``python -m bench.distillation``.

The pipeline's learning without Kafka, so many runs are cheap: a source's examples are split
into partitions by user and cut into batches as the producer does; the partitions interleave in
runs of random length (as a consumer reads them; ``--orders`` different orders); the teacher
scores each batch before it trains on it (its labels) and every student joins those labels
and learns through the same ``Learner.step`` as the workers. Metrics are progressive: each
batch is scored by each model before that model trains on it, over the whole stream.

``--launch F``: the teacher trains alone on the first share F of the stream, then the students
start and everything is scored on the rest (a student launched beside a long-running teacher).

Prints, per order, each model's cumulative log loss (first binary task) and the teacher's lead
and each student's gain over ``none`` in percent, then their mean and spread.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass

import numpy as np
import torch

from distill.core.config import Config, StudentConfig
from distill.core.presets import load_config_for
from distill.core.wire import ExampleBatch
from distill.learn.evaluation import ProgressiveEvaluator
from distill.learn.gate import TeacherGate
from distill.learn.models import resolve_device
from distill.learn.step import Learner, Objective
from producers.service import user_partition
from producers.source import Chunk
from producers.sources import make_source


def stream_batches(
    config: Config, source: str, examples: int | None, batch_size: int = 256
) -> list[list[ExampleBatch]]:
    """Per partition, the batches the producer would send, in stream order."""
    src = make_source(config, source)
    parts = config.topics.partitions
    out: list[list[ExampleBatch]] = [[] for _ in range(parts)]
    rows: list[list] = [[] for _ in range(parts)]
    seen = 0
    for chunk in src.chunks(0):
        if examples is not None and seen >= examples:
            break
        if examples is not None and seen + len(chunk) > examples:
            chunk = chunk.take(slice(0, examples - seen))
        seen += len(chunk)
        which = user_partition(chunk.users, parts)
        for p in range(parts):
            rows[p].append(chunk.take(which == p))
    for p in range(parts):
        whole = Chunk.concat([c for c in rows[p] if len(c)])
        for start in range(0, len(whole), batch_size):
            c = whole.take(slice(start, start + batch_size))
            out[p].append(c.to_batch(f"p{p}-{start}", "bench", start, src))
    return out


def interleave(partitions: list[list[ExampleBatch]], seed: int, mean_run: int = 32) -> list[ExampleBatch]:
    """One consumption order: partitions read in runs of geometric length (mean ``mean_run``)."""
    rng = np.random.default_rng(seed)
    pos = [0] * len(partitions)
    order: list[ExampleBatch] = []
    while True:
        left = [p for p in range(len(partitions)) if pos[p] < len(partitions[p])]
        if not left:
            return order
        p = left[int(rng.integers(len(left)))]
        n = int(rng.geometric(1 / mean_run)) if mean_run > 1 else 1
        order += partitions[p][pos[p] : pos[p] + n]
        pos[p] += n


@dataclass
class Arm:
    name: str
    learner: Learner
    evaluator: ProgressiveEvaluator
    gate: TeacherGate | None
    soft_weight: float


def _student(config: Config, sc: StudentConfig, device: torch.device, gated: bool) -> Arm:
    objective = Objective.student(config, sc)
    learner = Learner.build(config, sc.model, objective, device, config.features.subset(sc.features))
    gate = None
    if sc.mode != "none":
        gc = sc.gate if gated else sc.gate.model_copy(update={"enabled": False})
        gate = TeacherGate.of(sc.model_copy(update={"gate": gc}), objective.distilled, objective.kinds)
    names = [t.name for t in config.tasks]
    return Arm(sc.name, learner, ProgressiveEvaluator(names, objective.kinds), gate, sc.soft_weight)


def run_order(
    config: Config, order: list[ExampleBatch], launch: float, device: torch.device, ungated: bool = True
) -> dict:
    names, kinds = [t.name for t in config.tasks], [t.type for t in config.tasks]
    teacher = Learner.build(config, config.teacher.model, Objective.teacher(config), device)
    t_eval = ProgressiveEvaluator(names, kinds)
    arms = [_student(config, sc, device, gated=True) for sc in config.students]
    arms += [
        _student(config, sc.model_copy(update={"name": f"{sc.name}-ungated"}), device, gated=False)
        for sc in config.students
        if ungated and sc.mode != "none" and sc.gate.enabled
    ]
    start = int(launch * len(order))
    for i, batch in enumerate(order):
        scored = teacher.step(teacher.tensors(batch))
        assert scored is not None
        if i < start:
            continue
        t_eval.update("main", scored.main, batch.labels)
        for arm in arms:
            gate = arm.gate.fractions() if arm.gate is not None else None
            out = arm.learner.step(arm.learner.tensors(batch), scored.main, arm.soft_weight, gate)
            assert out is not None
            arm.evaluator.update("main", out.main, batch.labels)
            if arm.gate is not None:
                arm.gate.update(out.main, scored.main, batch.labels)
    task = next((n for n, k in zip(names, kinds, strict=True) if k == "binary"), names[0])
    metric = "logloss" if dict(zip(names, kinds, strict=True))[task] == "binary" else "rmse"

    def loss(ev: ProgressiveEvaluator) -> float:
        return ev.metrics[(task, "main")].cumulative()[metric]

    result = {"task": task, "metric": metric, "teacher": loss(t_eval)}
    result |= {a.name: loss(a.evaluator) for a in arms}
    for a in arms:
        if a.gate is not None and a.gate.config.enabled:
            result[f"{a.name}.gate"] = a.gate.fractions()
            result[f"{a.name}.lead"] = a.gate.leads()
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--source", default="synthetic", choices=["synthetic", "movielens", "file"])
    ap.add_argument("--config", default=None)
    ap.add_argument("--examples", type=int, default=None)
    ap.add_argument("--orders", type=int, default=3, help="consumption orders (seeds F..F+N-1)")
    ap.add_argument("--first-order", type=int, default=0, help="F: the first order's seed")
    ap.add_argument("--launch", type=float, default=0.0, help="share of the stream the teacher trains on alone")
    ap.add_argument("--no-ungated", action="store_true", help="no ungated copy of each gated student")
    ap.add_argument("--set", action="append", default=[], help="a JSON override, e.g. teacher.model.hidden=[256]")
    args = ap.parse_args()
    overrides: dict = {}
    for item in args.set:
        key, value = item.split("=", 1)
        node = overrides
        *path, last = key.split(".")
        for part in path:
            node = node.setdefault(part, {})
        node[last] = json.loads(value)
    config = load_config_for(args.source, args.config, **overrides)
    torch.set_num_threads(1)
    device = resolve_device("cpu")
    partitions = stream_batches(config, args.source, args.examples)
    rows = []
    for seed in range(args.first_order, args.first_order + args.orders):
        started = time.perf_counter()
        order = interleave(partitions, seed) if config.topics.partitions > 1 else partitions[0]
        r = run_order(config, order, args.launch, device, ungated=not args.no_ungated)
        rows.append(r)
        none = r.get("none", float("nan"))
        gains = {k: 100 * (none - v) / none for k, v in r.items() if isinstance(v, float) and k not in ("none",)}
        print(
            f"order {seed}: "
            + "  ".join(f"{k} {v:.4f}" for k, v in r.items() if isinstance(v, float))
            + " | vs none %: "
            + "  ".join(f"{k} {g:+.2f}" for k, g in gains.items())
            + f" | gate {[(k, [round(x, 3) for x in v]) for k, v in r.items() if k.endswith(('.gate', '.lead'))]}"
            + f" ({time.perf_counter() - started:.0f} s)",
            flush=True,
        )
    keys = [k for k, v in rows[0].items() if isinstance(v, float) and k != "none"]
    print("mean over orders, % below none (positive: better than none):")
    for k in keys:
        g = np.array([100 * (r["none"] - r[k]) / r["none"] for r in rows])
        print(f"  {k:14s} {g.mean():+.2f} (min {g.min():+.2f}, max {g.max():+.2f})")


if __name__ == "__main__":
    main()
