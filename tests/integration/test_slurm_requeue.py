"""Requeues on a real Slurm. Preemption: `scancel --signal=USR2` mid-training makes every rank checkpoint, rank 0
requeue the job through Slurm, and the requeued job resume. Death without warning: a rank killed mid-training
takes its job down, the batch script's exit hook requeues it, and it resumes from the last periodic checkpoint.
Both finish with exactly the losses of an uninterrupted run."""

import os
import random
import signal
import threading

import pytest
from conftest import TINY, logged_losses, tiny_spec
from job_control import frozen, release_requeued, signal_pending, slurm_rank_process, wait_until

from d3d_cluster.launch.pipeline import run_stage
from d3d_cluster.rundir import RunDir
from d3d_cluster.launch.submit import submit

EPOCHS = 4
WAIT = {"timeout": 300, "poll": 0.05}
STEP_WAIT = {"timeout": 300, "poll": 0.002}  # a step is seen within milliseconds of its log line


def _run(workdir, tiny_shards, **cluster) -> RunDir:
    return RunDir.create(tiny_spec(workdir, data={**TINY["data"], "shards": str(tiny_shards)},
                                   teacher={"epochs": EPOCHS}, checkpoint={"every_steps": 5},
                                   cluster={"timeout_min": 10, **cluster}))


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_shards) -> RunDir:
    """The uninterrupted run, on the local executor: the same 2-rank world, the same arithmetic."""
    run = _run(tmp_path_factory.mktemp("uninterrupted"), tiny_shards)
    run_stage(run, "teacher", echo=lambda line: None)
    return run


@pytest.mark.integration
def test_a_job_preempted_with_usr2_requeues_resumes_and_finishes_with_identicallogged_losses(tmp_path, tiny_shards,
                                                                                       slurm_cluster, reference):
    run = _run(tmp_path / "slurm", tiny_shards, executor="slurm", partition=slurm_cluster.partition)
    failure = []
    follower = threading.Thread(target=lambda: _follow(run, failure), daemon=True)
    follower.start()
    log = run.path / "teacher" / "train_log.jsonl"
    at = random.randint(1, 3 * EPOCHS - 2)
    print(f"preempting after step {at}")
    ranks = _ranks_once_started(run)
    wait_until(lambda: log.exists() and len(log.read_text().splitlines()) >= at, f"step {at}", **STEP_WAIT)
    job_id = next(e["job_id"] for e in run.events() if e["event"] == "submitted")
    # Held still while Slurm delivers the signal, so that the job cannot finish first however fast it steps.
    with frozen(ranks):
        slurm_cluster.run("scancel", "--signal=USR2", job_id)
        wait_until(lambda: all(signal_pending(pid, signal.SIGUSR2) for pid in ranks), "USR2 to reach the ranks",
                   **WAIT)
    wait_until(lambda: any(e["event"] == "requeued" for e in run.events()), "the requeue", **WAIT)
    release_requeued(slurm_cluster, job_id)
    follower.join(timeout=600)
    assert not follower.is_alive() and not failure, failure

    events = run.events()
    preempted = next(e for e in events if e["event"] == "preempted")
    assert preempted["signal"] == "SIGUSR2" and preempted["reason"] == "preemption" and preempted["step"] >= at
    resumed = [e for e in events if e["event"] == "started" and "resumed_from" in e]
    assert len(resumed) == 1 and resumed[0]["job_id"] == job_id and resumed[0]["steps_lost"] == 0
    assert events[-1]["event"] == "finished"
    assert "JobState=COMPLETED" in slurm_cluster.wait_for_job(job_id) and "Restarts=1" in \
        slurm_cluster.run("scontrol", "show", "job", job_id)
    assert logged_losses(run) == logged_losses(reference)


@pytest.mark.integration
def test_a_job_whose_rank_is_killed_is_requeued_by_its_exit_hook_and_resumes_from_the_periodic_checkpoint(
        tmp_path, tiny_shards, slurm_cluster, reference):
    run = _run(tmp_path / "slurm", tiny_shards, executor="slurm", partition=slurm_cluster.partition)
    submit(run.spec(), "teacher", echo=lambda line: None)
    job_id = next(e["job_id"] for e in run.events() if e["event"] == "submitted")
    log = run.path / "teacher" / "train_log.jsonl"
    ranks = _ranks_once_started(run)
    # Past the periodic checkpoint at step 5, held still before the one at step 10.
    wait_until(lambda: log.exists() and len(log.read_text().splitlines()) >= 7, "step 7", **STEP_WAIT)
    with frozen(ranks):
        os.kill(ranks[1], signal.SIGKILL)

    wait_until(lambda: any(e["event"] == "requeued" for e in run.events()), "the exit hook's requeue", **WAIT)
    release_requeued(slurm_cluster, job_id)
    wait_until(lambda: run.events()[-1]["event"] == "finished",
               lambda: f"the resumed job to finish: {slurm_cluster.run('scontrol', 'show', 'job', job_id)}"
                       f"{slurm_cluster.run('sinfo', '-N', '-l')}{run.events()[-3:]}", **WAIT)

    requeued = next(e for e in run.events() if e["event"] == "requeued")
    assert requeued["job_id"] == job_id and "without warning" in requeued["reason"]
    resumed = next(e for e in run.events() if e["event"] == "started" and "resumed_from" in e)
    assert resumed["resumed_from"] == "step-00000005" and resumed["steps_lost"] >= 2
    assert logged_losses(run) == logged_losses(reference)


@pytest.mark.integration
def test_a_rank_killed_again_and_again_is_requeued_until_the_crash_budget_ends_it_and_every_requeue_is_recorded(
        tmp_path, tiny_shards, slurm_cluster):
    run = _run(tmp_path / "slurm", tiny_shards, executor="slurm", partition=slurm_cluster.partition,
               max_crash_requeues=2)
    submit(run.spec(), "teacher", echo=lambda line: None)
    job_id = next(e["job_id"] for e in run.events() if e["event"] == "submitted")
    log = run.path / "teacher" / "train_log.jsonl"
    for kill in range(1, 4):
        ranks = _ranks_once_started(run, starts=kill)
        wait_until(lambda: log.exists() and len(log.read_text().splitlines()) >= 2, "step 2", **STEP_WAIT)
        with frozen(ranks):
            os.kill(ranks[kill % 2], signal.SIGKILL)
        if kill < 3:
            wait_until(lambda: sum(e["event"] == "requeued" for e in run.events()) == kill, f"requeue {kill}", **WAIT)
            release_requeued(slurm_cluster, job_id)

    shown = slurm_cluster.wait_for_job(job_id)
    assert "JobState=FAILED" in shown and "Restarts=2" in shown, shown
    events = run.events()
    requeued = [e for e in events if e["event"] == "requeued"]
    assert [(e["cause"], e["requeues"]) for e in requeued] == [("crash", 1), ("crash", 2)]
    assert sum(e["event"] == "started" for e in events) == 3
    final = events[-1]
    assert final["event"] == "failed" and not final["retryable"]
    assert "after 2 crash requeues (cluster.max_crash_requeues)" in final["error"]


def _ranks_once_started(run: RunDir, starts: int = 1) -> list[int]:
    """Both ranks' pids, looked up once the job has started `starts` times (before its first step there: the search
    takes a while)."""
    wait_until(lambda: sum(e["event"] == "started" for e in run.events()) >= starts, f"start {starts} of the job",
               **WAIT)
    return [slurm_rank_process(run.path / "teacher" / "submitit", rank) for rank in range(2)]


def _follow(run: RunDir, failure: list) -> None:
    try:
        run_stage(run, "teacher", echo=lambda line: None, poll_seconds=0.5)
    except Exception as error:  # reported by the test thread
        failure.append(repr(error))
