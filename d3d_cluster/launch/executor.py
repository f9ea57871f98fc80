"""The submitit executor a stage runs on, from the spec's cluster section, and the checks that refuse, on the
login node, a cluster section Slurm would refuse (or queue forever)."""

from __future__ import annotations

import math
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable

import submitit

from d3d_cluster.spec import ClusterSpec, Spec, SpecError

SLURM_COMMANDS = ("sbatch", "srun", "sinfo")
_TIME = re.compile(r"(?:(?P<days>\d+)-(?P<day_hours>\d+)(?::(?P<day_minutes>\d+)(?::(?P<day_seconds>\d+))?)?"
                   r"|(?P<first>\d+)(?::(?P<second>\d+)(?::(?P<third>\d+))?)?)")


def parse_time(text: str) -> int:
    """Minutes from a Slurm time limit (`90`, `30:00`, `1:30:00`, `2-0`, `1-12:00:00`); seconds round up."""
    match = _TIME.fullmatch(text.strip())
    if match is None:
        raise ValueError(f"--time {text!r}: expected minutes or one of Slurm's forms MM, MM:SS, HH:MM:SS, D-HH, "
                         "D-HH:MM, D-HH:MM:SS")
    part = {key: int(value) for key, value in match.groupdict().items() if value is not None}
    if "days" in part:
        seconds = (((part["days"] * 24 + part["day_hours"]) * 60 + part.get("day_minutes", 0)) * 60
                   + part.get("day_seconds", 0))
    elif "third" in part:
        seconds = (part["first"] * 60 + part["second"]) * 60 + part["third"]
    else:
        seconds = part["first"] * 60 + part.get("second", 0)
    return math.ceil(seconds / 60)


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


def executor_parameters(cluster: ClusterSpec, name: str, dependency: str | None = None,
                        on_exit: str | None = None) -> dict:
    """Everything a Slurm job of ours is submitted with: the spec's resources, and what a requeue needs.

    A requeued job keeps its id, so its logs must be appended to, by sbatch (submitit's default) and by srun
    (which would otherwise truncate each task's log); `--requeue` lets `scontrol requeue` put it back in the
    queue. When one task dies, srun kills the others (`--kill-on-bad-exit`) rather than leaving them blocked in
    a collective, and the batch script runs `on_exit` (`launch.requeue.exit_hook`) with srun's exit status. A
    job that depends on another is cancelled by Slurm when that one fails, instead of pending forever.
    """
    parameters = {"job_name": name, **slurm_parameters(cluster),
                  "srun_args": ["--open-mode=append", "--kill-on-bad-exit=1"],
                  "additional_parameters": {**cluster.sbatch_options, "requeue": True}}
    setup = ([f"trap {shlex.quote(on_exit)} EXIT"] if on_exit is not None else []) + list(cluster.setup)
    if setup:
        parameters["setup"] = setup
    if dependency is not None:
        parameters["dependency"] = dependency
        parameters["additional_parameters"]["kill-on-invalid-dep"] = "yes"
    return parameters


def detect_executor() -> tuple[str, str]:
    """Where `cluster.executor: auto` runs, and why: Slurm where its commands are installed and `sinfo` gets an
    answer from the controller within 15 s, else the local executor."""
    missing = [command for command in SLURM_COMMANDS if shutil.which(command) is None]
    if missing:
        return "local", f"no Slurm here ({', '.join(missing)} not on PATH)"
    try:
        answered = subprocess.run(["sinfo", "--noheader", "--format=%P"], capture_output=True, text=True, timeout=15)
    except subprocess.TimeoutExpired:
        return "local", "Slurm's controller did not answer sinfo within 15 s"
    if answered.returncode != 0:
        return "local", f"Slurm's controller did not answer ({(answered.stderr.strip().splitlines() or ['?'])[-1]})"
    return "slurm", "sinfo answered"


def resolve_executor(spec: Spec, echo: Callable[[str], None] = lambda line: None) -> Spec:
    """The spec with `cluster.executor: auto` made `slurm` or `local` (said through `echo`); other specs as they are.
    A spec that only the local executor would refuse (several nodes) is refused naming why auto chose it."""
    if spec.cluster.executor != "auto":
        return spec
    executor, why = detect_executor()
    echo(f"cluster.executor auto: {executor} ({why})")
    try:
        return spec.with_overrides(**{"cluster.executor": executor})
    except SpecError as error:
        raise SpecError(f"{error}\n(cluster.executor auto chose {executor}: {why})") from None


def make_executor(cluster: ClusterSpec, folder: Path, name: str = "d3dc", dependency: str | None = None,
                  on_exit: str | None = None) -> submitit.Executor:
    if cluster.executor == "auto":
        raise ValueError("cluster.executor auto must be resolved (launch.executor.resolve_executor) before a job is "
                         "made: the run's spec records where it runs")
    if cluster.executor == "slurm":
        executor = submitit.SlurmExecutor(folder=folder, max_num_timeout=cluster.max_time_limit_requeues)
        executor.update_parameters(**executor_parameters(cluster, name, dependency, on_exit))
        return executor
    executor = submitit.LocalExecutor(folder=folder)
    executor.update_parameters(tasks_per_node=cluster.tasks_per_node, timeout_min=cluster.timeout_min,
                               gpus_per_node=local_gpus(cluster))
    return executor


def local_gpus(cluster: ClusterSpec) -> int:
    """The GPUs a local job's ranks see: one each where this machine has enough and the spec allows them, else
    none (submitit's local executor hides every GPU it is not given)."""
    import torch

    enough = cluster.device != "cpu" and torch.cuda.is_available() and torch.cuda.device_count() >= cluster.tasks_per_node
    return cluster.tasks_per_node if enough else 0


def sbatch_script(cluster: ClusterSpec, folder: Path, name: str, dependency: str | None = None,
                  array_tasks: int | None = None, on_exit: str | None = None) -> str:
    """The sbatch script `make_executor`'s executor writes for a job (an array of `array_tasks`), rendered by
    submitit's own function without submitting anything, and without Slurm."""
    from submitit.slurm.slurm import _make_sbatch_string

    folder = Path(folder).absolute()
    command = f"{shlex.quote(sys.executable)} -u -m submitit.core._submit {shlex.quote(str(folder))}"
    return _make_sbatch_string(command=command, folder=folder, map_count=array_tasks,
                               **executor_parameters(cluster, name, dependency, on_exit))


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
    flags = [_sbatch_flag(key, value) for key, value in {**slurm_parameters(cluster), **cluster.sbatch_options}.items()
             if key != "signal_delay_s"]
    _slurm("sbatch", "--test-only", *flags, "--wrap=true", refused=f"Slurm refuses the request {' '.join(flags)}")


def _sbatch_flag(key: str, value: object) -> str:
    option = "--" + key.replace("_", "-")
    return option if value is True else f"{option}={value}"


def _slurm(*command: str, refused: str) -> str:
    done = subprocess.run(command, capture_output=True, text=True, timeout=60)
    if done.returncode:
        raise ValueError(f"cluster: {refused}: {done.stderr.strip()}")
    return done.stdout
