"""The ranking model family shared by the teacher and the students.

Hashed embedding tables for categorical ids (any id range), dense features, optional DCN-v2
cross layers, an MLP tower and one head per task (binary: a logit; regression: a value).
Students add an auxiliary head per distilled task on the same tower; it learns the teacher's
soft labels and is never served.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from distill.config import Device, FeaturesConfig, ModelConfig, TaskConfig
from distill.wire import ExampleBatch

# Fibonacci hashing constant (2**64 / golden ratio) as a signed int64; torch wraps on overflow.
_HASH_MULTIPLIER = -7046029254386353131


def resolve_device(setting: Device) -> torch.device:
    if setting == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device=cuda but no CUDA device is visible; use device=auto or cpu")
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(setting)


class CrossLayer(nn.Module):
    """DCN-v2 cross layer: x_{l+1} = x0 * (W x_l + b) + x_l."""

    def __init__(self, dim: int):
        super().__init__()
        self.linear = nn.Linear(dim, dim)

    def forward(self, x0: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return x0 * self.linear(x) + x


class RankingModel(nn.Module):
    def __init__(
        self, features: FeaturesConfig, tasks: list[TaskConfig], model: ModelConfig, aux_tasks: list[str] | None = None
    ):
        super().__init__()
        self.task_names = [t.name for t in tasks]
        self.aux_tasks = list(aux_tasks or [])
        self.register_buffer("buckets", torch.tensor([f.buckets for f in features.categorical], dtype=torch.long))
        self.tables = nn.ModuleList(nn.Embedding(f.buckets, model.embedding_dim) for f in features.categorical)
        for table in self.tables:
            nn.init.normal_(table.weight, std=0.05)
        in_dim = len(features.categorical) * model.embedding_dim + len(features.dense)
        self.dense_norm = nn.LayerNorm(len(features.dense)) if features.dense else None
        self.cross = nn.ModuleList(CrossLayer(in_dim) for _ in range(model.cross_layers))
        layers: list[nn.Module] = []
        width = in_dim
        for hidden in model.hidden:
            layers += [nn.Linear(width, hidden), nn.ReLU()]
            if model.dropout:
                layers.append(nn.Dropout(model.dropout))
            width = hidden
        self.tower = nn.Sequential(*layers)
        self.head = nn.Linear(width, len(self.task_names))
        self.aux_head = nn.Linear(width, len(self.aux_tasks)) if self.aux_tasks else None
        self._flops = self._count_flops(in_dim, model)

    def _count_flops(self, in_dim: int, model: ModelConfig) -> int:
        macs = model.cross_layers * in_dim * in_dim
        width = in_dim
        for hidden in model.hidden:
            macs += width * hidden
            width = hidden
        macs += width * (len(self.task_names) + len(self.aux_tasks))
        return 2 * macs

    @property
    def flops_per_example(self) -> int:
        return self._flops

    def param_count(self, serving_only: bool = False) -> int:
        return sum(
            p.numel() for name, p in self.named_parameters() if not (serving_only and name.startswith("aux_head"))
        )

    def embed(self, categorical: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
        hashed = torch.remainder(categorical * _HASH_MULTIPLIER, self.buckets)
        parts = [table(hashed[:, i]) for i, table in enumerate(self.tables)]
        if self.dense_norm is not None:
            parts.append(self.dense_norm(dense))
        x0 = torch.cat(parts, dim=1)
        x = x0
        for layer in self.cross:
            x = layer(x0, x)
        return self.tower(x)

    def forward(self, categorical: torch.Tensor, dense: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Returns (main outputs [n, tasks], auxiliary outputs [n, aux tasks] or None)."""
        h = self.embed(categorical, dense)
        return self.head(h), (self.aux_head(h) if self.aux_head is not None else None)


class ServingModel(nn.Module):
    """What is exported: the shared layers and the main heads only."""

    def __init__(self, model: RankingModel):
        super().__init__()
        self.model = model

    def forward(self, categorical: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
        return self.model.head(self.model.embed(categorical, dense))


def _tensor(arr: np.ndarray, device: torch.device, pin: bool) -> torch.Tensor:
    # One copy per column per batch (the wire arrays are read-only views of the message).
    t = torch.from_numpy(np.array(arr, copy=True))
    if pin and device.type == "cuda":
        t = t.pin_memory()
    return t.to(device, non_blocking=True)


def batch_tensors(batches: list[ExampleBatch], device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Concatenate several micro-batches into one forward pass: (categorical, dense, labels)."""
    pin = device.type == "cuda"
    if len(batches) == 1:
        b = batches[0]
        return _tensor(b.categorical, device, pin), _tensor(b.dense, device, pin), _tensor(b.labels, device, pin)
    cat = np.concatenate([b.categorical for b in batches])
    dense = np.concatenate([b.dense for b in batches])
    labels = np.concatenate([b.labels for b in batches])
    return _tensor(cat, device, pin), _tensor(dense, device, pin), _tensor(labels, device, pin)


def autocast(device: torch.device):
    """bf16 autocast on CUDA, a no-op context on CPU: one code path for both."""
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def weights_finite(model: nn.Module) -> bool:
    return all(torch.isfinite(p).all().item() for p in model.parameters())


def make_optimizer(model: nn.Module, config: ModelConfig) -> torch.optim.Optimizer:
    """Adam, fused where this torch supports it: on CPU the fused kernel is about 2.5x faster,
    and the optimizer step over the embedding tables is most of a small model's time."""
    params = list(model.parameters())
    try:
        return torch.optim.Adam(params, lr=config.learning_rate, weight_decay=config.weight_decay, fused=True)
    except (RuntimeError, TypeError):  # older torch, or a device without the fused kernel
        return torch.optim.Adam(params, lr=config.learning_rate, weight_decay=config.weight_decay)
