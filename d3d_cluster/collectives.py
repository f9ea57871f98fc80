"""Every collective the project makes itself, in one place, on the device the process group serves.

NCCL serves CUDA tensors only: one CPU tensor in a collective fails every GPU job at its first step ("No backend
type associated with device type cpu"), while gloo, the CPU twin that CI runs, accepts it. So no caller chooses a
collective's device: `group_device()` does, and tests/test_collectives.py fails CI when a module other than this
one calls torch.distributed's collectives. Without a process group (one process, tests) each function acts as the
only rank would.
"""

from __future__ import annotations

from typing import TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


def initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def group_device() -> torch.device:
    """The device of the tensors the job's process group serves: this rank's CUDA device under NCCL, else CPU."""
    if initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def any_rank(*flags: bool | torch.Tensor) -> tuple[bool, ...]:
    """For each flag, whether any rank raised it (one all-reduce for all of them), read by the host once. Flags may
    be tensors on the compute device: they are gathered there; a Python flag is made there (no host copy)."""
    device = group_device()
    values = torch.stack([flag.to(device=device, dtype=torch.float32).reshape(()) if torch.is_tensor(flag)
                          else torch.full((), float(flag), device=device) for flag in flags])
    if initialized():
        dist.all_reduce(values, op=dist.ReduceOp.MAX)
    return tuple(bool(value) for value in values.tolist())


def from_rank0(value: T) -> T:
    """Rank 0's `value` on every rank (a decision one rank takes for all)."""
    if not initialized():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0, device=group_device())
    return box[0]


def gather_to_rank0(value: T) -> list[T] | None:
    """Every rank's `value`, in rank order, on rank 0; None on the others (nothing is copied to them)."""
    if not initialized():
        return [value]
    gathered = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(value, gathered, dst=0)
    return gathered


def barrier() -> None:
    """Wait for every rank; under NCCL on this rank's device (a guessed device can hang the job)."""
    if not initialized():
        return
    device = group_device()
    dist.barrier(device_ids=[device.index] if device.type == "cuda" else None)
