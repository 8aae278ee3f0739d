"""A student's serving export at a checkpoint: graphs traced once against traced every time.

``export_serving_model`` writes ``model.pt`` (TorchScript), ``model.pt2`` (torch.export),
``serving.pt`` and the metadata of one version. A student worker keeps its ``ServingGraphs``:
traced at its first export, filled with the new weights at each later one. The baseline traces
both graphs at every export, as every export did before. The default student model, one torch
thread, the two ways alternating; the ratio is the traced export's time over the refilled one's.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import torch

from distill.core.config import load_config
from distill.learn.export import ServingGraphs, export_serving_model
from distill.learn.step import Learner, Objective

ROUNDS = 5


def run() -> list[dict]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            cfg = load_config(None, environ={}, state_dir=tmp, students=[{"name": "aux", "mode": "aux"}])
            sc = cfg.student("aux")
            model = Learner.build(cfg, sc.model, Objective.student(cfg, sc), torch.device("cpu")).model
            graphs = ServingGraphs()
            version = 0

            def export(kept: ServingGraphs | None) -> float:
                nonlocal version
                version += 1
                started = time.perf_counter()
                export_serving_model(model, cfg.features, cfg.tasks, sc.model, Path(tmp) / "aux", version, graphs=kept)
                return time.perf_counter() - started

            export(graphs)  # the worker's first export: traces its graphs (and warms torch up)
            traced, refilled = [], []
            for _ in range(ROUNDS):
                traced.append(export(None))
                refilled.append(export(graphs))
    finally:
        torch.set_num_threads(threads)
    t, r = statistics.median(traced), statistics.median(refilled)
    return [
        {
            "name": "student export, graphs traced once (default student model)",
            "value": 1000 * r,
            "unit": "ms",
            "ratio": t / r,
            "vs": f"traced at every export, {1000 * t:.0f} ms (medians of {ROUNDS} alternating runs)",
        }
    ]
