"""How a run's job goes back to the queue, within budgets per cause.

Two ways:
- told to stop (USR2 before the time limit or on preemption, SIGTERM on preemption): every rank has
  checkpointed; rank 0 records the decision and requeues (`requeue_stopped`, from inside the job). The cause is
  read from the job's RunTime and TimeLimit (`scontrol show job`, to the second): "time limit" when the time left
  is within the warning Slurm was asked for (`cluster.signal_delay_s`) plus the 60 s by which Slurm may send it
  early (`EARLY_WARNING_S`), else "preemption" (also where the job has no limit or Slurm no longer knows it);
- died without warning (a killed rank, an out-of-memory kill): the batch script's EXIT trap runs
  `python -m d3d_cluster.launch.requeue RUN JOB EXIT_CODE` after srun has ended (every task is gone: srun runs
  with --kill-on-bad-exit), which requeues the job unless it finished, was cancelled, was already requeued, or
  failed for a reason a retry cannot fix (`requeue_lost`). It resumes from the last periodic checkpoint.
A failed node is Slurm's own case: jobs submitted with --requeue are requeued by Slurm, and the job finds out on
start-up from SLURM_RESTART_COUNT (`count_slurm_requeues`).

Budgets, as submitit keeps them: a preemption is not the job's fault and is always requeued; time-limit requeues
(`cluster.max_time_limit_requeues`) and requeues after a death without warning or by Slurm itself
(`cluster.max_crash_requeues`) are bounded apart. Every `requeued` event carries its cause. A decision is recorded
before it is acted on: `scontrol requeue` ends the batch script that runs the exit hook, so an event written after it
could be lost and the budget undercounted.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from collections import Counter
from pathlib import Path

from d3d_cluster.rundir import RunDir

# Slurm states in which a job's end is final: a user's decision, not a loss. A cancelled job reads COMPLETING
# while its tasks are being killed.
FINAL_STATES = ("CANCELLED", "COMPLETED", "COMPLETING")
# Causes of a requeue, and the spec key that bounds each (None: never bounded).
BUDGETS = {"preemption": None, "signal": None, "time limit": "max_time_limit_requeues",
           "crash": "max_crash_requeues", "slurm": "max_crash_requeues"}
# Slurm may send the --signal warning up to this long before the time asked for, its time-limit checks running about
# once a minute (sbatch(1), --signal). Delivering the signal and checkpointing only shorten the time left, so the
# warning time plus this is the most a job stopped for its time limit can have left when rank 0 decides.
EARLY_WARNING_S = 60
# A duration as `scontrol show job` prints RunTime and TimeLimit: [days-]hours:minutes:seconds.
_DURATION = re.compile(r"(?:(\d+)-)?(\d+):(\d+):(\d+)")


def requeue_counts(events: list[dict]) -> Counter:
    """Requeues of one job by cause (an event from before causes were recorded counts as a crash)."""
    return Counter(e.get("cause", "crash") for e in events if e["event"] == "requeued")


def budget_used(spec, events: list[dict], cause: str) -> tuple[int, int | None, str | None]:
    """Requeues already spent from `cause`'s budget, its limit (None: unbounded) and the key that sets it."""
    key = BUDGETS[cause]
    if key is None:
        return 0, None, None
    counts = requeue_counts(events)
    used = sum(count for other, count in counts.items() if BUDGETS.get(other) == key)
    return used, getattr(spec.cluster, key), key


def _scontrol_requeue(run: RunDir, stage: str, job_id: str) -> None:
    """Ask Slurm to requeue; a refusal (Slurm requeued the job itself, a timeout) is recorded, not raised."""
    try:
        subprocess.run(["scontrol", "requeue", job_id], check=True, timeout=60, capture_output=True, text=True)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as error:
        detail = getattr(error, "stderr", None) or str(error)
        run.event("requeue_failed", stage=stage, job_id=job_id, error=str(detail).strip()[:500])


def _decide_stopped(run: RunDir, spec, stage: str, rank, signal_name: str, step: int) -> tuple[str, str]:
    """Rank 0's decision for a job every rank of which has checkpointed, recorded before it is acted on."""
    events = job_events(run, stage, rank.job_id)
    cancelled = count_events(events, "cancelled") > 0 or (
        rank.cluster == "slurm" and _slurm_state(rank.job_id) in FINAL_STATES)
    if cancelled:  # the job's own last word, after the request: where it stopped
        run.event("cancelled", stage=stage, job_id=rank.job_id, step=step)
        return "cancelled", ""
    cause = _stop_reason(rank, spec.cluster.signal_delay_s)
    run.event("preempted", stage=stage, job_id=rank.job_id, signal=signal_name, reason=cause, step=step)
    used, limit, key = budget_used(spec, events, cause)
    if limit is not None and used >= limit:
        reason = (f"stopped by {signal_name} ({cause}) at step {step} after {used} {cause} requeues "
                  f"(cluster.{key}); resubmit the stage to resume from its checkpoint")
        run.event("failed", stage=stage, job_id=rank.job_id, retryable=False, error=reason)
        return "exhausted", reason
    run.event("requeued", stage=stage, job_id=rank.job_id, cause=cause,
              requeues=count_events(events, "requeued") + 1)
    if rank.cluster == "slurm":
        _scontrol_requeue(run, stage, rank.job_id)
    return "requeue", ""


def requeue_stopped(run_path: Path, stage: str, rank, signal_name: str, step: int) -> None:
    """Every rank has checkpointed: rank 0 decides and records, and every rank gets the decision and its reason
    (whatever went wrong on rank 0), then exits without a result, so that submitit runs the job again when it
    restarts. A job cancelled by its user (scancel sends SIGTERM too) is left cancelled."""
    from submitit.local.local import LOCAL_REQUEUE_RETURN_CODE

    from d3d_cluster.collectives import from_rank0

    run = RunDir(run_path)
    decision = None
    if rank.rank == 0:
        try:
            decision = _decide_stopped(run, run.spec(), stage, rank, signal_name, step)
        except Exception as error:  # never leave the other ranks waiting in the broadcast below
            decision = ("error", f"rank 0 could not decide the requeue: {type(error).__name__}: {error}")
    decision, reason = from_rank0(decision)
    if decision in ("exhausted", "error"):
        raise RuntimeError(f"stage {stage}: {reason}; its checkpoint is kept")
    if decision == "cancelled":
        print(f"[{stage}] cancelled; checkpointed at step {step}", flush=True)
        raise SystemExit(1)
    print(f"[{stage}] checkpointed at step {step} after {signal_name}; requeued", flush=True)
    raise SystemExit(LOCAL_REQUEUE_RETURN_CODE if rank.cluster == "local" else 1)


def count_slurm_requeues(run: RunDir, stage: str, job_id: str) -> str | None:
    """On a job's start: requeues Slurm made itself (SLURM_RESTART_COUNT beyond the requeues recorded) are recorded
    with cause "slurm"; the reason the job must not run again if that spends the crash budget, else None."""
    restarts = int(os.environ.get("SLURM_RESTART_COUNT") or 0)
    events = job_events(run, stage, job_id)
    unrecorded = restarts - count_events(events, "requeued")
    for _ in range(max(0, unrecorded)):
        events.append({"event": "requeued", "cause": "slurm"})
        run.event("requeued", stage=stage, job_id=job_id, cause="slurm", requeues=count_events(events, "requeued"),
                  reason=f"Slurm restarted the job (SLURM_RESTART_COUNT {restarts})")
    used, limit, key = budget_used(run.spec(), events, "slurm")
    if unrecorded > 0 and used > limit:
        return f"Slurm requeued the job {restarts} times; {used} crash requeues exceed cluster.{key} ({limit})"
    return None


def exit_hook(run_path: Path, job: str) -> str:
    """The command a Slurm job's batch script runs on exit (`trap ... EXIT`), with its exit status."""
    command = shlex.join([sys.executable, "-m", "d3d_cluster.launch.requeue", str(Path(run_path).absolute()), job])
    return f"{command} $?"


def requeue_lost(run_path: Path, job: str, job_id: str, exit_code: int) -> str:
    """Requeue a job that ended badly without recording why it cannot be retried; what was decided."""
    if exit_code == 0:
        return "finished"
    run = RunDir(run_path)
    events = job_events(run, job, job_id)
    last = events[-1]["event"] if events else None
    if count_events(events, "cancelled"):
        return "not requeued: the job was cancelled"
    if last in ("requeued", "finished"):
        return f"not requeued: the job was {last}"
    final = next((e for e in last_run_failures(events) if not e.get("retryable", True)), None)
    if final is not None:
        where = f" (rank {final['rank']} on {final['host']})" if "rank" in final else ""
        return f"not requeued: {final.get('error', 'failed')}{where}"
    state = _slurm_state(job_id)
    if state in FINAL_STATES:
        return f"not requeued: the job is {state}"
    used, limit, key = budget_used(run.spec(), events, "crash")
    if used >= limit:
        run.event("failed", stage=job, job_id=job_id, retryable=False,
                  error=f"ended with exit code {exit_code} after {used} crash requeues (cluster.{key})")
        return "not requeued: no requeue left"
    run.event("requeued", stage=job, job_id=job_id, cause="crash", requeues=count_events(events, "requeued") + 1,
              reason=f"ended with exit code {exit_code} without warning")
    _scontrol_requeue(run, job, job_id)
    return "requeued"


def last_run_failures(events: list[dict]) -> list[dict]:
    """The failures of the job's latest run (since it last started or was requeued), in the order the ranks
    recorded them: the first is the cause; its peers, losing their connection to it, fail after it."""
    runs = [i for i, event in enumerate(events) if event["event"] in ("started", "requeued")]
    return [event for event in events[runs[-1] if runs else 0:] if event["event"] == "failed"]


def job_events(run: RunDir, job: str, job_id: str) -> list[dict]:
    """The events of one Slurm job of the run (`d3dc cancel` writes `cancelled` as soon as scancel returns)."""
    return [e for e in run.events() if e.get("stage") == job and e.get("job_id") == job_id]


def count_events(events: list[dict], kind: str) -> int:
    return sum(1 for e in events if e["event"] == kind)


def _show_job(job_id: str) -> str:
    """`scontrol -o show job`: one line of Key=Value fields; empty once Slurm has forgotten the job."""
    return subprocess.run(["scontrol", "-o", "show", "job", job_id], capture_output=True, text=True,
                          timeout=60).stdout


def _field(shown: str, key: str) -> str | None:
    match = re.search(rf"(?:^|\s){key}=(\S+)", shown)
    return match.group(1) if match else None


def _slurm_state(job_id: str) -> str | None:
    return _field(_show_job(job_id), "JobState")


def _duration_s(text: str | None) -> int | None:
    """Seconds in a duration as scontrol prints it; None for UNLIMITED, INVALID, Partition_Limit or nothing."""
    match = _DURATION.fullmatch(text or "")
    if match is None:
        return None
    days, hours, minutes, seconds = (int(part or 0) for part in match.groups())
    return ((days * 24 + hours) * 60 + minutes) * 60 + seconds


def seconds_left(shown: str) -> int | None:
    """Seconds before the job's time limit, from `scontrol -o show job`'s RunTime and TimeLimit; None where the job
    has no limit, Slurm shows none, or the job is gone."""
    limit, run_time = (_duration_s(_field(shown, key)) for key in ("TimeLimit", "RunTime"))
    return None if limit is None or run_time is None else limit - run_time


def stop_cause(left_s: int | None, signal_delay_s: int) -> str:
    """The cause of a stop: "time limit" when the time left is within the warning Slurm sends before the limit (a
    preemption that close to it would have lost little), else "preemption"."""
    if left_s is not None and left_s <= signal_delay_s + EARLY_WARNING_S:
        return "time limit"
    return "preemption"


def _stop_reason(rank, signal_delay_s: int) -> str:
    """Why a job was told to stop: on Slurm, from the time it has left; elsewhere only "signal" is known."""
    if rank.cluster != "slurm":
        return "signal"
    return stop_cause(seconds_left(_show_job(rank.job_id)), signal_delay_s)


if __name__ == "__main__":
    run_dir, job_name, code = sys.argv[1:4]
    print(f"{job_name} job exit hook: {requeue_lost(Path(run_dir), job_name, os.environ['SLURM_JOB_ID'], int(code))}",
          file=sys.stderr, flush=True)
