"""Every collective the project makes itself, in one place, on the device the process group serves.

NCCL serves CUDA tensors only: one CPU tensor in a collective fails every GPU job at its first step ("No backend
type associated with device type cpu"), while gloo, the CPU twin that CI runs, accepts it. So no caller chooses a
collective's device: `group_device()` does, and tests/test_collectives.py fails CI when a module other than this
one calls torch.distributed's collectives. Without a process group (one process, tests) each function acts as the
only rank would. One exchange comes before any process group (`gather_over_store`): it runs on the rendezvous store,
which needs no backend, so that ranks learn whether they would start the same one.
"""

from __future__ import annotations

import datetime
import json
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


def rendezvous_store(host: str, port: int, rank: int, world: int, timeout: datetime.timedelta) -> dist.TCPStore:
    """The store torch's env:// rendezvous serves from rank 0 at MASTER_ADDR:MASTER_PORT, opened before it. It is
    multi-tenant, as the rendezvous opens its own: while this object lives, rank 0's process group shares its server
    instead of binding the port again under peers already connected, so keep it until the group has started."""
    return dist.TCPStore(host, port, world, is_master=rank == 0, timeout=timeout, multi_tenant=True,
                         wait_for_workers=False)


def gather_over_store(store: dist.Store, name: str, rank: int, world: int, value: T) -> list[T]:
    """Every rank's JSON-able `value`, in rank order, on every rank, with no process group: ranks that would start
    different backends still meet here. A rank that never publishes fails the others after the store's timeout,
    naming it. Rank 0, whose process serves the store, returns only once every rank has read, so that it may fail
    at once without cutting a peer off mid-read."""
    keys = [f"{name}/{other}" for other in range(world)]
    store.set(keys[rank], json.dumps(value))
    try:
        store.wait(keys)
    except dist.DistStoreError as error:
        missing = [other for other, key in enumerate(keys) if not store.check([key])]
        raise TimeoutError(f"{name}: rank(s) {', '.join(map(str, missing))} of {world} published nothing within "
                           f"{store.timeout} (not started, or stopped before they could)") from error
    values = [json.loads(store.get(key)) for key in keys]
    if store.add(f"{name}/read", 1) == world:
        store.set(f"{name}/all-read", "")
    if rank == 0:
        store.wait([f"{name}/all-read"])
    return values
