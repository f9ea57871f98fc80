"""Preemption on a real Slurm: `scancel --signal=USR2` mid-training makes every rank checkpoint, rank 0 requeue the
job through Slurm, and the requeued job resume and finish with exactly the losses of an uninterrupted run."""

import json
import random
import threading
import time

import pytest
from conftest import TINY, tiny_spec

from d3d_cluster.launch.pipeline import run_stage
from d3d_cluster.launch.rundir import RunDir

EPOCHS = 4


def _run(workdir, tiny_shards, **cluster) -> RunDir:
    return RunDir.create(tiny_spec(workdir, data={**TINY["data"], "shards": str(tiny_shards)},
                                   teacher={"epochs": EPOCHS}, checkpoint={"every_steps": 5},
                                   cluster={"timeout_min": 10, **cluster}))


def _losses(run: RunDir) -> list[float]:
    return [json.loads(line)["loss"] for line in (run.path / "teacher" / "train_log.jsonl").read_text().splitlines()]


def _wait(condition, what: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


@pytest.mark.integration
def test_a_job_preempted_with_usr2_requeues_resumes_and_finishes_with_identical_losses(tmp_path, tiny_shards,
                                                                                       slurm_cluster):
    reference = _run(tmp_path / "local", tiny_shards)
    run_stage(reference, "teacher", echo=lambda line: None)

    run = _run(tmp_path / "slurm", tiny_shards, executor="slurm", partition=slurm_cluster.partition)
    failure = []
    follower = threading.Thread(target=lambda: _follow(run, failure))
    follower.start()
    log = run.path / "teacher" / "train_log.jsonl"
    at = random.randint(1, 3 * EPOCHS - 2)
    print(f"preempting after step {at}")
    _wait(lambda: log.exists() and len(log.read_text().splitlines()) >= at, f"step {at}")
    job_id = next(e["job_id"] for e in run.events() if e["event"] == "submitted")
    slurm_cluster.run("scancel", "--signal=USR2", job_id)
    _wait(lambda: any(e["event"] == "requeued" for e in run.events()), "the requeue")
    # Slurm holds a requeued job back for a while; let it start now.
    _wait(lambda: "JobState=PENDING" in slurm_cluster.run("scontrol", "show", "job", job_id), "the job to pend")
    slurm_cluster.run("scontrol", "update", f"JobId={job_id}", "StartTime=now")
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
    assert _losses(run) == _losses(reference)


def _follow(run: RunDir, failure: list) -> None:
    try:
        run_stage(run, "teacher", echo=lambda line: None, poll_seconds=0.5)
    except Exception as error:  # reported by the test thread
        failure.append(repr(error))
