"""What a run's jobs are doing, read from its events log and from Slurm: `d3dc status`, `d3dc runs`, `d3dc logs`
and `d3dc cancel`.

The events log says what each job reported (submitted, started, checkpointed, preempted, requeued, finished,
failed, cancelled); Slurm says where it stands now. `squeue -t all` still lists jobs that ended a few minutes
ago (MinJobAge); older ones only `sacct` knows, and only where the cluster keeps accounting.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

from d3d_cluster.launch.requeue import last_run_failures, requeue_counts
from d3d_cluster.rundir import SPEC_NAME, STUDY_NAME, TRAIN_LOG_NAME, RunDir

# Slurm job states in which a job still holds, or waits for, resources.
ACTIVE_STATES = frozenset({"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "SUSPENDED", "REQUEUED", "REQUEUE_FED",
                           "REQUEUE_HOLD", "RESIZING", "SIGNALING", "STAGE_OUT", "STOPPED", "RESV_DEL_HOLD"})
ENDED_EVENTS = frozenset({"finished", "failed", "cancelled"})
CONTROLLER_MODULE = "submitit.local._local"  # what the local executor runs for each job: `python -m` this


@dataclass(frozen=True)
class SlurmJob:
    """Slurm's view of one job: its state, why it waits (`Dependency`, `Resources`) and what it still waits for."""

    state: str
    reason: str | None = None
    waiting_for: str | None = None


def slurm_jobs(job_ids: Iterable[str]) -> dict[str, SlurmJob]:
    """What Slurm knows of these jobs, by id: squeue first, sacct for those it has forgotten (where accounting
    exists). Jobs neither knows, or no Slurm commands here: left out."""
    wanted = sorted(set(job_ids), key=lambda job_id: (len(job_id), job_id))
    if not wanted or shutil.which("squeue") is None:
        return {}
    known = {}
    # With a single id squeue fails when Slurm has forgotten the job; with several it lists the ones it knows.
    listed = _command("squeue", "-h", "-t", "all", f"--jobs={','.join(wanted)}", "-o", "%i|%T|%r|%E")
    for line in (listed or "").splitlines():
        job_id, state, reason, waiting = line.split("|", 3)
        known[job_id] = SlurmJob(state, None if reason == "None" else reason,
                                 None if waiting in ("", "(null)") else waiting)
    forgotten = [job_id for job_id in wanted if job_id not in known]
    if forgotten and shutil.which("sacct") is not None:
        accounted = _command("sacct", "-n", "-P", "-X", f"--jobs={','.join(forgotten)}", "-o", "JobID,State")
        for line in (accounted or "").splitlines():
            job_id, state = line.split("|", 1)
            if job_id in forgotten:
                known[job_id] = SlurmJob(state.split()[0])  # "CANCELLED by 0"
    return known


def _command(*command: str) -> str | None:
    """A Slurm query's output, or None when it refuses (accounting disabled, an unknown job id)."""
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout if done.returncode == 0 else None


@dataclass(frozen=True)
class StageStatus:
    """One job of a run (a stage, or the evaluation) since it was last submitted."""

    stage: str
    job_id: str | None
    executor: str | None
    dependency: str | None
    last_event: str
    last_time: str
    slurm: SlurmJob | None
    step: int | None = None
    epoch: float | None = None
    checkpoint: dict | None = None
    requeues: int = 0
    requeue_causes: dict[str, int] = field(default_factory=dict)  # preemption, time limit, crash, slurm
    error: str | None = None

    @property
    def live(self) -> bool:
        """Queued or running on Slurm."""
        return self.slurm is not None and self.slurm.state in ACTIVE_STATES

    @property
    def ended(self) -> bool:
        if self.slurm is not None:
            return not self.live
        return self.last_event in ENDED_EVENTS or self.executor == "slurm"  # a Slurm job Slurm forgot has ended

    @property
    def state(self) -> str:
        """Slurm's state (upper case) when Slurm knows the job, else the last event (lower case)."""
        return self.slurm.state if self.slurm is not None else self.last_event


def stage_events(events: list[dict]) -> dict[str, list[dict]]:
    """Each job's events since its last submission, in the order the jobs first appear."""
    grouped: dict[str, list[dict]] = {}
    for event in events:
        stage = event.get("stage")
        if stage is None:
            continue
        if event["event"] == "submitted":
            grouped[stage] = []
        grouped.setdefault(stage, []).append(event)
    return grouped


def run_status(run: RunDir, slurm: dict[str, SlurmJob] | None = None) -> list[StageStatus]:
    """Every job of the run, from its events and Slurm (`slurm`: already queried, as `runs` does for many runs)."""
    grouped = stage_events(run.events())
    if slurm is None:
        slurm = slurm_jobs(_slurm_job_ids(grouped.values()))
    return [_stage_status(run, stage, events, slurm) for stage, events in grouped.items()]


def _slurm_job_ids(grouped: Iterable[list[dict]]) -> list[str]:
    return [events[0]["job_id"] for events in grouped
            if events[0]["event"] == "submitted" and events[0].get("executor") == "slurm"]


def _stage_status(run: RunDir, stage: str, events: list[dict], slurm: dict[str, SlurmJob]) -> StageStatus:
    submitted = events[0] if events[0]["event"] == "submitted" else {}
    job_id = submitted.get("job_id") or next((e["job_id"] for e in reversed(events) if "job_id" in e), None)
    executor = submitted.get("executor")
    last = events[-1]
    step, epoch = _progress(run.path / stage / TRAIN_LOG_NAME, events)
    checkpoints = [e for e in events if e["event"] == "checkpointed"]
    requeued = [e for e in events if e["event"] == "requeued"]
    # The latest run's first failure is its cause; without one, the last failure of an earlier run says why the
    # job was requeued, until the job finishes: then no failure is its story any more.
    failed = last_run_failures(events)[:1] or ([e for e in events if e["event"] == "failed"][-1:]
                                               if last["event"] != "finished" else [])
    return StageStatus(
        stage=stage, job_id=job_id, executor=executor, dependency=submitted.get("dependency"),
        last_event=last["event"], last_time=last["time"],
        slurm=slurm.get(job_id) if executor == "slurm" else None, step=step, epoch=epoch,
        checkpoint=checkpoints[-1] if checkpoints else None,
        requeues=len(requeued), requeue_causes=dict(requeue_counts(events)),
        error=_failure(failed[0]) if failed else None)


def _failure(event: dict) -> str:
    """A failure's error, and the rank and host that recorded it."""
    where = f" (rank {event['rank']} on {event['host']})" if "rank" in event else ""
    return f"{event.get('error', 'failed')}{where}"


def _progress(train_log: Path, events: list[dict]) -> tuple[int | None, float | None]:
    """Step and epoch: rank 0's training log has one line per step, the freshest record; without it, the last
    event that carries them (a checkpoint, a preemption)."""
    if train_log.is_file() and train_log.stat().st_size:
        with train_log.open("rb") as log:
            log.seek(max(0, train_log.stat().st_size - 4096))
            lines = log.read().decode(errors="replace").splitlines()
        for line in reversed(lines):
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by the seek, or being written
            return record.get("step"), record.get("epoch")
    with_step = [e for e in events if "step" in e]
    return (with_step[-1]["step"], with_step[-1].get("epoch")) if with_step else (None, None)


@dataclass(frozen=True)
class RunSummary:
    run: RunDir
    stages: list[StageStatus]

    @property
    def last_time(self) -> str:
        return max((status.last_time for status in self.stages), default="")


def list_runs(runs_dir: Path) -> list[RunSummary]:
    """Every run under `runs_dir` with its jobs, Slurm asked once for all of them; the most recent first."""
    runs = [RunDir(path) for path in _run_paths(runs_dir)] if runs_dir.is_dir() else []
    statuses = runs_status(runs)
    summaries = [RunSummary(run, statuses[run.path]) for run in runs]
    return sorted(summaries, key=lambda summary: summary.last_time, reverse=True)


def _run_paths(runs_dir: Path) -> Iterable[Path]:
    """The runs directory's runs, and the runs of the studies in it (their points)."""
    for path in sorted(runs_dir.iterdir()):
        if (path / SPEC_NAME).is_file():
            yield path
        elif (path / STUDY_NAME).is_file():
            yield from (Path(point["run"]) for point in json.loads((path / STUDY_NAME).read_text())["points"]
                        if (Path(point["run"]) / SPEC_NAME).is_file())


def runs_status(runs: list[RunDir]) -> dict[Path, list[StageStatus]]:
    """Every job of each run, Slurm asked once for all of them."""
    grouped = {run.path: stage_events(run.events()) for run in runs}
    slurm = slurm_jobs(job_id for stages in grouped.values() for job_id in _slurm_job_ids(stages.values()))
    return {run.path: run_status(run, slurm) for run in runs}


def refuse_live_jobs(*runs: RunDir) -> None:
    """One run, one chain of jobs: queueing more into a run whose jobs still run would change the spec they read.
    Slurm is asked once for all `runs` (a study's points)."""
    for run, statuses in zip(runs, runs_status(list(runs)).values()):
        live = [status for status in statuses if status.live]
        if live:
            jobs = ", ".join(f"{status.stage} {status.job_id} {status.slurm.state}" for status in live)
            raise ValueError(f"{run.path}: the run has live jobs ({jobs}); `d3dc cancel {run.spec().name}` them "
                             "first, or submit under another --name")


def cancel_run(run: RunDir) -> tuple[list[StageStatus], list[StageStatus]]:
    """Cancel every live job of the run, each recorded as `cancelled`: Slurm's with scancel, local ones by sending
    their submitit controller SIGTERM, which it forwards to every rank (the ranks checkpoint at the next step and
    stop). Returns the jobs cancelled, and the local jobs whose events say they run but whose process is gone."""
    statuses = run_status(run)
    live = [status for status in statuses if status.live]
    if live:
        done = subprocess.run(["scancel", *(status.job_id for status in live)], capture_output=True, text=True,
                              timeout=60)
        if done.returncode:
            raise RuntimeError(f"scancel {' '.join(s.job_id for s in live)} failed: {done.stderr.strip()}")
        for status in live:
            run.event("cancelled", stage=status.stage, job_id=status.job_id, state=status.slurm.state)
    local = [status for status in statuses if status.executor == "local" and status.last_event not in ENDED_EVENTS]
    gone = []
    for status in local:
        controller = _local_controller(run, status)
        if controller is None:
            gone.append(status)
            continue
        # Recorded first: the ranks read it to tell a cancellation from a preemption.
        run.event("cancelled", stage=status.stage, job_id=status.job_id, state=status.last_event)
        os.kill(controller, signal.SIGTERM)
        live.append(status)
    return live, gone


def _local_controller(run: RunDir, status: StageStatus) -> int | None:
    """The pid of a local job's submitit controller (a local job's id is that pid) while it runs this job; its
    command line is checked, so that a pid the system has since given to another process is never signalled."""
    if status.executor != "local" or not (status.job_id or "").isdigit():
        return None
    process = Path("/proc") / status.job_id
    try:
        command = [os.fsdecode(part) for part in (process / "cmdline").read_bytes().split(b"\0")]
        working_dir = (process / "cwd").resolve(strict=True)
    except OSError:
        return None
    if CONTROLLER_MODULE not in command[:-1]:
        return None
    folder = working_dir / command[command.index(CONTROLLER_MODULE) + 1]
    return int(status.job_id) if folder.resolve() == (run.path / status.stage / "submitit").resolve() else None


def log_path(run: RunDir, stage: str | None = None, rank: int = 0, stream: str = "out") -> tuple[StageStatus, Path]:
    """The job of `stage` (default: the one that reported last) and rank `rank`'s log, where submitit writes it:
    RUN/STAGE/submitit/JOBID_RANK_log.{out,err}."""
    statuses = [status for status in run_status(run) if status.job_id is not None]
    if not statuses:
        raise FileNotFoundError(f"{run.path}: no job submitted in this run yet")
    if stage is None:
        status = _default_stage(run, statuses)
    else:
        matching = [s for s in statuses if s.stage == stage]
        if not matching:
            raise FileNotFoundError(f"{run.path}: no job of stage {stage!r} (jobs: "
                                    f"{', '.join(s.stage for s in statuses)})")
        status = matching[0]
    return status, run.path / status.stage / "submitit" / f"{status.job_id}_{rank}_log.{stream}"


def _default_stage(run: RunDir, statuses: list[StageStatus]) -> StageStatus:
    """The job that reported last once running (a pending job has no log yet), else the last one submitted."""
    by_stage = {status.stage: status for status in statuses}
    events = [e for e in run.events() if e.get("stage") in by_stage]
    running = [e["stage"] for e in events if e["event"] != "submitted"]
    return by_stage[(running or [e["stage"] for e in events])[-1]]


def follow_log(run: RunDir, stage: str, path: Path, echo: Callable[[str], None], follow: bool = False,
               poll_seconds: float = 1.0) -> None:
    """Echo the log's lines; with `follow`, keep echoing what is appended until the stage's job has ended."""
    offset = 0
    while True:
        ended = not follow or next(s for s in run_status(run) if s.stage == stage).ended
        offset = _echo_lines(path, offset, echo, final=ended)
        if ended:
            return
        time.sleep(poll_seconds)


def _echo_lines(path: Path, offset: int, echo: Callable[[str], None], final: bool) -> int:
    """Echo the complete lines written since `offset` (and, when `final`, an unfinished last one)."""
    if not path.is_file():
        return offset
    with path.open("rb") as log:
        log.seek(offset)
        text = log.read()
    complete, newline, rest = text.rpartition(b"\n")
    for line in complete.decode(errors="replace").splitlines() if newline else []:
        echo(line)
    if final and rest:
        echo(rest.decode(errors="replace"))
        return offset + len(text)
    return offset + len(complete) + len(newline)
