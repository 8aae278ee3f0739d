"""The ranking model family shared by the teacher and the students.

Hashed embedding tables for categorical ids (any id range), dense features, optional DCN-v2
cross layers, an MLP tower and one head per task (binary: a logit; regression: a value).
Students add an auxiliary head per distilled task on the same tower; it learns the teacher's
soft labels and is never served.

Regression heads learn standardised targets: the model keeps each regression target's running
mean and variance (buffers, so they are checkpointed) and ``to_raw`` turns head outputs back
into the target's units. Published labels, metrics and the serving model are in raw units.
"""

from __future__ import annotations

import logging
import re

import numpy as np
import torch
from torch import nn

from distill.core.config import Device, FeaturesConfig, ModelConfig, TaskConfig
from distill.core.wire import ExampleBatch
from distill.learn.rowwise_adagrad import RowWiseAdagrad

log = logging.getLogger(__name__)

# Sparse table gradients come from autograd, valid by construction: no per-step invariant
# checks (the default; said explicitly, which also silences torch's warning about it).
torch.sparse.check_sparse_tensor_invariants.disable()

# Fibonacci hashing constant (2**64 / golden ratio) as a signed int64; torch wraps on overflow.
_HASH_MULTIPLIER = -7046029254386353131
_PER_FEATURE_TABLE = re.compile(r"tables\.\d+\.weight")


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
        buckets = [f.buckets for f in features.categorical]
        self.register_buffer("buckets", torch.tensor(buckets, dtype=torch.long))
        # Every feature's rows in one table (as FBGEMM's table-batched embeddings): one lookup
        # and one optimizer step a batch instead of one per feature. Feature i owns the rows
        # from offsets[i] on.
        self.register_buffer("offsets", torch.tensor(np.cumsum([0, *buckets[:-1]]), dtype=torch.long), persistent=False)
        adagrad = model.table_optimizer == "adagrad"
        self.tables = nn.Embedding(sum(buckets), model.embedding_dim, sparse=adagrad) if buckets else None
        # Running moments of the regression targets (binary columns stay 0 and 1: identity).
        # target_count < 0 freezes them (a checkpoint from before standardisation: raw units).
        self.regression_tasks = [i for i, t in enumerate(tasks) if t.type == "regression"]
        self.register_buffer("target_mean", torch.zeros(len(tasks)))
        self.register_buffer("target_var", torch.ones(len(tasks)))
        self.register_buffer("target_count", torch.tensor(0.0 if model.standardize_targets else -1.0))
        aux_index = [self.task_names.index(t) for t in self.aux_tasks]
        self.register_buffer("aux_index", torch.tensor(aux_index, dtype=torch.long), persistent=False)
        if self.tables is not None:
            nn.init.normal_(self.tables.weight, std=0.05)
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

    def hashed_ids(self, categorical: torch.Tensor) -> torch.Tensor:
        """Each id's row within its feature's buckets [n, features] (any int64 id)."""
        return torch.remainder(categorical * _HASH_MULTIPLIER, self.buckets)

    def feature_rows(self, feature: int) -> torch.Tensor:
        """Feature ``feature``'s rows of the table (a view)."""
        start = int(self.offsets[feature])
        return self.tables.weight[start : start + int(self.buckets[feature])]

    def embed(self, categorical: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
        parts = []
        if self.tables is not None:
            parts.append(self.tables(self.hashed_ids(categorical) + self.offsets).flatten(1))
        if self.dense_norm is not None:
            parts.append(self.dense_norm(dense))
        x0 = torch.cat(parts, dim=1)
        x = x0
        for layer in self.cross:
            x = layer(x0, x)
        return self.tower(x)

    def forward(
        self, categorical: torch.Tensor, dense: torch.Tensor, aux_share: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Returns (main outputs [n, tasks], auxiliary outputs [n, aux tasks] or None), in
        the model's own units (regression standardised); ``to_raw`` converts them.

        ``aux_share`` [aux tasks] in [0, 1]: the share of each aux column's gradient that
        reaches the shared layers (the aux head itself always gets all of it). The values are
        the same whatever the share; only what the teacher teaches the shared layers changes."""
        h = self.embed(categorical, dense)
        if self.aux_head is None:
            return self.head(h), None
        aux = self.aux_head(h)
        if aux_share is not None:
            aux = aux_share * aux + (1 - aux_share) * self.aux_head(h.detach())
        return self.head(h), aux

    # -- target standardisation ------------------------------------------------------------
    def _scale(self, columns: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        mean, std = self.target_mean, self.target_var.clamp_min(1e-12).sqrt()
        if columns is not None:
            mean, std = mean[columns], std[columns]
        return mean, std

    def to_raw(self, outputs: torch.Tensor, aux: bool = False) -> torch.Tensor:
        """Head outputs in the targets' units: logits stay logits, values are unstandardised."""
        mean, std = self._scale(self.aux_index if aux else None)
        return outputs.float() * std + mean

    def standardize(self, values: torch.Tensor) -> torch.Tensor:
        """Targets or teacher values [n, tasks] in raw units -> the model's units."""
        mean, std = self._scale(None)
        return (values - mean) / std

    @torch.no_grad()
    def observe_targets(self, moments: torch.Tensor) -> None:
        """Merge a batch's (count, sum, sum of squares) per task [3, tasks] into the running
        mean and variance of the regression targets (exact, Chan et al.'s pairwise update).

        In Python floats: the same arithmetic on tensors of a few elements cost 0.25-0.4 ms a
        step in torch's per-op overhead (4-6% of a student's step on a CPU)."""
        if not self.regression_tasks:
            return
        n_a = self.target_count.item()
        if n_a < 0:  # frozen: a checkpoint from before standardisation
            return
        count, total, squares = moments.detach().double().cpu().tolist()
        mean, var = self.target_mean.tolist(), self.target_var.tolist()
        for i in self.regression_tasks:
            n_b = count[i]
            if n_b <= 0:
                continue
            mean_b = total[i] / n_b
            var_b = max(squares[i] / n_b - mean_b * mean_b, 0.0)
            n = n_a + n_b
            delta = mean_b - mean[i]
            mean[i] += delta * n_b / n
            var[i] = (var[i] * n_a + var_b * n_b + delta * delta * n_a * n_b / n) / n
        self.target_mean.copy_(torch.tensor(mean))
        self.target_var.copy_(torch.tensor(var))
        self.target_count.add_(max(count))

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):  # type: ignore[override]
        state = dict(state_dict)
        per_feature = sorted((k for k in state if _PER_FEATURE_TABLE.fullmatch(k)), key=lambda k: int(k.split(".")[1]))
        if per_feature:
            # Written when each feature had a table of its own: the same rows, one after another.
            state["tables.weight"] = torch.cat([state.pop(k) for k in per_feature])
        mine = self.state_dict()
        aux = [k for k in state if k.startswith("aux_head.")]
        if any(k not in mine or state[k].shape != mine[k].shape for k in aux) or (
            not aux and any(k.startswith("aux_head.") for k in mine)
        ):
            # The tasks it distils changed: the aux head (never served) starts again.
            log.warning("checkpoint's aux head distils other tasks: the aux head starts again")
            state = {k: v for k, v in state.items() if not k.startswith("aux_head.")}
            state.update({k: v for k, v in mine.items() if k.startswith("aux_head.")})
        if "target_count" not in state:
            # Written before targets were standardised: its regression heads output raw units.
            log.warning("checkpoint predates target standardisation: this model keeps raw regression units")
            state["target_mean"] = torch.zeros_like(self.target_mean)
            state["target_var"] = torch.ones_like(self.target_var)
            state["target_count"] = torch.tensor(-1.0)
        return super().load_state_dict(state, strict=strict, assign=assign)


def target_moments(labels: torch.Tensor) -> torch.Tensor:
    """(count, sum, sum of squares) per task column of a batch: [3, tasks], float64."""
    x = labels.double()
    return torch.stack([x.new_full(x.shape[1:], x.shape[0]), x.sum(0), (x * x).sum(0)])


class ServingModel(nn.Module):
    """What is exported: the shared layers and the main heads only, in the targets' units."""

    def __init__(self, model: RankingModel):
        super().__init__()
        self.model = model

    def forward(self, categorical: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
        return self.model.to_raw(self.model.head(self.model.embed(categorical, dense)))


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


class ModelOptimizer:
    """The field's split (TorchRec, FBGEMM): embedding tables get sparse gradients and
    row-wise Adagrad with their own learning rate, so a row the batch did not touch does not
    move; the dense layers get Adam (fused where this torch has the kernel).

    With ``table_optimizer = "adam"`` it is one dense Adam over every parameter, as before.
    """

    def __init__(self, model: RankingModel, config: ModelConfig):
        tables = [p for name, p in model.named_parameters() if name.startswith("tables.")]
        sparse = config.table_optimizer == "adagrad"
        dense = [p for name, p in model.named_parameters() if not (sparse and name.startswith("tables."))]
        self.dense = _adam(dense, config)
        self.tables = RowWiseAdagrad(tables, lr=config.table_learning_rate) if sparse and tables else None
        self.rows_per_feature = model.buckets.tolist()

    @property
    def optimizers(self) -> list[torch.optim.Optimizer]:
        return [self.dense] + ([self.tables] if self.tables is not None else [])

    def zero_grad(self) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)

    def step(self) -> None:
        for opt in self.optimizers:
            opt.step()

    def state_dict(self) -> dict:
        if self.tables is None:
            return self.dense.state_dict()  # the single-Adam format, unchanged
        return {"dense": self.dense.state_dict(), "tables": self.tables.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        split = "tables" in state and "dense" in state
        if split != (self.tables is not None):
            # Weights are kept; only the optimizer's moments start again.
            log.warning("checkpoint's optimizer state is for another table optimizer: optimizer state reset")
            return
        parts = [(self.dense, state if not split else state["dense"])]
        if split:
            assert self.tables is not None
            parts.append((self.tables, _one_table_state(state["tables"], self.rows_per_feature)))
        for opt, saved in parts:
            if not _same_shapes(opt, saved):
                log.warning("checkpoint's optimizer state is for other parameter shapes: optimizer state reset")
                return
        for opt, saved in parts:
            opt.load_state_dict(saved)


def _one_table_state(saved: dict, rows_per_feature: list[int]) -> dict:
    """Row-wise Adagrad state of a table per feature (older checkpoints) as that of the one
    table: the features' accumulators one after another (a feature never stepped: zeros).
    Another number of tables than features is left as it is (the shape check resets it)."""
    ids = [i for group in saved.get("param_groups", []) for i in group["params"]]
    if len(ids) <= 1 or len(ids) != len(rows_per_feature):
        return saved
    sums = []
    for i, rows in zip(ids, rows_per_feature, strict=True):
        accumulator = saved.get("state", {}).get(i, {}).get("sum")
        if accumulator is None:
            accumulator = torch.zeros(rows)
        elif accumulator.dim() > 1:  # torch's element-wise Adagrad: the row's mean
            accumulator = accumulator.float().mean(1)
        sums.append(accumulator.float())
    group = {**saved["param_groups"][0], "params": [ids[0]]}
    return {"state": {ids[0]: {"sum": torch.cat(sums)}}, "param_groups": [group]}


def _same_shapes(opt: torch.optim.Optimizer, saved: dict) -> bool:
    """The saved per-parameter state fits this optimizer's parameters (in order)."""
    params = [p for group in opt.param_groups for p in group["params"]]
    ids = [i for group in saved.get("param_groups", []) for i in group["params"]]
    if len(ids) != len(params):
        return False
    for i, p in zip(ids, params, strict=True):
        for value in saved.get("state", {}).get(i, {}).values():
            # Adam's moments are shaped as the parameter; row-wise Adagrad keeps one value a row
            if torch.is_tensor(value) and value.dim() > 0 and value.shape not in (p.shape, p.shape[:1]):
                return False
    return True


def _adam(params: list[nn.Parameter], config: ModelConfig) -> torch.optim.Optimizer:
    # The fused kernel is about 2.5x faster on CPU than the loop.
    try:
        return torch.optim.Adam(params, lr=config.learning_rate, weight_decay=config.weight_decay, fused=True)
    except (RuntimeError, TypeError):  # older torch, or a device without the fused kernel
        return torch.optim.Adam(params, lr=config.learning_rate, weight_decay=config.weight_decay)


def make_optimizer(model: RankingModel, config: ModelConfig) -> ModelOptimizer:
    return ModelOptimizer(model, config)
