"""The one learning step: score a batch with the weights before the step, then step once.

Every model of the system learns through ``Learner.step``: the teacher (its scores are the
labels it publishes), the trainer's ranks, the students and both arms of ``distill sweep``. The
labelers score with ``predict``. So predict-before-train, the losses of each mode, target
standardisation and the optimizers are written here once.

One step on one example batch:
  1. forward pass in training mode; its outputs, detached and in the targets' units, are the
     batch's scores (progressive validation, and the teacher's labels). A model with dropout
     scores with a separate forward pass in eval mode, so a label never carries dropout noise;
  2. the batch's regression targets update the running mean and variance (all-reduced first
     on a trainer with several ranks);
  3. the losses of the configured mode on standardised targets; a non-finite loss skips the
     optimizer step (every rank skips it together);
  4. backward, gradients all-reduced across ranks if there are several, one optimizer step.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from distill.core.config import Config, DistillMode, FeaturesConfig, ModelConfig, StudentConfig, TaskType
from distill.core.wire import ExampleBatch
from distill.learn.losses import student_loss
from distill.learn.models import ModelOptimizer, RankingModel, autocast, batch_tensors, make_optimizer, target_moments

AllReduce = Callable[[torch.Tensor], torch.Tensor]

# Subnormal floats (below ~1e-38: optimizer state of rarely seen rows, tiny gradients) take CPU
# kernels' slow path; flushed to zero they cost nothing and change nothing these models learn.
# Measured: a student step 4.6 -> 3.3 ms. A process that trains is a worker; the setting is its.
torch.set_flush_denormal(True)


@dataclass(frozen=True)
class Objective:
    """What a model learns: hard labels, and in ``aux``/``direct`` mode the teacher's labels."""

    kinds: list[TaskType]
    task_weights: list[float]
    mode: DistillMode = "none"
    distilled: list[int] = field(default_factory=list)  # task indices the teacher teaches
    temperature: float = 1.0

    @classmethod
    def teacher(cls, config: Config) -> Objective:
        return cls([t.type for t in config.tasks], [t.loss_weight for t in config.tasks])

    @classmethod
    def student(cls, config: Config, sc: StudentConfig, mode: DistillMode | None = None) -> Objective:
        return cls(
            [t.type for t in config.tasks],
            [t.loss_weight for t in config.tasks],
            mode or sc.mode,
            config.distilled_tasks(sc),
            sc.temperature,
        )


@dataclass
class Batch:
    """One example batch as tensors on the model's device, in the model's feature columns."""

    categorical: torch.Tensor
    dense: torch.Tensor
    labels: torch.Tensor
    labels_np: np.ndarray
    size: int


@dataclass
class Scored:
    """What one step reports. ``main``/``aux`` come from the weights before the step."""

    main: np.ndarray  # [n, tasks] logits / values in the targets' units
    aux: np.ndarray | None  # [n, distilled tasks], aux mode only
    losses: dict[tuple[int, str], torch.Tensor]  # (task index, head) -> loss; empty if skipped
    stepped: bool  # False: a non-finite loss or gradient skipped the optimizer step


class Columns:
    """Selects a model's feature columns from a batch that carries every configured one."""

    def __init__(self, all_features: FeaturesConfig, used: FeaturesConfig):
        self.categorical = [all_features.categorical_names.index(n) for n in used.categorical_names]
        self.dense = [list(all_features.dense).index(n) for n in used.dense]
        self.everything = used is all_features or (
            self.categorical == list(range(len(all_features.categorical)))
            and self.dense == list(range(len(all_features.dense)))
        )

    def batch(self, batch: ExampleBatch, device: torch.device) -> Batch:
        cat, dense, labels = batch_tensors([batch], device)
        if not self.everything:
            cat, dense = cat[:, self.categorical], dense[:, self.dense]
        return Batch(cat, dense, labels, batch.labels, batch.size)


class Learner:
    """A model, its optimizers and its objective; ``step`` is the only way it learns."""

    def __init__(
        self,
        model: RankingModel,
        model_config: ModelConfig,
        objective: Objective,
        device: torch.device,
        columns: Columns,
        all_reduce: AllReduce | None = None,
    ):
        self.model = model
        self.optimizer: ModelOptimizer = make_optimizer(model, model_config)
        self.objective = objective
        self.device = device
        self.columns = columns
        self.all_reduce = all_reduce  # a trainer's ranks: every step is collective
        self.eval_scores = model_config.dropout > 0
        model.train()

    @classmethod
    def build(
        cls,
        config: Config,
        model_config: ModelConfig,
        objective: Objective,
        device: torch.device,
        features: FeaturesConfig | None = None,
        all_reduce: AllReduce | None = None,
    ) -> Learner:
        """A fresh model from ``model_config.seed`` (the same initial weights in every process)."""
        features = features or config.features
        names = [config.tasks[i].name for i in objective.distilled] if objective.mode == "aux" else None
        torch.manual_seed(model_config.seed)
        model = RankingModel(features, config.tasks, model_config, aux_tasks=names).to(device)
        return cls(model, model_config, objective, device, Columns(config.features, features), all_reduce)

    def tensors(self, batch: ExampleBatch) -> Batch:
        return self.columns.batch(batch, self.device)

    def state_dict(self) -> dict[str, Any]:
        """The checkpoint entries of the model and its optimizers."""
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """From a checkpoint's state (written by any version: the model takes old layouts)."""
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])

    def step(
        self,
        batch: Batch | None,
        teacher: np.ndarray | None = None,
        soft_weight: float = 0.0,
        gate: list[float] | None = None,
        share: float = 1.0,
    ) -> Scored | None:
        """Score ``batch``, then one optimizer step on it.

        ``teacher``: the teacher's labels in raw units ([n, tasks]) or None. ``soft_weight``:
        the configured weight of the soft labels. ``gate``: per distilled task, the share in
        [0, 1] the teacher-quality gate lets through (None: all). In ``direct`` mode it scales
        the soft share of the serving head's target; in ``aux`` mode the aux head always
        learns the labels with the full weight and the gate scales what reaches the shared
        layers, so the head is ready whenever the gate opens. ``share``: this batch's share of
        the examples of a collective step (its loss is scaled by it, so the summed gradient is
        the mean). A rank without a batch passes None and still joins the collectives."""
        model, obj = self.model, self.objective
        self.optimizer.zero_grad()
        scored: Scored | None = None
        finite = True
        if batch is not None:
            if self.eval_scores:
                scores = predict(model, batch.categorical, batch.dense)
            gates = gate if gate is not None else [1.0] * len(obj.distilled)
            aux_share = None
            if obj.mode == "aux" and gate is not None:
                aux_share = torch.tensor(gates, dtype=torch.float32, device=self.device)
            soft_weights = [soft_weight * g for g in gates] if obj.mode == "direct" else soft_weight
            with autocast(self.device):
                main, aux = model(batch.categorical, batch.dense, aux_share)
            if not self.eval_scores:
                scores = model.to_raw(main.detach()).cpu().numpy()
            aux_np = None if aux is None else model.to_raw(aux.detach(), aux=True).cpu().numpy()
            scored = Scored(scores, aux_np, {}, False)
            self._observe(target_moments(batch.labels))
            labels = model.standardize(batch.labels)
            soft = None if teacher is None else model.standardize(_on(teacher, self.device))
            loss, parts = student_loss(
                obj.mode,
                main,
                aux,
                labels,
                soft,
                obj.kinds,
                obj.distilled,
                soft_weights,
                obj.temperature,
                obj.task_weights,
            )
            finite = bool(torch.isfinite(loss).item())
            if finite:
                (loss * share).backward()
                scored.losses = parts
        elif self.all_reduce is not None:
            self._observe(torch.zeros(3, len(obj.kinds), dtype=torch.float64, device=self.device))
        if not self._reduce_gradients(finite):
            return scored
        self.optimizer.step()
        if scored is not None:
            scored.stepped = True
        return scored

    def _observe(self, moments: torch.Tensor) -> None:
        if self.all_reduce is not None:
            moments = self.all_reduce(moments)
        self.model.observe_targets(moments)

    def _reduce_gradients(self, local_finite: bool) -> bool:
        """Sum the ranks' gradients in one all-reduce; False (on every rank) if not finite.

        Table gradients are sparse; they are made dense for the all-reduce (row-wise Adagrad
        leaves a row whose summed gradient is zero exactly where it was)."""
        if self.all_reduce is None:
            return local_finite
        params = [p for p in self.model.parameters() if p.requires_grad]
        grads = [_dense_grad(p) for p in params]
        if not local_finite:  # a NaN on one rank must stop the step on all of them
            grads[0] = torch.full_like(grads[0], float("nan"))
        flat = self.all_reduce(torch.cat([g.reshape(-1) for g in grads]))
        if not torch.isfinite(flat).all().item():
            return False
        offset = 0
        for p in params:
            n = p.numel()
            p.grad = flat[offset : offset + n].view_as(p)
            offset += n
        return True


def _dense_grad(p: torch.Tensor) -> torch.Tensor:
    if p.grad is None:
        return torch.zeros_like(p)
    return p.grad.to_dense() if p.grad.is_sparse else p.grad


def _on(values: np.ndarray, device: torch.device) -> torch.Tensor:
    return torch.from_numpy(np.array(values, dtype=np.float32)).to(device)


def predict(model: RankingModel, categorical: torch.Tensor, dense: torch.Tensor) -> np.ndarray:
    """Scores [n, tasks] in the targets' units, from an eval-mode pass without gradients."""
    was_training = model.training
    model.eval()
    with torch.no_grad(), autocast(categorical.device):
        main, _ = model(categorical, dense)
    model.train(was_training)
    return model.to_raw(main).cpu().numpy()
