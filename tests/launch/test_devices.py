"""Each rank chooses its device from what it sees (never a silent CPU run where GPUs were asked for), and the ranks
agree on it across nodes before a process group starts."""

import multiprocessing
import queue
import socket
from datetime import timedelta

import pytest
import torch

from d3d_cluster.collectives import rendezvous_store
from d3d_cluster.launch.devices import (DeviceClaim, DevicesSeen, DeviceUnavailable, agree_on_device, compute_device,
                                        device_disagreement)
from d3d_cluster.monitor import free_port
from d3d_cluster.spec import ClusterSpec


@pytest.fixture
def node_without_gpus(monkeypatch):
    """What CUDA reports on a CPU node (the real answer on CI; pinned so that the test means the same on a GPU
    machine)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")


@pytest.mark.parametrize("cluster", [{"gpus_per_node": 2}, {"device": "cuda"}])
def test_a_rank_asked_to_use_a_gpu_on_a_node_without_one_stops_naming_the_node_and_what_it_saw(cluster,
                                                                                               node_without_gpus):
    spec = ClusterSpec(**cluster)
    with pytest.raises(DeviceUnavailable) as error:
        compute_device(spec, 0, DevicesSeen.here(spec))
    message = str(error.value)
    assert message.startswith(f"{socket.gethostname()}: ")
    assert "ranks find 0 CUDA device(s) (CUDA_VISIBLE_DEVICES=, nvidia-smi " in message
    assert f"torch {torch.__version__}" in message and message.endswith("or set cluster.device: cpu")


@pytest.mark.parametrize("cluster, seen, local_rank, device", [
    ({"tasks_per_node": 4, "gpus_per_node": 4}, 4, 3, "cuda:3"),  # each rank sees the node's GPUs: its local rank's
    ({"tasks_per_node": 4}, 8, 3, "cuda:3"),                      # more GPUs than ranks: the first ones
    ({"tasks_per_node": 4, "gpus_per_node": 4}, 1, 3, "cuda:0"),  # one bound to each task: the one it sees
    ({"tasks_per_node": 4}, 1, 2, "cuda:0"),                      # bound by a site default, device auto
    ({"tasks_per_node": 8, "device": "cuda"}, 1, 7, "cuda:0"),
    ({"tasks_per_node": 1, "device": "cuda"}, 1, 0, "cuda:0"),
    ({"tasks_per_node": 4}, 0, 3, "cpu"),                         # auto on a CPU node
    ({"tasks_per_node": 4, "device": "cpu"}, 8, 3, "cpu"),        # never a GPU
    ({"tasks_per_node": 4, "device": "cpu"}, 1, 3, "cpu"),
])
def test_a_rank_takes_the_gpu_of_its_local_rank_where_it_sees_the_nodes_and_the_one_it_sees_where_bound(
        cluster, seen, local_rank, device):
    assert compute_device(ClusterSpec(**cluster), local_rank, DevicesSeen("node-a", seen)) == torch.device(device)


@pytest.mark.parametrize("cluster, visible", [
    ({"tasks_per_node": 4}, "0,1"),
    ({"tasks_per_node": 4, "gpus_per_node": 4}, "0,1,2"),
    ({"tasks_per_node": 8, "device": "cuda"}, "4,5"),
])
def test_a_gpu_count_neither_the_nodes_nor_one_a_rank_stops_naming_the_node_the_count_and_visible_devices(cluster,
                                                                                                        visible):
    seen = len(visible.split(","))
    with pytest.raises(DeviceUnavailable) as error:
        compute_device(ClusterSpec(**cluster), 0, DevicesSeen("node-a", seen, visible))
    assert str(error.value).startswith(f"node-a: each of the node's {cluster['tasks_per_node']} ranks sees {seen} CUDA "
                                       f"device(s) (CUDA_VISIBLE_DEVICES={visible}): neither a GPU for every rank")


def _agree(port: int, claim: DeviceClaim, world: int, outcomes) -> None:
    """One rank of a world whose processes meet only through the rendezvous store, as a job's ranks do."""
    store = rendezvous_store("127.0.0.1", port, claim.rank, world, timedelta(seconds=30))
    try:
        agree_on_device(claim, world, store)
        outcomes.put((claim.rank, "agreed"))
    except DeviceUnavailable as error:
        outcomes.put((claim.rank, f"{type(error).__name__}: {error}"))


def _world(*claims: DeviceClaim) -> dict[int, str]:
    """How each rank of a world of real processes, one a claim, left the agreement; a rank that does not leave it
    within a minute fails the test (and is killed) instead of hanging it."""
    context = multiprocessing.get_context("fork")
    outcomes = context.Queue()
    port = free_port()
    ranks = [context.Process(target=_agree, args=(port, claim, len(claims), outcomes)) for claim in claims]
    for process in ranks:
        process.start()
    try:
        return dict(outcomes.get(timeout=60) for _ in claims)
    except queue.Empty:
        pytest.fail("a rank waited over a minute in the device agreement")
    finally:
        for process in ranks:
            process.join(timeout=10)
            if process.is_alive():
                process.kill()


def test_a_node_that_would_start_nccl_while_its_peer_starts_gloo_fails_every_rank_naming_it_without_hanging():
    outcomes = _world(DeviceClaim(0, "node-a", "cpu", 0, ""), DeviceClaim(1, "node-b", "cuda", 1, "0", gpu="GPU-b0"))
    assert outcomes[0] == outcomes[1]
    assert outcomes[0].startswith("DevicesDisagree: the ranks would start different process groups (NCCL on cuda, "
                                  "gloo on cpu) and hang at the first collective: node-b (rank 1) uses cuda, seeing 1 "
                                  "CUDA device(s) (CUDA_VISIBLE_DEVICES=0), while the other 1 rank(s), on 1 node(s), "
                                  "use cpu; ")


def test_ranks_that_agree_go_on_and_a_rank_that_cannot_choose_fails_with_its_own_error_its_peer_naming_it():
    agreeing = _world(DeviceClaim(0, "node-a", "cpu", 0), DeviceClaim(1, "node-b", "cpu", 0))
    assert agreeing == {0: "agreed", 1: "agreed"}
    refusal = "node-b: cluster.device is cuda, but the node's 1 ranks find 0 CUDA device(s) (...)"
    refused = _world(DeviceClaim(0, "node-a", "cuda", 1, gpu="GPU-a0"),
                     DeviceClaim(1, "node-b", "none", 0, problem=refusal))
    assert refused == {0: f"DevicesDisagree: rank 1 on {refusal}", 1: f"DeviceUnavailable: {refusal}"}


def test_a_node_losing_its_gpus_under_device_auto_is_named_against_the_many_ranks_that_kept_theirs():
    claims = [DeviceClaim(rank, f"gpu{rank // 4}", "cuda", 4, "0,1,2,3", gpu=f"GPU-{rank}") for rank in range(8)]
    claims += [DeviceClaim(rank, "gpu2", "cpu", 0) for rank in range(8, 12)]
    assert device_disagreement(claims).startswith(
        "the ranks would start different process groups (NCCL on cuda, gloo on cpu) and hang at the first collective: "
        "gpu2 (ranks 8, 9, 10, 11) uses cpu, seeing 0 CUDA device(s) (CUDA_VISIBLE_DEVICES=unset), while the other 8 "
        "rank(s), on 2 node(s), use cuda")
    assert device_disagreement(claims[:8]) is None and device_disagreement(claims[8:]) is None


def test_two_ranks_of_a_node_that_see_one_same_gpu_are_refused_naming_it():
    """One GPU seen is taken as one bound to each task; where the node's tasks all see the same one, they differ
    only by the GPU's UUID."""
    claims = [DeviceClaim(rank, "gpu0", "cuda", 1, "0", gpu="GPU-0") for rank in range(2)]
    assert device_disagreement(claims) == (
        "gpu0 (ranks 0, 1) uses cuda, seeing 1 CUDA device(s) (CUDA_VISIBLE_DEVICES=0): all on GPU GPU-0, and NCCL "
        "cannot run two ranks on one GPU; bind one GPU to each task (cluster.sbatch_options gpus-per-task: 1), or set "
        "cluster.tasks_per_node to the node's GPUs")
    bound = [DeviceClaim(rank, "gpu0", "cuda", 1, str(rank), gpu=f"GPU-{rank}") for rank in range(2)]
    assert device_disagreement(bound) is None
