"""A run's status read from its events log (as the jobs write it) and its training log; logs and their default."""

import json

from click.testing import CliRunner

from d3d_cluster.cli import main
from d3d_cluster.rundir import RunDir
from d3d_cluster.launch.status import SlurmJob, list_runs, log_path, run_status
from d3d_cluster.spec import Spec


def _run(tmp_path, name="d3d", events=()) -> RunDir:
    run = RunDir.create(Spec(workdir=str(tmp_path), name=name, cluster={"executor": "slurm"}))
    lines = [json.dumps({"time": f"2026-11-21T10:{minute:02d}:00+0000", **event}) for minute, event in enumerate(events)]
    (run.path / "events.jsonl").write_text("".join(line + "\n" for line in lines))
    return run


PIPELINE = [
    {"event": "submitted", "stage": "teacher", "job_id": "11", "executor": "slurm", "dependency": None},
    {"event": "submitted", "stage": "baseline", "job_id": "12", "executor": "slurm", "dependency": None},
    {"event": "submitted", "stage": "student", "job_id": "13", "executor": "slurm", "dependency": "afterok:11"},
    {"event": "submitted", "stage": "eval", "job_id": "14", "executor": "slurm", "dependency": "afterok:13:12"},
    {"event": "started", "stage": "teacher", "job_id": "11", "world_size": 16, "master": "gpu1:29500"},
    {"event": "checkpointed", "stage": "teacher", "job_id": "11", "tag": "step-400", "step": 400, "epoch": 2.0,
     "seconds": 12.5, "reason": "interval"},
    {"event": "preempted", "stage": "teacher", "job_id": "11", "signal": "USR2", "reason": "timeout", "step": 450,
     "steps_lost": 0},
    {"event": "checkpointed", "stage": "teacher", "job_id": "11", "tag": "step-450", "step": 450, "epoch": 2.25,
     "seconds": 11.0, "reason": "preempted"},
    {"event": "requeued", "stage": "teacher", "job_id": "11", "requeues": 1, "cause": "time limit"},
    {"event": "started", "stage": "teacher", "job_id": "11", "world_size": 16, "master": "gpu3:29500",
     "resumed_from": "step-450"},
    {"event": "started", "stage": "baseline", "job_id": "12", "world_size": 16, "master": "gpu2:29500"},
    {"event": "failed", "stage": "baseline", "job_id": "12", "error": "RuntimeError: NCCL timeout"},
]


def test_each_job_shows_its_slurm_state_progress_last_checkpoint_requeues_and_error(tmp_path):
    run = _run(tmp_path, events=PIPELINE)
    slurm = {"11": SlurmJob("RUNNING"), "12": SlurmJob("FAILED"),
             "13": SlurmJob("PENDING", "Dependency", "afterok:11(unfulfilled)"), "14": SlurmJob("PENDING", "Dependency")}
    teacher, baseline, student, evaluation = run_status(run, slurm)
    assert [job.stage for job in (teacher, baseline, student, evaluation)] == ["teacher", "baseline", "student", "eval"]
    assert (teacher.job_id, teacher.state, teacher.live, teacher.last_event) == ("11", "RUNNING", True, "started")
    assert (teacher.step, teacher.epoch, teacher.requeues, teacher.requeue_causes) == (450, 2.25, 1, {"time limit": 1})
    assert teacher.checkpoint["tag"] == "step-450" and teacher.last_time == "2026-11-21T10:09:00+0000"
    assert (baseline.state, baseline.live, baseline.ended, baseline.error) == ("FAILED", False, True,
                                                                               "RuntimeError: NCCL timeout")
    assert (student.state, student.dependency, student.slurm.waiting_for) == ("PENDING", "afterok:11",
                                                                              "afterok:11(unfulfilled)")
    assert student.step is None and student.checkpoint is None and not student.ended


def test_a_running_stage_takes_step_and_epoch_from_the_last_line_of_its_training_log(tmp_path):
    run = _run(tmp_path, events=PIPELINE)
    log = run.stage("teacher") / "train_log.jsonl"
    log.write_text("".join(json.dumps({"step": step, "epoch": step / 200, "loss": 1.0}) + "\n" for step in (451, 452))
                   + '{"step": 453, "ep')  # a line being written
    teacher = run_status(run, {})[0]
    assert (teacher.step, teacher.epoch) == (452, 2.26)


def test_a_resubmitted_stage_shows_its_new_job_only_and_slurm_forgotten_jobs_have_ended(tmp_path):
    events = PIPELINE[:1] + [
        {"event": "failed", "stage": "teacher", "job_id": "11", "error": "OOM"},
        {"event": "submitted", "stage": "teacher", "job_id": "21", "executor": "slurm", "dependency": None}]
    teacher, = run_status(_run(tmp_path, events=events), {})
    assert (teacher.job_id, teacher.last_event, teacher.error, teacher.slurm) == ("21", "submitted", None, None)
    assert teacher.ended and teacher.state == "submitted"


def test_a_job_shows_the_first_failure_of_its_latest_run_with_the_rank_and_host_that_recorded_it(tmp_path):
    lost = {"event": "failed", "stage": "teacher", "job_id": "11", "retryable": True, "host": "gpu7"}
    events = PIPELINE[:1] + [
        {"event": "started", "stage": "teacher", "job_id": "11", "world_size": 16, "master": "gpu1:29500"},
        {**lost, "rank": 9, "error": "DistBackendError: NCCL watchdog timeout"},
        {"event": "requeued", "stage": "teacher", "job_id": "11", "requeues": 1},
        {"event": "started", "stage": "teacher", "job_id": "11", "world_size": 16, "master": "gpu1:29500"},
        {**lost, "rank": 3, "retryable": False, "error": "OutOfMemoryError: CUDA out of memory"},
        {**lost, "rank": 2, "error": "DistBackendError: connection reset by peer"}]
    teacher, = run_status(_run(tmp_path, events=events), {})
    assert teacher.error == "OutOfMemoryError: CUDA out of memory (rank 3 on gpu7)"
    running = run_status(_run(tmp_path, name="again", events=events[:5]), {})[0]
    assert running.error == "DistBackendError: NCCL watchdog timeout (rank 9 on gpu7)"  # why it was requeued
    finished = run_status(_run(tmp_path, name="finished", events=[
        *events[:5], {"event": "finished", "stage": "teacher", "job_id": "11"}]), {})[0]
    assert finished.error is None  # a failure its requeue overcame is not the finished job's story


def test_a_cancelled_job_is_cancelled_even_when_slurm_has_forgotten_it(tmp_path):
    events = PIPELINE[:1] + [{"event": "cancelled", "stage": "teacher", "job_id": "11", "state": "RUNNING"}]
    teacher, = run_status(_run(tmp_path, events=events), {})
    assert (teacher.state, teacher.ended, teacher.live) == ("cancelled", True, False)


def test_runs_are_listed_most_recent_first_with_their_jobs(tmp_path):
    _run(tmp_path, "older", PIPELINE[:2])
    _run(tmp_path, "newer", PIPELINE)
    (tmp_path / "runs" / "not-a-run").mkdir()
    summaries = list_runs(tmp_path / "runs")
    assert [summary.run.path.name for summary in summaries] == ["newer", "older"]
    assert [job.stage for job in summaries[1].stages] == ["teacher", "baseline"]
    assert summaries[0].last_time == "2026-11-21T10:11:00+0000"


def test_logs_default_to_the_job_that_reported_last_rank_zero(tmp_path):
    run = _run(tmp_path, events=PIPELINE)
    job, path = log_path(run)
    assert job.stage == "baseline" and path == run.path / "baseline" / "submitit" / "12_0_log.out"
    job, path = log_path(run, "student", rank=3, stream="err")
    assert path == run.path / "student" / "submitit" / "13_3_log.err"


def test_the_logs_command_prints_a_jobs_log_and_names_the_jobs_there_are(tmp_path):
    run = _run(tmp_path, events=PIPELINE)
    log = run.stage("teacher") / "submitit"
    log.mkdir()
    (log / "11_1_log.out").write_text("[teacher] rank 1/16 metrics at http://gpu1:9100/metrics\nno newline yet")
    result = CliRunner().invoke(main, ["logs", "d3d", "--workdir", str(tmp_path), "--stage", "teacher", "--rank", "1"])
    assert result.exit_code == 0, result.output
    assert result.output == "[teacher] rank 1/16 metrics at http://gpu1:9100/metrics\nno newline yet\n"
    result = CliRunner().invoke(main, ["logs", "d3d", "--workdir", str(tmp_path), "--stage", "probe"])
    assert result.exit_code != 0 and "no job of stage 'probe' (jobs: teacher, baseline, student, eval)" in result.output
    result = CliRunner().invoke(main, ["logs", "d3d", "--workdir", str(tmp_path), "--stage", "student"])
    assert result.exit_code != 0 and "13_0_log.out: no log yet (student job 13 is" in result.output
