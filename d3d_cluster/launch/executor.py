"""The submitit executor a stage runs on, from the spec's cluster section, and the checks that refuse, on the
login node, a cluster section Slurm would refuse (or queue forever)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import submitit

from d3d_cluster.spec import ClusterSpec

SLURM_COMMANDS = ("sbatch", "srun", "sinfo")


def slurm_parameters(cluster: ClusterSpec) -> dict:
    """submitit's SlurmExecutor parameters: one task per rank (per GPU), nodes x tasks_per_node of them;
    settings left at None are not passed, so the cluster's defaults apply."""
    parameters = {
        "nodes": cluster.nodes,
        "ntasks_per_node": cluster.tasks_per_node,
        "cpus_per_task": cluster.cpus_per_task,
        "time": cluster.timeout_min,
        "partition": cluster.partition,
        "account": cluster.account,
        "qos": cluster.qos,
        "constraint": cluster.constraint,
        "gpus_per_node": cluster.gpus_per_node,
        "mem": cluster.mem,
        "exclusive": cluster.exclusive or None,
        "signal_delay_s": cluster.signal_delay_s,
    }
    return {key: value for key, value in parameters.items() if value is not None}


def make_executor(cluster: ClusterSpec, folder: Path, name: str = "d3dc") -> submitit.Executor:
    if cluster.executor == "slurm":
        executor = submitit.SlurmExecutor(folder=folder, max_num_timeout=cluster.max_requeues)
        executor.update_parameters(job_name=name, **slurm_parameters(cluster))
        return executor
    executor = submitit.LocalExecutor(folder=folder)
    executor.update_parameters(tasks_per_node=cluster.tasks_per_node, timeout_min=cluster.timeout_min)
    return executor


def check_cluster(cluster: ClusterSpec) -> None:
    """Refuse a Slurm request that cannot run, before anything is queued: no Slurm here, an unknown partition,
    or resources no node of the partition has (`sbatch --test-only` submits nothing)."""
    if cluster.executor != "slurm":
        return
    missing = [command for command in SLURM_COMMANDS if shutil.which(command) is None]
    if missing:
        raise ValueError(f"cluster.executor is slurm, but {', '.join(missing)} cannot be found on PATH "
                         "(run on a Slurm login node, or set cluster.executor: local)")
    if cluster.partition is not None:
        partitions = sorted(set(_slurm("sinfo", "-h", "-o", "%R", refused="cannot list partitions").split()))
        if cluster.partition not in partitions:
            raise ValueError(f"cluster.partition: no partition {cluster.partition!r} on this cluster "
                             f"(partitions: {', '.join(partitions) or 'none'})")
    flags = [_sbatch_flag(key, value) for key, value in slurm_parameters(cluster).items() if key != "signal_delay_s"]
    _slurm("sbatch", "--test-only", *flags, "--wrap=true", refused=f"Slurm refuses the request {' '.join(flags)}")


def _sbatch_flag(key: str, value: object) -> str:
    option = "--" + key.replace("_", "-")
    return option if value is True else f"{option}={value}"


def _slurm(*command: str, refused: str) -> str:
    done = subprocess.run(command, capture_output=True, text=True, timeout=60)
    if done.returncode:
        raise ValueError(f"cluster: {refused}: {done.stderr.strip()}")
    return done.stdout
