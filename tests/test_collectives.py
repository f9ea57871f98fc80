"""Collectives run on the device the process group serves. CI has no NCCL, and gloo accepts the CPU tensors NCCL
refuses, so the class of bug (a tensor on the wrong device in a collective) is caught in two ways that need no
GPU: only `d3d_cluster.collectives` may call torch.distributed's collectives, and its functions are checked to
put every tensor they hand over on `group_device()`."""

import ast
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from d3d_cluster import collectives

PACKAGE = Path(collectives.__file__).parent
COLLECTIVES = {"all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_object", "all_to_all",
               "all_to_all_single", "barrier", "batch_isend_irecv", "broadcast", "broadcast_object_list", "gather",
               "gather_object", "irecv", "isend", "monitored_barrier", "recv", "reduce", "reduce_scatter",
               "reduce_scatter_tensor", "scatter", "scatter_object_list", "send"}


def collective_calls(source: str) -> list[str]:
    """`name` for every torch.distributed collective the source calls or imports by name."""
    tree = ast.parse(source)
    aliases = {"torch.distributed"}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            aliases |= {a.asname for a in node.names if a.name == "torch.distributed" and a.asname}
        elif isinstance(node, ast.ImportFrom) and node.module == "torch":
            aliases |= {a.asname or a.name for a in node.names if a.name == "distributed"}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module == "torch.distributed":
            found += [a.name for a in node.names if a.name in COLLECTIVES]
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in COLLECTIVES \
                and ast.unparse(node.func.value) in aliases:
            found.append(node.func.attr)
    return found


def test_no_module_but_collectives_calls_a_torch_distributed_collective():
    offenders = {str(path.relative_to(PACKAGE)): calls for path in sorted(PACKAGE.rglob("*.py"))
                 if path.name != "collectives.py" and (calls := collective_calls(path.read_text()))}
    assert offenders == {}, f"call these through d3d_cluster.collectives, which runs them on the group's device"


def test_the_scan_finds_collectives_however_torch_distributed_is_named():
    source = """
import torch
import torch.distributed as dist
from torch import distributed as d
from torch.distributed import all_gather_object

def step(flags):
    dist.all_reduce(flags)
    torch.distributed.barrier()
    d.broadcast(flags, src=0)
    dist.get_rank()
"""
    assert sorted(collective_calls(source)) == ["all_gather_object", "all_reduce", "barrier", "broadcast"]


def test_on_a_cpu_group_or_none_the_group_device_is_the_cpu_and_a_lone_rank_gets_its_own_values():
    assert collectives.group_device() == torch.device("cpu")
    assert collectives.any_rank(torch.tensor(False), True) == (False, True)
    assert collectives.from_rank0("decision") == "decision"
    assert collectives.gather_to_rank0({"rank": 0}) == [{"rank": 0}]
    collectives.barrier()


def test_an_nccl_group_serves_this_ranks_cuda_device(monkeypatch):
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "nccl")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    assert collectives.group_device() == torch.device("cuda", 3)
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "gloo")
    assert collectives.group_device() == torch.device("cpu")


class Handed(Exception):
    """Raised by a stand-in collective once it has seen what it was handed."""


@pytest.fixture
def group_on(monkeypatch):
    """A process group whose device is `device` (the meta device stands in for a GPU: nothing on this machine
    puts a tensor there by accident), with stand-in collectives recording what they are handed."""
    handed = {}

    def serve(device: torch.device) -> dict:
        monkeypatch.setattr(dist, "is_initialized", lambda: True)
        monkeypatch.setattr(collectives, "group_device", lambda: device)

        def record(name):
            def collective(*args, **kwargs):
                handed[name] = (args, kwargs)
                raise Handed(name)
            return collective

        for name in ("all_reduce", "broadcast_object_list", "barrier"):
            monkeypatch.setattr(dist, name, record(name))
        return handed

    return serve


def test_any_rank_hands_the_all_reduce_one_tensor_on_the_group_device_whatever_its_flags_are_on(group_on):
    handed = group_on(torch.device("meta"))
    with pytest.raises(Handed):
        collectives.any_rank(torch.isfinite(torch.tensor([1.0, float("nan")])).all(), True)
    (flags,), _ = handed["all_reduce"]
    assert flags.device == torch.device("meta") and flags.shape == (2,)


def test_broadcasts_and_barriers_are_told_the_group_device(group_on):
    handed = group_on(torch.device("cuda", 1))
    with pytest.raises(Handed):
        collectives.from_rank0("requeue")
    assert handed["broadcast_object_list"][1]["device"] == torch.device("cuda", 1)
    with pytest.raises(Handed):
        collectives.barrier()
    assert handed["barrier"][1]["device_ids"] == [1]


def test_a_rank_that_never_publishes_to_the_store_exchange_fails_the_others_naming_it():
    from datetime import timedelta

    from d3d_cluster.monitor import free_port

    store = collectives.rendezvous_store("127.0.0.1", free_port(), 0, 3, timedelta(seconds=1))
    store.set("check/1", '"rank 1 was here"')
    with pytest.raises(TimeoutError, match=r"^check: rank\(s\) 2 of 3 published nothing within 0:00:01 "):
        collectives.gather_over_store(store, "check", 0, 3, "rank 0")


def _rank_after_the_store(rank: int, port: int, outcomes) -> None:
    """One rank: the exchange on its own store, then torch's env:// rendezvous (how DeepSpeed starts the process group)
    on the same MASTER_PORT, used at once."""
    import os
    from datetime import timedelta

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    try:
        store = collectives.rendezvous_store("127.0.0.1", port, rank, 2, timedelta(seconds=30))
        seen = collectives.gather_over_store(store, "check", rank, 2, {"rank": rank})
        group_store, _, _ = next(dist.rendezvous("env://", rank=rank, world_size=2, timeout=timedelta(seconds=30)))
        group_store.set(f"group/{rank}", str(rank))
        group_store.wait(["group/0", "group/1"])
        outcomes.put((rank, seen, [group_store.get(f"group/{other}").decode() for other in range(2)]))
    except Exception as error:  # noqa: BLE001 - the test shows what the rank met
        outcomes.put((rank, f"{type(error).__name__}: {error}", None))


def test_the_process_groups_rendezvous_after_the_store_exchange_shares_its_server_on_the_master_port():
    """Rank 0 opens the store on MASTER_PORT before torch's env:// rendezvous does: the rendezvous must share it,
    not fail to bind the port or leave peers on a server about to close. A rank stuck over a minute fails the test."""
    import multiprocessing

    from d3d_cluster.monitor import free_port

    context = multiprocessing.get_context("fork")
    outcomes = context.Queue()
    port = free_port()
    ranks = [context.Process(target=_rank_after_the_store, args=(rank, port, outcomes)) for rank in range(2)]
    for process in ranks:
        process.start()
    try:
        results = sorted(outcomes.get(timeout=60) for _ in ranks)
    finally:
        for process in ranks:
            process.join(timeout=10)
            if process.is_alive():
                process.kill()
    assert results == [(rank, [{"rank": 0}, {"rank": 1}], ["0", "1"]) for rank in range(2)]
