"""Losses: hard labels for the serving heads; soft teacher labels through the aux or main head.

Modes (arXiv 2408.14678, section 3): ``aux`` keeps the serving head on hard labels only and
lets an auxiliary head on the shared layers learn the teacher, so teacher bias does not leak
into what is served; ``direct`` mixes hard and soft targets in the serving head; ``none`` is
the baseline.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from distill.core.config import DistillMode, TaskType


def task_loss(output: torch.Tensor, target: torch.Tensor, kind: TaskType) -> torch.Tensor:
    if kind == "binary":
        return F.binary_cross_entropy_with_logits(output, target)
    return F.mse_loss(output, target)


def soft_loss(output: torch.Tensor, teacher: torch.Tensor, kind: TaskType, temperature: float) -> torch.Tensor:
    """Soft-target cross-entropy on probabilities (binary) or MSE to the teacher's value."""
    if kind == "binary":
        t = temperature
        return F.binary_cross_entropy_with_logits(output / t, torch.sigmoid(teacher / t)) * (t * t)
    return F.mse_loss(output, teacher)


def hard_losses(main: torch.Tensor, labels: torch.Tensor, kinds: list[TaskType]) -> list[torch.Tensor]:
    return [task_loss(main[:, i].float(), labels[:, i], kind) for i, kind in enumerate(kinds)]


def weighted_sum(losses: list[torch.Tensor], weights: list[float] | None) -> torch.Tensor:
    if weights is None:
        return torch.stack(losses).sum()
    return torch.stack([w * x for w, x in zip(weights, losses, strict=True)]).sum()


def student_loss(
    mode: DistillMode,
    main: torch.Tensor,
    aux: torch.Tensor | None,
    labels: torch.Tensor,
    teacher: torch.Tensor | None,
    kinds: list[TaskType],
    distilled: list[int],
    soft_weights: list[float] | float,
    temperature: float,
    task_weights: list[float] | None = None,
) -> tuple[torch.Tensor, dict[tuple[int, str], torch.Tensor]]:
    """Total loss and its parts by (task index, head): head ``main``, ``soft`` or ``aux``.

    ``teacher`` is None when no label joined this batch: every mode falls back to hard labels.
    ``distilled`` lists the task indices the teacher teaches; aux column j belongs to distilled[j],
    and so does ``soft_weights[j]`` (one number: the same for every distilled task).
    ``task_weights`` scale each task's part (hard and soft alike); None: 1 each.
    """
    hard = hard_losses(main, labels, kinds)
    parts: dict[tuple[int, str], torch.Tensor] = {(i, "main"): h for i, h in enumerate(hard)}
    if teacher is None or mode == "none" or not distilled:
        return weighted_sum(hard, task_weights), parts
    if isinstance(soft_weights, float | int):
        soft_weights = [float(soft_weights)] * len(distilled)
    weight_of = dict(zip(distilled, soft_weights, strict=True))
    if mode == "direct":
        total = []
        for i, h in enumerate(hard):
            if i in weight_of:
                s = soft_loss(main[:, i].float(), teacher[:, i], kinds[i], temperature)
                parts[(i, "soft")] = s
                h = (1 - weight_of[i]) * h + weight_of[i] * s
            total.append(h)
        return weighted_sum(total, task_weights), parts
    assert aux is not None, "aux mode needs a model built with aux heads"
    soft = []
    for j, i in enumerate(distilled):
        s = soft_loss(aux[:, j].float(), teacher[:, i], kinds[i], temperature)
        parts[(i, "aux")] = s
        scale = weight_of[i] * (task_weights[i] if task_weights is not None else 1.0)
        soft.append(scale * s)
    return weighted_sum(hard, task_weights) + torch.stack(soft).sum(), parts
