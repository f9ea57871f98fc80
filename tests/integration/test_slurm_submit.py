"""`d3dc submit`, `status`, `logs` and `cancel` through real sbatch on the test suite's own Slurm cluster."""

import json
import re

import pytest
import yaml
from click.testing import CliRunner
from conftest import TINY
from job_control import wait_until

from d3d_cluster import cli
from d3d_cluster.cli import main
from d3d_cluster.rundir import RunDir
from d3d_cluster.launch.status import ACTIVE_STATES, run_status


@pytest.fixture(autouse=True)
def wide_console(monkeypatch):
    """Tables as a wide terminal shows them (CliRunner's output is 80 columns)."""
    from rich.console import Console

    monkeypatch.setattr(cli, "console", Console(highlight=False, width=220))


def _spec_file(tmp_path, shards, slurm_cluster, **sections):
    tree = {**TINY, "workdir": str(tmp_path / "work"), "data": {**TINY["data"], "shards": str(shards)},
            "teacher": {"epochs": 1}, "student": {"epochs": 1},
            "cluster": {"executor": "slurm", "partition": slurm_cluster.partition, "timeout_min": 10}, **sections}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


def _d3dc(*args: str):
    result = CliRunner().invoke(main, list(args))
    assert result.exit_code == 0, result.output
    return result.output


def _job_ids(run: RunDir) -> dict[str, str]:
    return {e["stage"]: e["job_id"] for e in run.events() if e["event"] == "submitted"}


def _queued(slurm_cluster) -> set[str]:
    return set(slurm_cluster.run("squeue", "-h", "-t", "all", "-o", "%i").split())


@pytest.mark.integration
def test_the_pipeline_is_queued_as_four_jobs_chained_by_afterok_and_runs_to_its_results(tmp_path, tiny_shards,
                                                                                      slurm_cluster):
    # One rank per job: teacher and baseline fit on the node together.
    spec = _spec_file(tmp_path, tiny_shards, slurm_cluster, cluster={
        "executor": "slurm", "partition": slurm_cluster.partition, "timeout_min": 10, "tasks_per_node": 1})
    dry = _d3dc("submit", "pipeline", "-c", str(spec), "--dry-run", "--name", "chain")
    output = _d3dc("submit", "pipeline", "-c", str(spec), "--name", "chain")
    run = RunDir(tmp_path / "work" / "runs" / "chain")
    ids = _job_ids(run)
    assert list(ids) == ["teacher", "baseline", "student", "eval"] and all(i.isdigit() for i in ids.values())
    assert f"[student] submitted job {ids['student']} (1 rank, after afterok:{ids['teacher']}" in output
    submitted = {e["stage"]: e for e in run.events() if e["event"] == "submitted"}
    assert submitted["eval"]["dependency"] == f"afterok:{ids['student']}:{ids['baseline']}"
    assert submitted["teacher"]["dependency"] is None and submitted["teacher"]["executor"] == "slurm"

    # What the dry run printed is what was submitted (the dependency aside).
    teacher_script = (run.path / "teacher" / "submitit" / f"{ids['teacher']}_submission.sh").read_text()
    assert dry.split("# ----- job 1 of 4: teacher -----\n")[1].split("\n# ----- job 2")[0] == teacher_script
    student_script = (run.path / "student" / "submitit" / f"{ids['student']}_submission.sh").read_text()
    assert f"#SBATCH --dependency=afterok:{ids['teacher']}\n" in student_script

    _d3dc("logs", "chain", "--workdir", str(tmp_path / "work"), "--stage", "eval", "--follow")  # until eval ends
    for stage, job_id in ids.items():
        assert "JobState=COMPLETED" in slurm_cluster.wait_for_job(job_id)
    # Slurm held each job until what it depends on had finished (the events log is appended in time order).
    order = [(e["event"], e["stage"]) for e in run.events()]
    for job, after in (("student", "teacher"), ("eval", "student"), ("eval", "baseline")):
        assert order.index(("started", job)) > order.index(("finished", after)), order
    results = json.loads((run.path / "results.json").read_text())
    assert set(results["models"]) >= {"teacher", "student", "baseline"}
    status = _d3dc("status", str(run.path))
    for stage in ids:
        assert re.search(rf"{stage}\s+│\s+{ids[stage]}\s+│\s+COMPLETED\s+│\s+finished", status), status
    teacher_log = _d3dc("logs", "chain", "--workdir", str(tmp_path / "work"), "--stage", "teacher")
    assert "[teacher] done:" in teacher_log
    assert "chain" in _d3dc("runs", "--workdir", str(tmp_path / "work"))


@pytest.mark.integration
def test_status_shows_live_jobs_and_cancel_cancels_every_one_of_them(tmp_path, tiny_shards, slurm_cluster):
    spec = _spec_file(tmp_path, tiny_shards, slurm_cluster, teacher={"epochs": 100_000})  # cancelled long before its end
    _d3dc("submit", "pipeline", "-c", str(spec), "--name", "long")
    run = RunDir(tmp_path / "work" / "runs" / "long")
    ids = _job_ids(run)

    wait_until(lambda: any(e["event"] == "started" and e["stage"] == "teacher" for e in run.events()), "teacher start",
               timeout=300)
    status = _d3dc("status", "long", "-c", str(spec))
    assert re.search(rf"teacher\s+│\s+{ids['teacher']}\s+│\s+RUNNING\s+│\s+started", status), status
    assert re.search(rf"student\s+│\s+{ids['student']}\s+│\s+PENDING\s+│\s+submitted.*afterok:{ids['teacher']}",
                     status), status
    assert "long" in _d3dc("runs", "-c", str(spec)) and "teacher RUNNING" in _d3dc("runs", "-c", str(spec))

    again = CliRunner().invoke(main, ["submit", "teacher", "-c", str(spec), "--name", "long"])
    assert again.exit_code != 0 and f"the run has live jobs (teacher {ids['teacher']} RUNNING" in again.output
    assert _job_ids(run) == ids

    cancelled = _d3dc("cancel", "long", "-c", str(spec))
    for stage, job_id in ids.items():
        assert f"cancelled {stage} job {job_id}" in cancelled
    wait_until(lambda: not any(job.live for job in run_status(run)), "jobs to leave the queue", timeout=300)
    live = slurm_cluster.run("squeue", "-h", "-o", "%i %T").split("\n")
    assert not any(line.split()[0] in ids.values() for line in live if line)
    events = [e for e in run.events() if e["event"] == "cancelled"]
    assert {e["stage"]: e["job_id"] for e in events} == ids
    assert all(job.state == "CANCELLED" and job.slurm.state not in ACTIVE_STATES for job in run_status(run))
    assert "no live job to cancel" in _d3dc("cancel", "long", "-c", str(spec))


@pytest.mark.integration
@pytest.mark.parametrize("case", ["unknown partition", "student without teacher", "malformed spec"])
def test_bad_input_is_refused_before_anything_is_queued(case, tmp_path, tiny_shards, slurm_cluster):
    spec = _spec_file(tmp_path, tiny_shards, slurm_cluster)
    target, flags, message = {
        "unknown partition": ("pipeline", ["--partition", "gpu-h100"],
                              "cluster.partition: no partition 'gpu-h100' on this cluster (partitions: debug)"),
        "student without teacher": ("student", [], "teacher/model.pt: the student needs a finished teacher in this "
                                                   "run; train the teacher first (or submit the pipeline)"),
        "malformed spec": ("pipeline", [], "unknown key data.clip_frame (expected one of: shards, clip_frames"),
    }[case]
    if case == "malformed spec":
        tree = yaml.safe_load(spec.read_text())
        tree["data"]["clip_frame"] = tree["data"].pop("clip_frames")
        spec.write_text(yaml.safe_dump(tree))
    queued = _queued(slurm_cluster)
    result = CliRunner().invoke(main, ["submit", target, "-c", str(spec), *flags])
    assert result.exit_code != 0 and message in result.output, result.output
    assert _queued(slurm_cluster) == queued
    assert not (tmp_path / "work" / "runs").exists()


@pytest.mark.integration
def test_the_dry_run_queues_nothing_on_a_live_cluster(tmp_path, tiny_shards, slurm_cluster):
    queued = _queued(slurm_cluster)
    output = _d3dc("submit", "pipeline", "-c", str(_spec_file(tmp_path, tiny_shards, slurm_cluster)), "--dry-run")
    assert output.count("#!/bin/bash") == 4
    assert _queued(slurm_cluster) == queued and not (tmp_path / "work").exists()



@pytest.mark.integration
def test_when_a_stage_fails_slurm_cancels_the_jobs_waiting_on_it_and_status_shows_why(tmp_path, tiny_shards,
                                                                                     slurm_cluster):
    import shutil

    shards = shutil.copytree(tiny_shards, tmp_path / "shards")
    spec = _spec_file(tmp_path, shards, slurm_cluster, cluster={
        "executor": "slurm", "partition": slurm_cluster.partition, "timeout_min": 10, "tasks_per_node": 1})
    _d3dc("submit", "pipeline", "-c", str(spec), "--name", "broken")
    for tar in shards.glob("*.tar"):  # after the checks, before the jobs read them
        tar.unlink()
    run = RunDir(tmp_path / "work" / "runs" / "broken")
    ids = _job_ids(run)
    assert "JobState=FAILED" in slurm_cluster.wait_for_job(ids["teacher"])
    # Without --kill-on-invalid-dep the student and the evaluation would wait forever (DependencyNeverSatisfied).
    for stage in ("student", "eval"):
        assert "JobState=CANCELLED" in slurm_cluster.wait_for_job(ids[stage])
    jobs = {job.stage: job for job in run_status(run)}
    assert jobs["teacher"].state == "FAILED" and jobs["teacher"].last_event == "failed"
    assert ".tar" in jobs["teacher"].error
    assert jobs["student"].state == "CANCELLED" and jobs["student"].last_event == "submitted"
    status = _d3dc("status", "broken", "-c", str(spec))
    assert re.search(rf"teacher\s+│\s+{ids['teacher']}\s+│\s+FAILED\s+│\s+failed", status), status


@pytest.mark.integration
def test_the_headline_command_queues_on_slurm_where_slurm_answers_without_being_told(tmp_path, tiny_shards,
                                                                                   slurm_cluster, monkeypatch):
    from d3d_cluster.launch.executor import detect_executor

    assert detect_executor() == ("slurm", "sinfo answered")
    spec = _spec_file(tmp_path, tiny_shards, slurm_cluster, cluster={"partition": slurm_cluster.partition})
    result = CliRunner().invoke(main, ["submit", "student", "--nodes", "8", "-c", str(spec), "--dry-run", "--set",
                                       "deepspeed.global_batch_size=64"])  # 8 nodes x 2 ranks x 2 clips x 2 steps
    assert result.exit_code == 0, result.output
    assert result.output.startswith("# cluster.executor auto: slurm (sinfo answered)\n# 16 ranks (8 nodes x 2)")
    assert "#SBATCH --nodes=8\n" in result.output and "#SBATCH --partition=" in result.output

    monkeypatch.setenv("SLURM_CONF", str(tmp_path / "no-such-slurm.conf"))  # a cluster whose controller is away
    executor, why = detect_executor()
    assert executor == "local" and why.startswith("Slurm's controller did not answer")
    refused = CliRunner().invoke(main, ["submit", "student", "--nodes", "8", "-c", str(spec), "--dry-run", "--set",
                                        "deepspeed.global_batch_size=64"])
    assert refused.exit_code != 0 and "cluster.nodes is 8: the local executor runs on one node" in refused.output
    assert "cluster.executor auto chose local: Slurm's controller did not answer" in refused.output


def test_without_slurm_commands_auto_runs_locally(monkeypatch, tmp_path):
    from d3d_cluster.launch.executor import detect_executor

    monkeypatch.setenv("PATH", str(tmp_path))  # an empty PATH: no sbatch, srun or sinfo
    assert detect_executor() == ("local", "no Slurm here (sbatch, srun, sinfo not on PATH)")
