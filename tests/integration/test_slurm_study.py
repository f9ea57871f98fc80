"""A study on the test suite's own Slurm cluster: 2 seeds x 2 student settings queue 2 teachers, 2 baselines and 4
students, a study cancelled midway resumes when it is submitted again, nothing finished is trained twice, and
`d3dc compare` pairs every point's student with its seed's baseline."""

import json

import pytest
import yaml
from click.testing import CliRunner
from conftest import TINY
from job_control import wait_until

from d3d_cluster import cli
from d3d_cluster.cli import main
from d3d_cluster.launch.status import run_status
from d3d_cluster.rundir import STUDY_NAME, RunDir


@pytest.fixture(autouse=True)
def wide_console(monkeypatch):
    from rich.console import Console

    monkeypatch.setattr(cli, "console", Console(highlight=False, width=250))


def _d3dc(*args: str) -> str:
    result = CliRunner().invoke(main, list(args))
    assert result.exit_code == 0, result.output
    return result.output


def _submitted(runs: list[RunDir]) -> list[tuple[str, str, str]]:
    """(run directory, job, Slurm job id) of every submission."""
    return [(str(run.path), e["stage"], e["job_id"]) for run in runs for e in run.events() if e["event"] == "submitted"]


def _finished(runs: list[RunDir]) -> set[tuple[str, str]]:
    """(run directory, job) of the jobs that finished after they last started (a cancel may reach a job as it ends,
    and is then recorded after its `finished`)."""
    last = {}
    for run in runs:
        for event in run.events():
            if event["event"] in ("started", "finished"):
                last[str(run.path), event["stage"]] = event["event"]
    return {key for key, event in last.items() if event == "finished"}


@pytest.mark.integration
def test_a_study_of_two_seeds_and_two_settings_shares_teachers_and_resumes_after_a_cancel(tmp_path, tiny_shards,
                                                                                        slurm_cluster):
    tree = {**TINY, "workdir": str(tmp_path / "work"), "data": {**TINY["data"], "shards": str(tiny_shards)},
            "teacher": {"epochs": 1}, "student": {"epochs": 1},
            "cluster": {"executor": "slurm", "partition": slurm_cluster.partition, "timeout_min": 10,
                        "tasks_per_node": 1}}
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(tree))
    submit = ["submit", "pipeline", "-c", str(spec), "--name", "study", "--seeds", "0-1",
              "--sweep", "student.distill.weight=1,3", "--max-parallel", "2"]
    _d3dc(*submit)
    study = tmp_path / "work" / "runs" / "study"
    points = json.loads((study / STUDY_NAME).read_text())["points"]
    runs = [RunDir(point["run"]) for point in points]
    first = _submitted(runs)
    jobs = [job for _, job, _ in first]
    assert {job: jobs.count(job) for job in jobs} == {"teacher": 2, "baseline": 2, "student": 4, "eval": 4}
    ids = {(str(run.path), e["stage"]): e for run in runs for e in run.events() if e["event"] == "submitted"}
    # The third point (seed 1) starts when the first has ended: at most two points at once.
    seed_1_teacher = ids[str(runs[2].path), "teacher"]["dependency"]
    assert seed_1_teacher == f"afterany:{ids[str(runs[0].path), 'eval']['job_id']}"
    # The second point's student is distilled from the first point's teacher.
    assert ids[str(runs[1].path), "student"]["dependency"] == f"afterok:{ids[str(runs[0].path), 'teacher']['job_id']}"

    wait_until(lambda: (str(runs[0].path), "eval") in _finished(runs[:1]), "the first point's evaluation", timeout=600)
    cancelled = _d3dc("cancel", "study", "-c", str(spec))
    assert "study/seed-1" in cancelled
    wait_until(lambda: not any(job.live for run in runs for job in run_status(run)), "jobs to leave the queue",
               timeout=300)
    finished_before = _finished(runs)
    assert (str(runs[0].path), "teacher") in finished_before

    _d3dc(*submit)
    resubmitted = [job for job in _submitted(runs) if job not in first]
    assert resubmitted and not {(point, job) for point, job, _ in resubmitted} & finished_before

    for run in runs:
        wait_until(lambda run=run: (str(run.path), "eval") in _finished([run]), f"{run.path}'s evaluation", timeout=300)
    trained = [(run.path.name, e["stage"]) for run in runs for e in run.events() if e["event"] == "finished"]
    assert sorted(trained) == sorted([("student.distill.weight-1", stage) for stage in ("teacher", "baseline")] * 2
                                     + [(run.path.name, job) for run in runs for job in ("student", "eval")])
    for run in runs:
        results = json.loads((run.path / "results.json").read_text())
        assert set(results["models"]) == {"teacher", "student", "baseline", "student+teacher"}
    status = _d3dc("status", "study", "-c", str(spec))
    assert status.count("(shared)") == 4, status

    compared = _d3dc("compare", "study", "-c", str(spec))
    assert "student.distill.weight=1" in compared and "student.distill.weight=3" in compared
    assert "95% Student t interval" in compared and (study / "study.png").stat().st_size > 0
    report = json.loads(_d3dc("compare", "study", "-c", str(spec), "--json"))
    assert [row["state"] for row in report["points"]] == ["evaluated"] * 4
    assert [(setting["points"], setting["seeds"]) for setting in report["settings"]] == [(2, [0, 1])] * 2
