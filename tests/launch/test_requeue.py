"""Requeue decisions per cause, recorded before Slurm is asked, with Slurm's commands played by a stand-in that
answers as `scontrol` would (the real ones are exercised in tests/integration/test_slurm_requeue.py)."""

import subprocess

import pytest
import torch
from conftest import tiny_spec

from d3d_cluster.launch import requeue
from d3d_cluster.launch.job import Rank
from d3d_cluster.rundir import RunDir

JOB = "41"


class FakeSlurm:
    """`scontrol requeue` (failing when told to) and `scontrol -o show job` (RUNNING, with its run time and limit)."""

    def __init__(self, run: RunDir, run_time: str = "01:00:00", refuse_requeue: bool = False):
        self.run, self.run_time, self.refuse_requeue = run, run_time, refuse_requeue
        self.requeued_with_events: list[list[str]] = []

    def __call__(self, command, **kwargs):
        if command[:2] == ["scontrol", "requeue"]:
            self.requeued_with_events.append([e["event"] for e in self.run.events()])
            if self.refuse_requeue:
                raise subprocess.CalledProcessError(1, command, stderr="Requested operation is presently disabled")
            return subprocess.CompletedProcess(command, 0, "", "")
        if command[:2] == ["scontrol", "-o"]:
            shown = f"JobId={JOB} JobState=RUNNING Reason=None RunTime={self.run_time} TimeLimit=06:00:00 TimeMin=N/A"
            return subprocess.CompletedProcess(command, 0, shown + "\n", "")
        raise AssertionError(f"unexpected command {command}")


@pytest.fixture
def run(tmp_path):
    return RunDir.create(tiny_spec(tmp_path, cluster={"executor": "slurm", "max_crash_requeues": 2,
                                                      "max_time_limit_requeues": 1, "signal_delay_s": 90}))


def _rank(cluster="slurm") -> Rank:
    return Rank(0, 1, 0, torch.device("cpu"), JOB, "localhost", cluster)


def test_a_crash_requeue_is_recorded_before_slurm_is_asked_and_the_crash_budget_ends_it(run, monkeypatch):
    slurm = FakeSlurm(run)
    monkeypatch.setattr(requeue.subprocess, "run", slurm)
    decisions = []
    for _ in range(3):  # the job starts, a rank is killed, the exit hook decides
        run.event("started", stage="teacher", job_id=JOB)
        decisions.append(requeue.requeue_lost(run.path, "teacher", JOB, 137))
    assert decisions == ["requeued", "requeued", "not requeued: no requeue left"]
    assert all(seen[-1] == "requeued" for seen in slurm.requeued_with_events)  # the decision was already on disk
    failed = run.events()[-1]
    assert failed["event"] == "failed" and "after 2 crash requeues (cluster.max_crash_requeues)" in failed["error"]


def test_preemptions_never_use_up_a_budget_and_time_limits_have_their_own(run, monkeypatch):
    slurm = FakeSlurm(run)
    monkeypatch.setattr(requeue.subprocess, "run", slurm)
    for _ in range(5):  # far more preemptions than any budget
        run.event("started", stage="teacher", job_id=JOB)
        with pytest.raises(SystemExit):
            requeue.requeue_stopped(run.path, "teacher", _rank(), "SIGUSR2", step=10)
    slurm.run_time = "05:59:00"  # within signal_delay_s (+60 s) of the limit: a time-limit stop
    run.event("started", stage="teacher", job_id=JOB)
    with pytest.raises(SystemExit):
        requeue.requeue_stopped(run.path, "teacher", _rank(), "SIGUSR2", step=20)
    run.event("started", stage="teacher", job_id=JOB)
    with pytest.raises(RuntimeError, match=r"after 1 time limit requeues \(cluster.max_time_limit_requeues\)"):
        requeue.requeue_stopped(run.path, "teacher", _rank(), "SIGUSR2", step=30)
    assert requeue.requeue_lost(run.path, "teacher", JOB, 137) == "not requeued: stopped by SIGUSR2 (time limit) " \
        "at step 30 after 1 time limit requeues (cluster.max_time_limit_requeues); resubmit the stage to resume " \
        "from its checkpoint"
    assert requeue.requeue_counts(requeue.job_events(run, "teacher", JOB)) == {"preemption": 5, "time limit": 1}


@pytest.mark.parametrize("shown, cause", [
    ("RunTime=00:57:30 TimeLimit=01:00:00", "time limit"),  # the warning (90 s) and Slurm's 60 s early, just inside
    ("RunTime=00:57:50 TimeLimit=01:00:00", "time limit"),  # 130 s left: whole minutes, rounded up, would read 180
    ("RunTime=00:57:59 TimeLimit=01:00:00", "time limit"),
    ("RunTime=00:57:29 TimeLimit=01:00:00", "preemption"),  # 151 s left: just outside
    ("RunTime=1-23:57:30 TimeLimit=2-00:00:00", "time limit"),
    ("RunTime=1-23:57:29 TimeLimit=2-00:00:00", "preemption"),
    ("RunTime=3-04:05:06 TimeLimit=UNLIMITED", "preemption"),
    ("RunTime=INVALID TimeLimit=01:00:00", "preemption"),
    ("RunTime=00:59:00 TimeLimit=Partition_Limit", "preemption"),
    ("", "preemption"),  # the job is gone from Slurm
])
def test_a_stop_is_a_time_limit_within_the_warning_and_its_60s_early_margin_to_the_second(shown, cause):
    line = f"JobId={JOB} JobName=teacher JobState=RUNNING Reason=None {shown} TimeMin=N/A" if shown else ""
    assert requeue.stop_cause(requeue.seconds_left(line), signal_delay_s=90) == cause


def test_a_usr2_130s_before_the_limit_with_a_90s_warning_is_recorded_as_a_time_limit(run, monkeypatch):
    slurm = FakeSlurm(run, run_time="05:57:50")  # 130 s left: Slurm sent the 90 s warning early
    monkeypatch.setattr(requeue.subprocess, "run", slurm)
    with pytest.raises(SystemExit):
        requeue.requeue_stopped(run.path, "teacher", _rank(), "SIGUSR2", step=10)
    assert [(e["event"], e.get("reason", e.get("cause"))) for e in run.events()[-2:]] == [
        ("preempted", "time limit"), ("requeued", "time limit")]


def test_a_requeue_slurm_refuses_is_recorded_and_every_rank_still_gets_the_decision(run, monkeypatch):
    monkeypatch.setattr(requeue.subprocess, "run", FakeSlurm(run, refuse_requeue=True))
    with pytest.raises(SystemExit):
        requeue.requeue_stopped(run.path, "teacher", _rank(), "SIGUSR2", step=10)
    assert [e["event"] for e in run.events()][-3:] == ["preempted", "requeued", "requeue_failed"]
    assert "presently disabled" in run.events()[-1]["error"]

    def broken(command, **kwargs):
        raise OSError("scontrol: command not found")

    monkeypatch.setattr(requeue.subprocess, "run", broken)  # rank 0 cannot even read the job's state
    with pytest.raises(RuntimeError, match="rank 0 could not decide the requeue: OSError"):
        requeue.requeue_stopped(run.path, "teacher", _rank(), "SIGUSR2", step=20)


def test_requeues_slurm_made_itself_are_counted_from_slurm_restart_count(run, monkeypatch):
    monkeypatch.setenv("SLURM_RESTART_COUNT", "2")
    assert requeue.count_slurm_requeues(run, "teacher", JOB) is None
    assert requeue.requeue_counts(requeue.job_events(run, "teacher", JOB)) == {"slurm": 2}
    assert requeue.count_slurm_requeues(run, "teacher", JOB) is None  # counted once, not on every start
    monkeypatch.setenv("SLURM_RESTART_COUNT", "3")
    spent = requeue.count_slurm_requeues(run, "teacher", JOB)
    assert spent == "Slurm requeued the job 3 times; 3 crash requeues exceed cluster.max_crash_requeues (2)"
