"""Serving export: the main heads only, with what is needed to load them again.

Layout: ``<model_dir>/<version>/serving.pt`` and ``<model_dir>/LATEST`` (the newest version,
replaced atomically). Load the newest with ``distill.learn.export.load_serving_model(model_dir)``.
"""

from __future__ import annotations

import io
from pathlib import Path

import torch

from distill.core.config import FeaturesConfig, ModelConfig, TaskConfig
from distill.core.files import atomic_write
from distill.learn.models import RankingModel, ServingModel


def export_serving_model(
    model: RankingModel,
    features: FeaturesConfig,
    tasks: list[TaskConfig],
    model_config: ModelConfig,
    model_dir: Path,
    version: int,
) -> Path:
    target = model_dir / str(version)
    target.mkdir(parents=True, exist_ok=True)
    weights = {k: v.detach().cpu() for k, v in model.state_dict().items() if not k.startswith("aux_head")}
    payload = {
        "version": version,
        "state_dict": weights,
        "features": features.model_dump(mode="json"),
        "tasks": [t.model_dump(mode="json") for t in tasks],
        "model": model_config.model_dump(mode="json"),
    }
    buf = io.BytesIO()
    torch.save(payload, buf)
    atomic_write(target / "serving.pt", buf.getvalue())
    atomic_write(model_dir / "LATEST", f"{version}\n".encode())
    return target


def load_serving_model(model_dir: Path | str, version: int | None = None) -> ServingModel:
    """The serving model (main heads only), in eval mode. Call it with (categorical, dense)."""
    model_dir = Path(model_dir)
    if version is None:
        version = int((model_dir / "LATEST").read_text().strip())
    payload = torch.load(model_dir / str(version) / "serving.pt", map_location="cpu", weights_only=True)
    model = RankingModel(
        FeaturesConfig.model_validate(payload["features"]),
        [TaskConfig.model_validate(t) for t in payload["tasks"]],
        ModelConfig.model_validate(payload["model"]),
    )
    model.load_state_dict(payload["state_dict"])
    serving = ServingModel(model).eval()
    serving.version = payload["version"]
    return serving
