"""torch.distributed for data-parallel calibration and training (processes started by torchrun).

Each process is a rank of a world; statistics that methods accumulate over calibration tokens
are summed (or maxed) over the ranks before use. Every helper here is a no-op in a single process
(no process group), so code written with them runs unchanged without torchrun and its results
stay bit-identical there.
"""

from __future__ import annotations

import logging
import os

import torch
import torch.distributed as dist

from tinyllm.errors import ConfigError

log = logging.getLogger(__name__)


def initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's rank (0 without a process group)."""
    return dist.get_rank() if initialized() else 0


def world() -> int:
    """The number of processes (1 without a process group)."""
    return dist.get_world_size() if initialized() else 1


def local_rank() -> int:
    """This process's index on its machine (torchrun's LOCAL_RANK; 0 otherwise)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def launched_world() -> int:
    """The world size torchrun asked for (WORLD_SIZE), whether or not the group is up yet."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_from_env() -> int:
    """Start the process group when torchrun launched several processes (WORLD_SIZE > 1): gloo
    for CPU tensors, and NCCL for CUDA tensors where a GPU is present. -> the world size"""
    if launched_world() > 1 and not initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(local_rank() % torch.cuda.device_count())
            backend = "cpu:gloo,cuda:nccl"
        else:
            backend = "gloo"
        dist.init_process_group(backend)
        log.info("rank %d of %d (%s)", rank(), world(), backend)
    return world()


def rank_device(device: torch.device) -> torch.device:
    """The device of this rank: a plain `cuda` under several processes means cuda:LOCAL_RANK."""
    if device.type == "cuda" and device.index is None and launched_world() > 1:
        return torch.device("cuda", local_rank() % torch.cuda.device_count())
    return device


def _all_reduce(t: torch.Tensor, op: dist.ReduceOp) -> torch.Tensor:
    if world() > 1:
        dist.all_reduce(t, op)
    return t


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """t <- the sum of every rank's t (in place; returned)."""
    return _all_reduce(t, dist.ReduceOp.SUM)


def all_reduce_max(t: torch.Tensor) -> torch.Tensor:
    """t <- the elementwise maximum over the ranks (in place; returned)."""
    return _all_reduce(t, dist.ReduceOp.MAX)


def all_reduce_min(t: torch.Tensor) -> torch.Tensor:
    """t <- the elementwise minimum over the ranks (in place; returned)."""
    return _all_reduce(t, dist.ReduceOp.MIN)


def sum_over_ranks(value: float) -> float:
    """A number summed over the ranks (float64); the value itself in a single process."""
    if world() == 1:
        return value
    return float(all_reduce_sum(torch.tensor([value], dtype=torch.float64))[0])


def mean_over_ranks(value: float, weight: float) -> float:
    """The mean of per-rank means `value`, each weighing `weight` (its sample count); the value
    itself, untouched, in a single process."""
    if world() == 1:
        return value
    both = all_reduce_sum(torch.tensor([value * weight, weight], dtype=torch.float64))
    return float(both[0] / both[1])


def shard(windows: torch.Tensor) -> torch.Tensor:
    """This rank's share of the calibration windows [samples, seq]: rows rank, rank + world, ...
    (all of them in a single process). Refuses fewer windows than ranks."""
    n, size = windows.shape[0], init_from_env()
    if size == 1:
        return windows
    if n < size:
        raise ConfigError(
            f"{n} calibration windows cannot be shared by {size} processes; use at least "
            f"{size} samples or fewer processes (--nproc-per-node)"
        )
    return windows[rank() :: size]


def unshard(part: torch.Tensor) -> torch.Tensor:
    """Every rank's `shard` put back in the original order (the full windows on every rank)."""
    size = world()
    if size == 1:
        return part
    counts = torch.tensor([part.shape[0]], dtype=torch.int64)
    most = int(all_reduce_max(counts.clone())[0])
    total = int(all_reduce_sum(counts)[0])
    padded = torch.zeros(most, *part.shape[1:], dtype=part.dtype)
    padded[: part.shape[0]] = part
    parts = [torch.empty_like(padded) for _ in range(size)]
    dist.all_gather(parts, padded)
    full = torch.empty(total, *part.shape[1:], dtype=part.dtype)
    for r, p in enumerate(parts):
        full[r::size] = p[: len(range(r, total, size))]
    return full


def refuse(what: str, why: str, instead: str) -> None:
    """ConfigError under several processes: `what` is not exact when data-parallel."""
    if world() > 1:
        raise ConfigError(
            f"{what} cannot run data-parallel over {world()} processes: {why}, so its result "
            f"would not equal the single-process run; {instead}, or run it in one process "
            "(without torchrun)"
        )
