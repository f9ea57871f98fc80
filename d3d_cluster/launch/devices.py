"""Which device each rank trains on, and the check that the whole world chose alike before its process group starts.

Each node decides alone, from what its tasks see (`compute_device`); a world whose ranks would mix NCCL and gloo, or
put two ranks on one GPU, hangs or is refused by NCCL at its first collective, so every rank shows the others its
choice first (`agree_on_device`) and all fail together, naming the node that differs.
"""

from __future__ import annotations

import os
import shutil
import socket
from collections import Counter
from dataclasses import asdict, dataclass

import torch

from d3d_cluster.spec import ClusterSpec


class DeviceUnavailable(RuntimeError):
    """This node cannot give its ranks the device the spec asks for: no GPU where GPUs are asked for, or a number of
    GPUs for each rank that is neither all of the node's nor one of its own."""


class DevicesDisagree(DeviceUnavailable):
    """The job's ranks chose devices that cannot make one process group: NCCL on some and gloo on others (it would
    hang at the first collective), or two ranks of a node on one GPU (NCCL refuses them)."""



@dataclass(frozen=True)
class DevicesSeen:
    """The CUDA devices one rank sees on its node, and the setting that decides how many: what its device choice
    reads, and what every rank shows the others before the process group starts."""

    host: str
    count: int
    cuda_visible_devices: str = "unset"
    build: str = ""  # nvidia-smi and torch's CUDA build: why a node might see none

    @classmethod
    def here(cls, cluster: ClusterSpec) -> DevicesSeen:
        count = torch.cuda.device_count() if cluster.device != "cpu" and torch.cuda.is_available() else 0
        smi = shutil.which("nvidia-smi")
        build = (f"nvidia-smi {smi or 'not found'}, torch {torch.__version__} "
                 f"{'built for CUDA ' + torch.version.cuda if torch.version.cuda else 'built without CUDA'}")
        return cls(socket.gethostname(), count, os.environ.get("CUDA_VISIBLE_DEVICES", "unset"), build)

    def __str__(self) -> str:
        build = f", {self.build}" if self.build else ""
        return f"{self.count} CUDA device(s) (CUDA_VISIBLE_DEVICES={self.cuda_visible_devices}{build})"


def compute_device(cluster: ClusterSpec, local_rank: int, seen: DevicesSeen) -> torch.device:
    """This rank's device, from what it sees. Each rank sees the node's GPUs (Slurm's --gpus-per-node, the local
    executor): its own is the one at its local rank. It sees one (Slurm binds a GPU to each task: --gpus-per-task,
    --gpu-bind, a site default): that one is its own, cuda:0, whatever its local rank. It sees none: the CPU, unless
    the spec asks for GPUs (`cluster.device: cuda`, or `gpus_per_node`), which stops here, naming the node, rather
    than train every rank on CPUs. Any other count fits neither scheme and stops too. Ranks still compare their
    choices before the process group starts (`agree_on_device`): each node decides alone."""
    ranks = cluster.tasks_per_node
    if cluster.device == "cpu":
        return torch.device("cpu")
    if seen.count >= ranks:
        return torch.device("cuda", local_rank)
    if seen.count == 1:
        return torch.device("cuda", 0)
    if seen.count == 0 and not cluster.wants_gpu:
        return torch.device("cpu")
    if seen.count == 0:
        asked = "cluster.device is cuda" if cluster.device == "cuda" else f"cluster.gpus_per_node is {cluster.gpus_per_node}"
        raise DeviceUnavailable(f"{seen.host}: {asked}, but the node's {ranks} ranks find {seen}; submit to a GPU "
                                "partition, or set cluster.device: cpu")
    raise DeviceUnavailable(
        f"{seen.host}: each of the node's {ranks} ranks sees {seen}: neither a GPU for every rank of the node nor "
        f"one bound to each; set cluster.tasks_per_node (and gpus_per_node) to {seen.count}, bind one GPU to each "
        "task (cluster.sbatch_options gpus-per-task: 1), or set cluster.device: cpu")


@dataclass(frozen=True)
class DeviceClaim:
    """One rank's device choice and what it saw, as it shows every other rank before the process group starts."""

    rank: int
    host: str
    device: str  # "cuda", "cpu", or "none" where the choice failed (`problem` says why)
    count: int  # the CUDA devices the rank sees
    cuda_visible_devices: str = "unset"
    gpu: str | None = None  # the chosen GPU's UUID: two ranks of a node on one GPU are caught by it
    problem: str | None = None

    @classmethod
    def of(cls, rank: int, seen: DevicesSeen, device: torch.device) -> DeviceClaim:
        gpu = str(torch.cuda.get_device_properties(device).uuid) if device.type == "cuda" else None
        return cls(rank, seen.host, device.type, seen.count, seen.cuda_visible_devices, gpu)

    @classmethod
    def refused(cls, rank: int, seen: DevicesSeen, refusal: DeviceUnavailable) -> DeviceClaim:
        return cls(rank, seen.host, "none", seen.count, seen.cuda_visible_devices, problem=str(refusal))


def device_disagreement(claims: list[DeviceClaim]) -> str | None:
    """Why the ranks' claims cannot make one process group, or None. The device kind of the most ranks (rank 0's
    on a tie) is taken as meant, and the nodes of the others are named with what they saw."""
    refused = [claim for claim in claims if claim.problem]
    if refused:
        return "; ".join(f"rank {claim.rank} on {claim.problem}" for claim in refused)
    kinds = Counter(claim.device for claim in claims)
    if len(kinds) > 1:
        meant = max(kinds, key=lambda kind: (kinds[kind], kind == claims[0].device))
        odd = [claim for claim in claims if claim.device != meant]
        hosts = {claim.host for claim in claims if claim.device == meant}
        return (f"the ranks would start different process groups (NCCL on cuda, gloo on cpu) and hang at the first "
                f"collective: {_claims_by_host(odd)}, while the other {kinds[meant]} rank(s), on {len(hosts)} "
                f"node(s), use {meant}; check those nodes' GPUs (d3dc submit doctor), leave them out (cluster."
                "sbatch_options exclude: NODE), or set cluster.device: cuda (or cpu) to make every node use one kind")
    sharing: dict[tuple[str, str], list[DeviceClaim]] = {}
    for claim in claims:
        if claim.gpu is not None:
            sharing.setdefault((claim.host, claim.gpu), []).append(claim)
    shared = [group for group in sharing.values() if len(group) > 1]
    if shared:
        return "; ".join(f"{_claims_by_host(group)}: all on GPU {group[0].gpu}" for group in shared) + \
            ", and NCCL cannot run two ranks on one GPU; bind one GPU to each task (cluster.sbatch_options " \
            "gpus-per-task: 1), or set cluster.tasks_per_node to the node's GPUs"
    return None


def _claims_by_host(claims: list[DeviceClaim]) -> str:
    groups: dict[tuple, list[DeviceClaim]] = {}
    for claim in claims:
        groups.setdefault((claim.host, claim.device, claim.count), []).append(claim)
    return "; ".join(
        f"{host} (rank{'s' if len(group) > 1 else ''} {', '.join(str(claim.rank) for claim in group)}) uses {device}, "
        f"seeing {count} CUDA device(s) (CUDA_VISIBLE_DEVICES="
        f"{'|'.join(dict.fromkeys(claim.cuda_visible_devices for claim in group))})"
        for (host, device, count), group in groups.items())


def agree_on_device(claim: DeviceClaim, world: int, store: torch.distributed.Store) -> None:
    """Every rank shows the others its `claim` through the rendezvous `store` (which works whatever backend a rank
    would start) and fails, on every rank, where they disagree: each node chooses its device alone, and a node that
    lost its GPUs under `cluster.device: auto` would start gloo while its peers start NCCL, then hang. A rank whose
    own choice failed raises that failure; its peers name it."""
    from d3d_cluster.collectives import gather_over_store

    claims = [DeviceClaim(**shown) for shown in gather_over_store(store, "d3dc/devices", claim.rank, world,
                                                                 asdict(claim))]
    if claim.problem:
        raise DeviceUnavailable(claim.problem)
    disagreement = device_disagreement(claims)
    if disagreement:
        raise DevicesDisagree(disagreement)
