"""Losses: hard labels for the serving heads; soft teacher labels through the aux or main head.

Modes (arXiv 2408.14678, section 3): ``aux`` keeps the serving head on hard labels only and
lets an auxiliary head on the shared layers learn the teacher, so teacher bias does not leak
into what is served; ``direct`` mixes hard and soft targets in the serving head; ``none`` is
the baseline.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from distill.config import DistillMode, TaskType


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


def student_loss(
    mode: DistillMode,
    main: torch.Tensor,
    aux: torch.Tensor | None,
    labels: torch.Tensor,
    teacher: torch.Tensor | None,
    kinds: list[TaskType],
    distilled: list[int],
    soft_weight: float,
    temperature: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Total loss and its parts by name (``<task index>.main`` / ``.aux``).

    ``teacher`` is None when no label joined this batch: every mode falls back to hard labels.
    ``distilled`` lists the task indices the teacher teaches; aux column j belongs to distilled[j].
    """
    hard = hard_losses(main, labels, kinds)
    parts = {f"{i}.main": h for i, h in enumerate(hard)}
    if teacher is None or mode == "none":
        return torch.stack(hard).sum(), parts
    if mode == "direct":
        total = []
        for i, h in enumerate(hard):
            if i in distilled:
                s = soft_loss(main[:, i].float(), teacher[:, i], kinds[i], temperature)
                parts[f"{i}.soft"] = s
                h = (1 - soft_weight) * h + soft_weight * s
            total.append(h)
        return torch.stack(total).sum(), parts
    assert aux is not None, "aux mode needs a model built with aux heads"
    soft = []
    for j, i in enumerate(distilled):
        s = soft_loss(aux[:, j].float(), teacher[:, i], kinds[i], temperature)
        parts[f"{i}.aux"] = s
        soft.append(s)
    return torch.stack(hard).sum() + soft_weight * torch.stack(soft).sum(), parts
