"""Process-group setup for one process (no launcher) or many (deepspeed / torchrun)."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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


def verbose() -> bool:
    """``TCJEPA_VERBOSE=1`` (``tcjepa train --verbose``) shows the libraries' own set-up messages."""
    return os.environ.get("TCJEPA_VERBOSE", "") not in ("", "0")


def quiet_libraries() -> None:
    """Silence set-up messages that mean nothing to a user (unless :func:`verbose`): DeepSpeed's
    "Setting accelerator to CPU" and torch's "No CUDA runtime is found" on a CPU machine. Call it
    before the first ``import deepspeed``; idempotent."""
    import logging

    if verbose():
        return
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # named, so DeepSpeed does not warn that it guessed
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)


def shm_op_is_built() -> bool:
    """Whether DeepSpeed's CPU communication op is already compiled (else the first
    ``init_distributed`` on this machine builds it: about a minute)."""
    from torch.utils.cpp_extension import _get_build_directory

    try:
        build = Path(_get_build_directory("deepspeed_shm_comm", verbose=False))
    except Exception:  # private API: if it moves, assume built and say nothing
        return True
    return any(build.glob("*.so"))


def init_distributed() -> DistInfo:
    """Initialise ``torch.distributed`` through DeepSpeed (idempotent) and pick the device."""
    import contextlib
    import io
    import sys

    quiet_libraries()
    import deepspeed
    import torch.distributed as dist

    set_single_process_env()
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if not torch.cuda.is_available() and not shm_op_is_built() and os.environ.get("RANK", "0") == "0":
            print("building DeepSpeed's CPU communication op (once per machine, about a minute) ...", file=sys.stderr,
                  flush=True)
        # DeepSpeed prints "... built successfully" on every start; shown with --verbose only
        with contextlib.nullcontext() if verbose() else contextlib.redirect_stdout(io.StringIO()):
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


def engine_module(engine: Any) -> Any:
    """The model a DeepSpeed engine wraps (or the model itself, outside an engine)."""
    return engine.module if hasattr(engine, "module") else engine


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
