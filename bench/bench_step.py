"""One learning step: sparse row-wise table updates against one dense Adam, side by side.

``Learner.step`` on the same batches with ``table_optimizer = "adagrad"`` (the default: sparse
table gradients, row-wise Adagrad, Adam on the dense layers) and ``"adam"`` (one dense Adam over
every parameter: every row of every table moves on every step), and, for the tables' own
optimizer, with ``torch.optim.Adagrad`` on the same sparse gradients in place of the row-wise
one (an accumulator per element: what the tables had before). Teacher and student models, at
the synthetic preset's table sizes (20,011 rows) and at 100,003-row tables. Each ratio is the
other step's time over the default one's (above 1: the default is faster). Runs alternate so
that all see the same machine.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from distill.core.config import load_config
from distill.core.presets import preset_overrides
from distill.learn.step import Learner, Objective
from producers.synthetic import SyntheticSource

BATCHES = 120
ROUNDS = 3


def _batches(cfg) -> list:
    source = SyntheticSource(cfg.synthetic)
    chunks = source.chunks(0, size=256)
    return [next(chunks).to_batch(f"b{i}", "bench", i, source) for i in range(BATCHES)]


def _ms_per_step(cfg, role: str, table_optimizer: str, batches: list) -> float:
    """``table_optimizer``: a config value, or "element-wise" (torch's Adagrad on the tables)."""
    element_wise = table_optimizer == "element-wise"
    mc = cfg.teacher.model if role == "teacher" else cfg.student("aux").model
    mc = mc.model_copy(update={"table_optimizer": "adagrad" if element_wise else table_optimizer})
    sc = cfg.student("aux")
    objective = Objective.teacher(cfg) if role == "teacher" else Objective.student(cfg, sc)
    learner = Learner.build(cfg, mc, objective, torch.device("cpu"))
    if element_wise:
        tables = learner.optimizer.tables
        assert tables is not None
        learner.optimizer.tables = torch.optim.Adagrad(tables.param_groups[0]["params"], lr=mc.table_learning_rate)
    tensors = [learner.tensors(b) for b in batches]
    soft = np.zeros((batches[0].size, 2), dtype=np.float32)
    for t in tensors[:10]:  # warm-up: allocator, optimizer state
        learner.step(t, None if role == "teacher" else soft, 1.0)
    started = time.perf_counter()
    for t in tensors[10:]:
        learner.step(t, None if role == "teacher" else soft, 1.0)
    return 1000 * (time.perf_counter() - started) / (len(tensors) - 10)


def run() -> list[dict]:
    rows = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one core each, as the workers on a shared machine
    try:
        for buckets in (20_011, 100_003):
            preset = preset_overrides("synthetic")
            preset.pop("students")
            for f in preset["features"]["categorical"]:
                if f["name"] in ("user_id", "item_id"):
                    f["buckets"] = buckets
            cfg = load_config(
                None,
                environ={},
                **preset,
                synthetic={"num_users": 50_000, "num_items": 20_000},
                students=[{"name": "aux", "mode": "aux", "soft_weight": 1.0}],
            )
            batches = _batches(cfg)
            for role in ("teacher", "student"):
                times: dict[str, list[float]] = {"adagrad": [], "adam": [], "element-wise": []}
                for _ in range(ROUNDS):
                    for opt in times:
                        times[opt].append(_ms_per_step(cfg, role, opt, batches))
                sparse, dense, element_wise = (min(times[k]) for k in ("adagrad", "adam", "element-wise"))
                rows.append(
                    {
                        "name": f"{role} step, {buckets:,}-row tables, sparse row-wise",
                        "value": sparse,
                        "unit": "ms/step",
                        "ratio": dense / sparse,
                        "vs": f"dense Adam on every row ({dense:.2f} ms)",
                    }
                )
                rows.append(
                    {
                        "name": f"{role} step, {buckets:,}-row tables, row-wise Adagrad",
                        "value": sparse,
                        "unit": "ms/step",
                        "ratio": element_wise / sparse,
                        "vs": f"torch's element-wise Adagrad on the same sparse gradients ({element_wise:.2f} ms)",
                    }
                )
    finally:
        torch.set_num_threads(threads)
    return rows
