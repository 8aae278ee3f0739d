"""Serving export: the main heads only, as files a serving stack loads with plain torch.

Each version of a student is a directory of Triton's model repository layout
(``distill.learn.repository``)::

    <model root>/<student>/config.pbtxt          Triton: inputs, outputs, the promoted version
    <model root>/<student>/<version>/model.pt    TorchScript (Triton's PyTorch backend loads it)
    <model root>/<student>/<version>/model.pt2   torch.export program, dynamic batch dimension
    <model root>/<student>/<version>/signature.json   features, tasks, what each output is
    <model root>/<student>/<version>/metrics.json     the student's windowed figures at export
    <model root>/<student>/<version>/serving.pt  weights and configs, for load_serving_model
    <model root>/<student>/LATEST, PROMOTED      the newest version, the version to serve

Both graphs take raw inputs and give raw outputs: ``categorical`` int64 [n, features] holds
the ids as they come (any int64; the id hashing to table rows is inside the graph), ``dense``
float32 [n, features]; ``outputs`` float32 [n, tasks] holds a logit per binary task and a
value in the target's units per regression task (the standardisation is undone inside).
"""

from __future__ import annotations

import io
import json
import warnings
from pathlib import Path
from typing import Any

import torch

from distill.core.config import ExportConfig, FeaturesConfig, ModelConfig, TaskConfig
from distill.learn.models import RankingModel, ServingModel
from distill.learn.promotion import Decision, decide, figures
from distill.learn.repository import ModelRepository, RepositoryState

INPUTS = ("categorical__0", "dense__1")  # Triton's PyTorch backend: <name>__<argument index>
OUTPUT = "outputs__0"


def serving_copy(
    model: RankingModel, features: FeaturesConfig, tasks: list[TaskConfig], config: ModelConfig
) -> ServingModel:
    """A CPU copy of the main heads in eval mode (no aux head, no dropout)."""
    fresh = RankingModel(features, tasks, config)
    weights = {k: v.detach().cpu() for k, v in model.state_dict().items() if not k.startswith("aux_head")}
    fresh.load_state_dict(weights)
    return ServingModel(fresh).eval()


def _example(features: FeaturesConfig, n: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    categorical = torch.randint(-(2**62), 2**62, (n, len(features.categorical)), generator=g)
    return categorical, torch.randn(n, len(features.dense), generator=g)


def _traced(serving: ServingModel, features: FeaturesConfig) -> torch.jit.ScriptModule:
    # TorchScript is what Triton's PyTorch (libtorch) backend loads; torch 2.13 calls it
    # deprecated in favour of torch.export, which model.pt2 holds.
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return torch.jit.trace(serving, _example(features))


def _program(serving: ServingModel, features: FeaturesConfig) -> torch.export.ExportedProgram:
    batch = torch.export.Dim("batch")
    with torch.no_grad():
        return torch.export.export(
            serving, _example(features), dynamic_shapes={"categorical": {0: batch}, "dense": {0: batch}}
        )


class ServingGraphs:
    """A student's two serving graphs, traced at its first export; later exports copy the new
    weights into them. Tracing (torch.export's graph capture above all) was about 90% of an
    export, about 0.3 s a checkpoint, and the graph of one architecture never changes."""

    def __init__(self) -> None:
        self._graphs: tuple[torch.jit.ScriptModule, torch.export.ExportedProgram] | None = None
        self.traces = 0  # how many times they were traced

    def files(self, serving: ServingModel, features: FeaturesConfig) -> dict[str, bytes]:
        """``model.pt`` and ``model.pt2`` with ``serving``'s weights and buffers."""
        weights = serving.state_dict()
        if self._graphs is None or not self._load(weights):
            self._graphs = (_traced(serving, features), _program(serving, features))
            self.traces += 1
        traced, program = self._graphs
        script, pt2 = io.BytesIO(), io.BytesIO()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.jit.save(traced, script)
        torch.export.save(program, pt2)
        return {"model.pt": script.getvalue(), "model.pt2": pt2.getvalue()}

    def _load(self, weights: dict[str, torch.Tensor]) -> bool:
        """Copy ``weights`` into the graphs; False (trace again) if they do not fit them."""
        assert self._graphs is not None
        traced, program = self._graphs
        # The traced module also lists the non-persistent buffers (fixed by the tasks' layout).
        targets = [traced.state_dict(), program.state_dict]
        if any(any(k not in t or t[k].shape != w.shape for k, w in weights.items()) for t in targets):
            return False
        with torch.no_grad():
            for target in targets:
                for k, w in weights.items():
                    target[k].copy_(w)
        return True


def signature(features: FeaturesConfig, tasks: list[TaskConfig], version: int) -> dict[str, Any]:
    return {
        "version": version,
        "torch": torch.__version__,
        "files": {"torchscript": "model.pt", "torch_export": "model.pt2"},
        "inputs": [
            {
                "name": INPUTS[0],
                "dtype": "int64",
                "shape": [-1, len(features.categorical)],
                "columns": features.categorical_names,
                "meaning": "raw categorical ids, any int64; hashed to embedding rows inside the graph",
            },
            {
                "name": INPUTS[1],
                "dtype": "float32",
                "shape": [-1, len(features.dense)],
                "columns": list(features.dense),
                "meaning": "raw dense features (normalised inside the graph)",
            },
        ],
        "outputs": [
            {
                "name": OUTPUT,
                "dtype": "float32",
                "shape": [-1, len(tasks)],
                "columns": [
                    {
                        "task": t.name,
                        "type": t.type,
                        "output": "logit" if t.type == "binary" else "value",
                        "meaning": "log-odds; sigmoid gives the probability"
                        if t.type == "binary"
                        else "the prediction in the target's own units",
                    }
                    for t in tasks
                ],
            }
        ],
    }


def _legacy_payload(
    serving: ServingModel, features: FeaturesConfig, tasks: list[TaskConfig], config: ModelConfig, version: int
) -> bytes:
    buf = io.BytesIO()
    torch.save(
        {
            "version": version,
            "state_dict": serving.model.state_dict(),
            "features": features.model_dump(mode="json"),
            "tasks": [t.model_dump(mode="json") for t in tasks],
            "model": config.model_dump(mode="json"),
        },
        buf,
    )
    return buf.getvalue()


def export_serving_model(
    model: RankingModel,
    features: FeaturesConfig,
    tasks: list[TaskConfig],
    model_config: ModelConfig,
    model_dir: Path | str,
    version: int,
    *,
    export: ExportConfig | None = None,
    metrics: dict[str, Any] | None = None,
    compared_tasks: list[str] | None = None,
    baseline: str | None = None,
    graphs: ServingGraphs | None = None,
) -> RepositoryState:
    """Write ``version`` of a student into ``model_dir`` (a directory or an fsspec URL), move
    LATEST to it, apply the promotion rule, then delete what ``export.keep`` no longer keeps.

    ``metrics``: the student's evaluator snapshot ({task: {head: {"windowed": {...}}}}), kept
    with the version and compared with the ``baseline`` student's newest export on
    ``compared_tasks`` (None: every task). Returns the repository as it is afterwards (the
    exported, promoted and kept versions and the bytes on disk, for the metrics).

    ``graphs``: the student's graphs of its earlier exports, filled in and reused (None:
    traced for this export only)."""
    export = export or ExportConfig()
    repo = ModelRepository(model_dir)
    serving = serving_copy(model, features, tasks, model_config)
    mine = figures(metrics or {}, {t.name: t.type for t in tasks})
    files = {
        "serving.pt": _legacy_payload(serving, features, tasks, model_config, version),
        **(graphs or ServingGraphs()).files(serving, features),
        "metrics.json": json.dumps({"version": version, "windowed": mine}, indent=2).encode(),
        "signature.json": json.dumps(signature(features, tasks, version), indent=2).encode(),
    }
    repo.write_version(version, files)
    if not export.promote:
        decision = Decision(True, "promotion is off (students[].export.promote = false)")
    elif baseline == repo.name:
        decision = Decision(True, "the teacher-free baseline itself")
    else:
        base = repo.sibling_figures(baseline) if baseline else None
        decision = decide(mine, base, compared_tasks, export.promote_margin)
    return repo.after_export(version, decision, signature(features, tasks, version), keep=export.keep)


def load_serving_model(model_dir: Path | str, version: int | None = None) -> ServingModel:
    """The serving model (main heads only), in eval mode, as a module of this package. Call it
    with (categorical, dense). A serving stack without this package loads ``model.pt``
    (``torch.jit.load``) or ``model.pt2`` (``torch.export.load``) instead."""
    repo = ModelRepository(model_dir)
    if version is None:
        version = repo.latest()
        if version is None:
            raise FileNotFoundError(f"no exported version in {repo.storage}: LATEST is missing")
    payload = torch.load(io.BytesIO(repo.read(version, "serving.pt")), map_location="cpu", weights_only=True)
    model = RankingModel(
        FeaturesConfig.model_validate(payload["features"]),
        [TaskConfig.model_validate(t) for t in payload["tasks"]],
        ModelConfig.model_validate(payload["model"]),
    )
    model.load_state_dict(payload["state_dict"])
    serving = ServingModel(model).eval()
    serving.version = payload["version"]
    return serving
