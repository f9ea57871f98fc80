"""Interrupted stages resume exactly: real 2-rank jobs on the local executor (the CPU twin of a Slurm job), on
the session's tiny shards.

The local executor's controller forwards SIGTERM to its tasks, as Slurm signals every task of a job; a task
that exits with submitit's requeue code is started again, as `scontrol requeue` does on Slurm.
"""

import json
import os
import random
import shutil
import signal
import threading
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import TINY, assert_tensorboard_shows_the_train_log, logged_losses, tiny_spec
from job_control import child_processes, frozen, signal_pending, wait_until

from d3d_cluster.cli import main
from d3d_cluster.launch.executor import make_executor
from d3d_cluster.launch.job import StageJob
from d3d_cluster.launch.pipeline import JobCancelled, run_stage
from d3d_cluster.rundir import RunDir
from d3d_cluster.launch.status import run_status
from d3d_cluster.train import checkpoint as checkpoints
from d3d_cluster.train.stages import EXPORT_NAME

EPOCHS = 4  # 3 steps an epoch on the tiny shards: 12 steps


def _run(workdir: Path, tiny_shards: Path, **sections) -> RunDir:
    sections = {"teacher": {"epochs": EPOCHS}, "checkpoint": {"every_steps": 5}, **sections}
    return RunDir.create(tiny_spec(workdir, data={**TINY["data"], "shards": str(tiny_shards)}, **sections))


def _weights(run: RunDir) -> dict:
    return torch.load(run.path / "teacher" / EXPORT_NAME)


def _submit(run: RunDir):
    spec = run.spec()
    return make_executor(spec.cluster, run.stage("teacher") / "submitit").submit(StageJob(str(run.path), "teacher"))


def _wait_for_step(run: RunDir, step: int, job) -> None:
    log = run.path / "teacher" / "train_log.jsonl"

    def reached() -> bool:
        assert not job.done(), "the job ended before the step the test interrupts it at"
        return log.exists() and len(log.read_text().splitlines()) >= step

    wait_until(reached, f"step {step}", timeout=300, poll=0.002)


def _tasks(job) -> list[int]:
    """The rank processes the local executor's controller started (this test's own children)."""
    return child_processes(job._process.pid)


def _signal_every_rank(job, number: int) -> None:
    """Through the controller, which forwards it to every rank, while the ranks are held still: however fast
    they step, the signal is waiting in both before either can take another step."""
    ranks = _tasks(job)
    with frozen(ranks):
        job._process.send_signal(number)
        wait_until(lambda: all(signal_pending(pid, number) for pid in ranks), f"signal {number} to reach the ranks",
                   timeout=60, poll=0.01)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_shards):
    run = _run(tmp_path_factory.mktemp("uninterrupted"), tiny_shards)
    run_stage(run, "teacher", echo=lambda line: None)
    return run


@pytest.mark.integration
def test_a_stage_stopped_by_a_signal_at_a_random_step_requeues_and_ends_with_the_same_losses_and_weights(
        tmp_path, tiny_shards, uninterrupted):
    run = _run(tmp_path, tiny_shards)
    at = random.randint(1, 3 * EPOCHS - 2)
    print(f"interrupting after step {at}")
    job = _submit(run)
    _wait_for_step(run, at, job)
    _signal_every_rank(job, signal.SIGTERM)
    job.results()

    events = [e for e in run.events() if e["stage"] == "teacher"]
    preempted = next(e for e in events if e["event"] == "preempted")
    assert preempted["signal"] == "SIGTERM" and preempted["step"] >= at
    assert [e["event"] for e in events].count("requeued") == 1
    resumed = [e for e in events if e["event"] == "started" and "resumed_from" in e]
    assert len(resumed) == 1 and resumed[0]["step"] == preempted["step"] and resumed[0]["steps_lost"] == 0
    assert any(e["event"] == "checkpointed" and e["reason"] == "signal" for e in events)
    assert logged_losses(run) == logged_losses(uninterrupted)
    reference = _weights(uninterrupted)
    assert all(torch.equal(value, reference[key]) for key, value in _weights(run).items())


@pytest.mark.integration
@pytest.mark.parametrize("changed", [{}, {"cluster.tasks_per_node": 1}])
def test_a_finished_stage_submitted_again_keeps_its_network_summary_and_log(tmp_path, uninterrupted, changed):
    """Also on another number of ranks (free to change): one rank would take 24 steps where two took 12, and the
    stage counted as finished only at a step count."""
    run = RunDir(shutil.copytree(uninterrupted.path, tmp_path / "run"))
    if changed:
        RunDir.create(run.spec().with_overrides(**changed))
    outputs = (EXPORT_NAME, "summary.json", "train_log.jsonl")
    kept = {name: (run.path / "teacher" / name).read_bytes() for name in outputs}
    before = len(run.events())

    assert run_stage(run, "teacher", echo=lambda line: None) == json.loads(kept["summary.json"])
    assert {name: (run.path / "teacher" / name).read_bytes() for name in outputs} == kept
    assert [e["event"] for e in run.events()[before:] if e["stage"] == "teacher"][-1:] == ["finished"]
    assert "started" not in [e["event"] for e in run.events()[before:]]  # told apart before anything was built


@pytest.mark.integration
def test_a_stage_whose_split_leaves_a_rank_more_than_one_clip_over_trains_to_its_end(tmp_path, shards_of_35):
    """35 videos on 2 ranks x 16 clips: the stage crashed at the end of every epoch (the pipelines were built for
    17 clips and got 18), then was requeued as a crash until its budget was spent."""
    run = RunDir.create(tiny_spec(tmp_path, data={**TINY["data"], "shards": str(shards_of_35), "batch_size": 16},
                                  deepspeed={"global_batch_size": 32}, teacher={"epochs": 2}))
    summary = run_stage(run, "teacher", echo=lambda line: None)
    assert summary["steps"] == 2 and summary["clips"] == 64  # 70 clips: two full steps, 6 of epoch 1 left over
    assert len(logged_losses(run)) == 2 and (run.path / "teacher" / EXPORT_NAME).is_file()
    assert "requeued" not in [e["event"] for e in run.events()]


@pytest.mark.integration
def test_a_stage_killed_without_warning_resumes_from_its_last_periodic_checkpoint(tmp_path, tiny_shards,
                                                                                  uninterrupted):
    run = _run(tmp_path, tiny_shards)
    job = _submit(run)
    _wait_for_step(run, 8, job)  # past the periodic checkpoint at step 5, held still before the one at step 10
    ranks = _tasks(job)
    with frozen(ranks):
        for pid in ranks:
            os.kill(pid, signal.SIGKILL)
    with pytest.raises(Exception):
        job.results()

    run_stage(run, "teacher", echo=lambda line: None)  # resubmitted
    resumed = [e for e in run.events() if e["event"] == "started" and "resumed_from" in e]
    assert resumed[-1]["step"] == 5 and resumed[-1]["steps_lost"] >= 3
    assert logged_losses(run) == logged_losses(uninterrupted)
    assert_tensorboard_shows_the_train_log(run.path / "teacher")  # the lost steps once, as logged again


@pytest.mark.integration
def test_a_zero_1_stage_resumes_on_another_number_of_ranks_through_the_universal_format(tmp_path, tiny_shards):
    run = _run(tmp_path, tiny_shards)
    job = _submit(run)
    _wait_for_step(run, 6, job)
    _signal_every_rank(job, signal.SIGTERM)
    job.results()  # requeued once locally and finished on 2 ranks; now take its middle checkpoint to 1 rank
    middle = next(c for c in checkpoints.completed(run.path / "teacher" / checkpoints.CHECKPOINTS) if c.step >= 6)
    for later in checkpoints.completed(run.path / "teacher" / checkpoints.CHECKPOINTS):
        if later.step > middle.step:
            (later.path / checkpoints.MARKER).unlink()
    single = run.spec().with_overrides(**{"cluster.tasks_per_node": 1})
    RunDir.create(single)

    run_stage(run, "teacher", echo=lambda line: None)
    started = [e for e in run.events() if e["event"] == "started"][-1]
    assert started["world_size"] == 1 and started["resumed_from"] == middle.tag
    assert started["saved_by_ranks"] == 2
    # One rank takes 6 steps an epoch where two took 3; the position carries over, not the step count.
    remaining_epochs = EPOCHS - middle.epoch
    losses = logged_losses(run)
    assert len(losses) == middle.step + round(remaining_epochs * 6)
    assert all(map(torch.isfinite, torch.tensor(losses)))
    summary = json.loads((run.path / "teacher" / "summary.json").read_text())
    assert summary["world_size"] == 1


@pytest.mark.integration
def test_a_local_stage_cancelled_with_d3dc_cancel_checkpoints_stays_cancelled_and_resumes_when_submitted_again(
        tmp_path, tiny_shards, uninterrupted):
    run = _run(tmp_path, tiny_shards)
    outcome = []

    def follow() -> None:  # the `d3dc submit` running the stage in the foreground
        try:
            run_stage(run, "teacher", echo=lambda line: None, poll_seconds=0.2)
        except Exception as error:
            outcome.append(error)

    follower = threading.Thread(target=follow, daemon=True)
    follower.start()
    log = run.path / "teacher" / "train_log.jsonl"
    wait_until(lambda: log.exists() and len(log.read_text().splitlines()) >= 2, "step 2", timeout=300, poll=0.002)
    (job_id,) = [e["job_id"] for e in run.events() if e["event"] == "submitted"]
    with frozen(child_processes(int(job_id))):
        cancelled = CliRunner().invoke(main, ["cancel", str(run.path)])
    follower.join(timeout=300)

    assert cancelled.exit_code == 0 and f"cancelled teacher job {job_id} (was started)" in cancelled.output
    assert not follower.is_alive() and isinstance(outcome[0], JobCancelled)
    assert "submit it again to resume" in str(outcome[0])
    events = [e["event"] for e in run.events()]
    # The request, then the job's checkpoint and its own word on where it stopped.
    assert events[-3:] == ["cancelled", "checkpointed", "cancelled"]
    assert "preempted" not in events and "requeued" not in events
    assert run.events()[-1]["step"] == run.events()[-2]["step"] >= 2
    assert run_status(run)[0].state == "cancelled"
    assert "no live job to cancel" in CliRunner().invoke(main, ["cancel", str(run.path)]).output

    run_stage(run, "teacher", echo=lambda line: None)
    assert logged_losses(run) == logged_losses(uninterrupted)


@pytest.mark.integration
def test_a_rank_whose_peer_stops_answering_fails_after_the_collective_timeout_instead_of_hanging(tmp_path,
                                                                                                  tiny_shards):
    # Long enough for the ranks of a loaded machine to start apart (the rendezvous waits as long), far below 1800.
    run = _run(tmp_path, tiny_shards, cluster={"collective_timeout_s": 60})
    job = _submit(run)
    _wait_for_step(run, 3, job)
    rank_0, rank_1 = sorted(_tasks(job))
    os.kill(rank_1, signal.SIGSTOP)  # alive, but never again in a collective: a hung peer
    try:
        wait_until(lambda: any(e["event"] == "failed" for e in run.events()), "rank 0 to give up on its peer",
                   timeout=240, poll=0.1)
    finally:
        os.kill(rank_1, signal.SIGKILL)
    with pytest.raises(Exception):
        job.results()
    failed = next(e for e in run.events() if e["event"] == "failed")
    assert failed["rank"] == 0 and failed["retryable"] is True  # a lost peer may go differently next time
