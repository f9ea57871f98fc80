"""Acting on a running job from outside, as a fault would: wait for what it logs, find its ranks, hold them still
while a signal or a kill lands, and let a requeued Slurm job start again at once. Used by the tests and by the
fault soak (benchmarks/faults.py), which puts this directory on its path."""

from __future__ import annotations

import os
import signal
import time
from contextlib import contextmanager
from pathlib import Path


def wait_until(condition, what, timeout: float = 60, poll: float = 0.5):
    """Poll `condition` until it returns something true, and return that. `what` names what is awaited (or is
    a function describing the state, called on timeout) for the TimeoutError."""
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what() if callable(what) else what}: not after {timeout:.0f} s")
        time.sleep(poll)
    return value


@contextmanager
def frozen(pids: list[int]):
    """Hold processes still (SIGSTOP) for the body, then let them go on (SIGCONT): a test that must act before a
    job moves past a step (signal it, kill one of its ranks) acts on a job that cannot move, however fast the
    machine. Returns once every process is stopped."""
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        wait_until(lambda: all(_process_state(pid) in ("T", None) for pid in pids), f"processes {pids} to stop",
                   timeout=60, poll=0.001)
        yield
    finally:
        for pid in pids:
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:  # the body killed it
                pass


def signal_pending(pid: int, number: int) -> bool:
    """Whether signal `number` has been delivered to the process and waits to be handled (a stopped process
    handles none): /proc's per-thread and shared pending masks."""
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    masks = [int(line.split()[1], 16) for line in lines if line.startswith(("SigPnd:", "ShdPnd:"))]
    return any(mask >> (number - 1) & 1 for mask in masks)


def child_processes(pid: int) -> list[int]:
    """The processes `pid` started (for the local executor's controller: the job's ranks)."""
    return [int(child) for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def _process_state(pid: int) -> str | None:
    """A process's state letter (R, S, T for stopped...), None once it has gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


def slurm_rank_process(submitit_folder: Path, rank: int) -> int:
    """The pid of one rank of a Slurm job submitted from `submitit_folder`, found by its command line and Slurm
    rank (srun, which starts the ranks, has the same arguments and the batch script's SLURM_PROCID=0)."""
    for proc in Path("/proc").iterdir():
        try:
            command = (proc / "cmdline").read_bytes().split(b"\0")
            environ = (proc / "environ").read_bytes().split(b"\0")
        except (OSError, ValueError):
            continue
        if Path(os.fsdecode(command[0])).name.startswith("python") and str(submitit_folder).encode() in command \
                and b"submitit.core._submit" in command and f"SLURM_PROCID={rank}".encode() in environ:
            return int(proc.name)
    raise LookupError(f"no rank {rank} process of {submitit_folder}")


def step_daemons(job_id: str) -> list[str]:
    """The slurmstepd processes still running steps of a Slurm job."""
    names = []
    for proc in Path("/proc").iterdir():
        try:
            command = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        if command.startswith(b"slurmstepd: [" + job_id.encode() + b"."):
            names.append(command.decode(errors="replace"))
    return names


def release_requeued(slurm_cluster, job_id: str, timeout: float = 300) -> None:
    """Slurm holds a requeued job back for a while (minutes); let it start now, once its last run has left the
    node: released while the old run's step daemons are still winding down, the relaunch fails."""
    wait_until(lambda: "JobState=PENDING" in slurm_cluster.run("scontrol", "show", "job", job_id), "the job to pend",
               timeout=timeout, poll=0.05)
    wait_until(lambda: not step_daemons(job_id), f"job {job_id}'s slurmstepd processes to exit", timeout=timeout,
               poll=0.05)
    slurm_cluster.run("scontrol", "update", f"JobId={job_id}", "StartTime=now")
