"""The trainer's torch.distributed ranks, or a single process when not launched by torchrun.

torchrun sets RANK, LOCAL_RANK and WORLD_SIZE (and the rendezvous address); with one process
every collective is a no-op, so the trainer has one code path for both.
"""

from __future__ import annotations

import logging
import os
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from distill.core.config import TeacherConfig
from distill.learn.models import resolve_device

log = logging.getLogger(__name__)


class Ranks:
    def __init__(self, rank: int = 0, local_rank: int = 0, world: int = 1):
        self.rank, self.local_rank, self.world = rank, local_rank, world

    @classmethod
    def from_env(cls, teacher: TeacherConfig) -> tuple[Ranks, torch.device]:
        """Join the process group torchrun describes; returns the ranks and this rank's device."""
        env = os.environ
        ranks = cls(int(env.get("RANK", "0")), int(env.get("LOCAL_RANK", "0")), int(env.get("WORLD_SIZE", "1")))
        device = resolve_device(teacher.device)
        if device.type == "cuda":
            device = torch.device("cuda", ranks.local_rank)
            torch.cuda.set_device(device)
        if ranks.world > 1:
            backend = teacher.pool.backend
            if backend == "auto":
                backend = "nccl" if device.type == "cuda" else "gloo"
            # A rank waiting for a slow peer (checkpointing, a broker hiccup) must not time out.
            dist.init_process_group(backend, timeout=timedelta(minutes=30))
            log.info("joined the process group", extra={"rank": ranks.rank, "world": ranks.world, "backend": backend})
        return ranks, device

    @property
    def leader(self) -> bool:
        return self.rank == 0

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum over the ranks, in place."""
        if self.world > 1:
            dist.all_reduce(tensor)
        return tensor

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, on every rank."""
        if self.world == 1:
            return [obj]
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj``, on every rank."""
        if self.world == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def close(self) -> None:
        if self.world > 1 and dist.is_initialized():
            dist.destroy_process_group()
