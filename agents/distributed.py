"""Data parallel training under ``torchrun`` / ``accelerate launch`` (DDP): the process group, each process's
share of a batch, and the collectives the trainers use. One process (``WORLD_SIZE`` unset or 1) needs none of it.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["LossModule", "check_divides_among_processes", "distributed", "gather_tensors", "is_main_process",
           "join_process_group", "refuse_distributed", "shard"]


def join_process_group(device: torch.device) -> torch.device:
    """Join the process group of a ``torchrun`` / ``accelerate launch`` run (``WORLD_SIZE`` > 1) and
    return this process's device: ``cuda:LOCAL_RANK`` on GPUs (NCCL), the CPU otherwise (gloo).

    Every process must run the same command: the same seed gives them the same model, data order and
    held-out split, and :func:`run_training` deals each step's batch out among them.
    """
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device


def distributed() -> tuple[int, int]:
    """``(rank, world size)`` of this process's data-parallel group; ``(0, 1)`` when it trains alone."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main_process() -> bool:
    """True on the process that logs, evaluates and writes files (rank 0, or the only one)."""
    return distributed()[0] == 0


def refuse_distributed(what: str) -> None:
    """Raise if launched as several processes: ``what`` does not split its work among them yet."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError(f"{what} does not run data parallel yet (WORLD_SIZE={os.environ['WORLD_SIZE']}): "
                         "launch it as one process; `rlhf sft`, `rlhf rm`, `rlhf dpo` and `rlhf ppo` run under "
                         "torchrun")


def shard(indices: list[int], rank: int, world: int, weights: Sequence[float] | None = None) -> tuple[list[int], float]:
    """This process's share of one step's batch ``indices``, and the factor its mean loss is scaled by.

    The examples are dealt out round-robin. DDP averages the processes' gradients, so a process
    whose share holds ``n`` of the batch's ``N`` examples scales its (per-example mean) loss by
    ``n * world / N``: the averaged gradient is then exactly that of the mean over all ``N``. A loss
    that is a mean over something else (SFT's, over target tokens) gives each example its
    ``weights[i]`` (its number of targets) and the share is weighed by those. A batch with fewer
    examples than processes goes whole to every process (factor 1), so none idles without a loss
    to back-propagate.
    """
    if world == 1 or len(indices) < world:
        return indices, 1.0
    mine = indices[rank::world]
    if weights is None:
        return mine, len(mine) * world / len(indices)
    total = sum(weights[i] for i in indices)
    return mine, sum(weights[i] for i in mine) * world / total if total else 1.0


class LossModule(nn.Module):
    """``loss_fn(model, batch)`` as a module's forward, so that DDP sees the pass it synchronises."""

    def __init__(self, model: nn.Module, loss_fn: Callable[[nn.Module,
                                                            Any], tuple[torch.Tensor, dict[str, torch.Tensor]]]):
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, batch: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return self.loss_fn(self.model, batch)


def check_divides_among_processes(batch_size: int, name: str) -> None:
    """Raise unless ``batch_size`` responses divide among the ``WORLD_SIZE`` processes of a data-parallel run."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if batch_size % world:
        raise ValueError(f"{name} {batch_size} does not divide among {world} processes (WORLD_SIZE): "
                         f"make it a multiple of {world}")


def gather_tensors(rollout: dict[str, torch.Tensor], world: int) -> dict[str, torch.Tensor]:
    """Every process's rows of each tensor, concatenated in rank order (each tensor has one shape on every process)."""
    whole = {}
    for key, tensor in rollout.items():
        sent = tensor.to(torch.uint8) if tensor.dtype == torch.bool else tensor.contiguous()  # gloo has no bool
        parts = [torch.empty_like(sent) for _ in range(world)]
        dist.all_gather(parts, sent)
        whole[key] = torch.cat(parts).to(tensor.dtype)
    return whole
