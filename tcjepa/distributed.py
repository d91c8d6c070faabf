"""Process-group setup for one process (no launcher) or many (deepspeed / torchrun)."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def free_port() -> int:
    """A port nothing listens on now (MASTER_PORT for a run without a launcher; the tests' launchers)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def set_single_process_env() -> None:
    """Without a launcher, DeepSpeed would reach for MPI: pretend to be rank 0 of 1."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))


def init_distributed() -> DistInfo:
    """Initialise ``torch.distributed`` through DeepSpeed (idempotent) and pick the device."""
    import deepspeed
    import torch.distributed as dist

    set_single_process_env()
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        deepspeed.init_distributed(dist_backend=backend, verbose=False)
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, device)


def shutdown() -> None:
    """Destroy the process group just before the process exits (``tcjepa`` as a program does).
    Left to interpreter teardown, its communication threads can be destroyed while still
    joinable: a finished two-process CPU run once died with "terminate called without an active
    exception" (SIGABRT) after its last step. Not for a process that trains again: DeepSpeed keeps
    references to the destroyed group."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()


def mean_count_over_ranks(valid: torch.Tensor) -> torch.Tensor:
    """The number of True entries of ``valid`` averaged over the ranks (a float tensor; no host
    sync). Dividing each rank's summed loss by it instead of by its own count makes the average
    of the ranks' losses (what data-parallel gradients average) the global mean over every real
    token: with padded masks ranks hold different token counts, and per-rank means would weight
    the tokens of a rank with few of them more than a single process does."""
    import torch.distributed as dist

    count = valid.sum().to(torch.float32)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(count)
        count = count / dist.get_world_size()
    return count
