"""A study's points, which of them trains each stage, and the jobs it queues: checked on specs alone, and once for
real with the local executor (a sweep over a student key trains one teacher and one baseline)."""

import json

import pytest
import yaml
from click.testing import CliRunner
from rich.console import Console
from conftest import TINY, tiny_spec

from d3d_cluster import cli
from d3d_cluster.cli import main
from d3d_cluster.launch.study import (Point, finished_jobs, parse_seeds, parse_sweep, plan_study, stage_owners,
                                      study_points)
from d3d_cluster.rundir import STUDY_NAME, RunDir
from d3d_cluster.spec import SpecError, load_spec


def test_seeds_are_read_as_ranges_and_lists_in_the_order_given():
    assert parse_seeds("0-4") == [0, 1, 2, 3, 4]
    assert parse_seeds("3,0-2,7") == [3, 0, 1, 2, 7]
    assert parse_seeds("1,1-2") == [1, 2]
    for bad in ("a", "3-1", "1-", ""):
        with pytest.raises(SpecError, match="--seeds"):
            parse_seeds(bad)


def test_sweep_values_are_read_as_yaml_and_commas_inside_brackets_stay_in_their_value():
    sweep = parse_sweep(["student.distill.weight=1,0.3", "probe.layers=[mixed_4f, mixed_5c],[mixed_5c]",
                         "student.distill.loss=kl,logits"])
    assert sweep == {"student.distill.weight": [1, 0.3], "probe.layers": [["mixed_4f", "mixed_5c"], ["mixed_5c"]],
                     "student.distill.loss": ["kl", "logits"]}
    for bad, message in (("student.distill.weight", "KEY=V1,V2"), ("student.distill.weight=1,", "KEY=V1,V2"),
                         ("seed=1,2", "--seeds"), ("name=a,b", "--name")):
        with pytest.raises(SpecError, match=message):
            parse_sweep([bad])
    with pytest.raises(SpecError, match="given twice"):
        parse_sweep(["teacher.epochs=1", "teacher.epochs=2"])


def test_points_are_the_cartesian_product_each_a_run_named_for_its_seed_and_setting(tmp_path):
    spec = tiny_spec(tmp_path).with_overrides(name="study")
    points = study_points(spec, [0, 1], {"student.distill.weight": [1, 0.3], "teacher.epochs": [2, 3]})
    assert [point.name for point in points][:4] == [
        "study/seed-0/student.distill.weight-1/teacher.epochs-2",
        "study/seed-0/student.distill.weight-1/teacher.epochs-3",
        "study/seed-0/student.distill.weight-0.3/teacher.epochs-2",
        "study/seed-0/student.distill.weight-0.3/teacher.epochs-3"]
    assert len(points) == 8 and points[5].seed == 1
    assert (points[5].spec.seed, points[5].spec.teacher.epochs, points[5].spec.student.distill.weight) == (1, 3, 1)
    assert points[5].spec.run_dir == tmp_path.resolve() / "runs" / "study" / "seed-1" / "student.distill.weight-1" / \
        "teacher.epochs-3"
    with pytest.raises(SpecError, match="study point study/seed-0/teacher.epochs--1: .*teacher.epochs"):
        study_points(spec, [0], {"teacher.epochs": [-1]})
    with pytest.raises(SpecError, match="share the run study/seed-0/data.shards-shards_a"):
        study_points(spec, [0], {"data.shards": ["shards/a", "shards_a"]})


def test_a_section_swept_whole_changes_several_keys_together_and_names_them_all(tmp_path):
    spec = tiny_spec(tmp_path).with_overrides(name="study")
    sweep = parse_sweep(["student.distill={target: conv_2c, weight: 100},{target: logits, weight: 1}"])
    points = study_points(spec, [0], sweep)
    assert [point.name for point in points] == ["study/seed-0/student.distill-target-conv_2c-weight-100",
                                                "study/seed-0/student.distill-target-logits-weight-1"]
    assert [(point.spec.student.distill.target, point.spec.student.distill.weight) for point in points] == [
        ("conv_2c", 100), ("logits", 1)]
    assert points[1].spec.student.distill.loss == spec.student.distill.loss


def _owners(tmp_path, sweep, seeds=(0, 1)):
    points = study_points(tiny_spec(tmp_path).with_overrides(name="s"), list(seeds), sweep)
    owners = stage_owners(points)
    return points, {(point.split("/", 1)[1], stage): owner.name.split("/", 1)[1]
                    for (point, stage), owner in owners.items()}


def test_each_stage_is_trained_by_the_first_point_with_the_same_inputs(tmp_path):
    _, owners = _owners(tmp_path, {"student.distill.weight": [1, 3]})
    for seed in (0, 1):
        first, second = f"seed-{seed}/student.distill.weight-1", f"seed-{seed}/student.distill.weight-3"
        assert owners[second, "teacher"] == owners[second, "baseline"] == first
        assert owners[second, "student"] == second
    _, owners = _owners(tmp_path, {"teacher.epochs": [1, 2]}, seeds=[0])
    # The baseline never sees the teacher; the student is distilled from it.
    assert owners["seed-0/teacher.epochs-2", "baseline"] == "seed-0/teacher.epochs-1"
    assert owners["seed-0/teacher.epochs-2", "teacher"] == owners["seed-0/teacher.epochs-2", "student"] == \
        "seed-0/teacher.epochs-2"
    _, owners = _owners(tmp_path, {"data.eval_clips": [1, 2]}, seeds=[0])  # free to change: an evaluation setting
    assert {owners["seed-0/data.eval_clips-2", stage] for stage in ("teacher", "student", "baseline")} == \
        {"seed-0/data.eval_clips-1"}


def test_the_plan_queues_each_stage_once_each_after_what_it_needs_and_skips_what_finished(tmp_path):
    points, _ = _owners(tmp_path, {"student.distill.weight": [1, 3]})
    owners = stage_owners(points)
    jobs = plan_study(points, owners)
    names = [job.job.name for job in jobs]
    assert {name: names.count(name) for name in names} == {"teacher": 2, "baseline": 2, "student": 4, "eval": 4}
    by_key = {(job.point.name.split("/", 1)[1], job.job.name): job for job in jobs}
    shared = by_key["seed-1/student.distill.weight-3", "student"]
    assert shared.after == (("s/seed-1/student.distill.weight-1", "teacher"),)
    evaluation = by_key["seed-1/student.distill.weight-3", "eval"]
    assert evaluation.job.stages == ("student",) and evaluation.job.reported == ("teacher", "baseline")
    assert evaluation.after == (("s/seed-1/student.distill.weight-3", "student"),
                                ("s/seed-1/student.distill.weight-1", "eval"))
    # Every job waits only for jobs queued before it: the plan also runs one after another.
    seen = set()
    for job in jobs:
        assert set(job.after) <= seen
        seen.add((job.point.name, job.job.name))

    done = {("s/seed-0/student.distill.weight-1", "teacher"), ("s/seed-0/student.distill.weight-1", "eval")}
    rest = plan_study(points, owners, done)
    assert not {(job.point.name, job.job.name) for job in rest} & done
    student = next(job for job in rest if job.point.name == "s/seed-0/student.distill.weight-3"
                   and job.job.name == "student")
    assert student.after == ()


def test_the_dry_run_prints_every_points_scripts_chained_across_points_and_creates_nothing(tmp_path):
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump({**TINY, "workdir": str(tmp_path / "work"), "cluster": {"executor": "slurm"}}))
    result = CliRunner().invoke(main, ["submit", "pipeline", "-c", str(spec), "--name", "dry", "--seeds", "0-1",
                                       "--sweep", "student.distill.weight=1,3", "--max-parallel", "2", "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "# study dry: 4 points, 12 jobs to queue" in result.output
    scripts = {script.split(" -----", 1)[0]: script for script in result.output.split("# ----- job ")[1:]}
    first, second, third = "dry/seed-0/student.distill.weight-1", "dry/seed-0/student.distill.weight-3", \
        "dry/seed-1/student.distill.weight-1"
    assert scripts["5 of 12: " + f"{second} student"].count(f"--dependency='afterok:<{first}/teacher>'") == 1
    assert f"--dependency='afterany:<{first}/eval>'" in scripts["7 of 12: " + f"{third} teacher"]
    assert f"#SBATCH --job-name={second}-student" in scripts["5 of 12: " + f"{second} student"]
    assert not (tmp_path / "work").exists()


def _spec_file(tmp_path, shards):
    tree = {**TINY, "workdir": str(tmp_path / "work"), "data": {**TINY["data"], "shards": str(shards)},
            "teacher": {"epochs": 1}, "student": {"epochs": 1}, "cluster": {"executor": "local", "tasks_per_node": 1}}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


def test_a_local_study_trains_shared_stages_once_and_submitting_it_again_trains_nothing(tmp_path, tiny_shards,
                                                                                       monkeypatch):
    spec = _spec_file(tmp_path, tiny_shards)
    submit = ["submit", "pipeline", "-c", str(spec), "--name", "st", "--sweep", "student.distill.weight=1,3"]
    result = CliRunner().invoke(main, submit)
    assert result.exit_code == 0, result.output
    study = tmp_path / "work" / "runs" / "st"
    record = json.loads((study / STUDY_NAME).read_text())
    first, second = (RunDir(point["run"]) for point in record["points"])
    assert record["points"][1]["stages"] == {"teacher": "st/seed-0/student.distill.weight-1",
                                             "student": "st/seed-0/student.distill.weight-3",
                                             "baseline": "st/seed-0/student.distill.weight-1"}
    assert (second.path / "teacher").resolve() == (first.path / "teacher").resolve()
    assert [e["stage"] for e in second.events() if e["event"] == "submitted"] == ["student", "eval"]
    assert [e["stage"] for e in first.events() if e["event"] == "submitted"] == ["teacher", "student", "baseline",
                                                                                 "eval"]
    for run in (first, second):
        results = json.loads((run.path / "results.json").read_text())
        assert set(results["models"]) == {"teacher", "student", "baseline", "student+teacher"}
    assert json.loads((second.path / "results.json").read_text())["models"]["teacher"] == \
        json.loads((first.path / "results.json").read_text())["models"]["teacher"]
    points = [Point(point["name"], point["seed"], point["settings"], load_spec(f"{point['run']}/spec.yaml"))
              for point in record["points"]]
    assert finished_jobs(points) == {
        (point["name"], job) for point in record["points"] for job in ("student", "eval")} | {
        (record["points"][0]["name"], stage) for stage in ("teacher", "baseline")}

    monkeypatch.setattr(cli, "console", Console(highlight=False, width=250))  # the table as a wide terminal shows it
    status = CliRunner().invoke(main, ["status", "st", "-c", str(spec)])
    assert status.exit_code == 0 and "finished (shared)" in status.output and "seed-0/student.distill.weight-3" in \
        status.output

    listed = CliRunner().invoke(main, ["runs", "-c", str(spec)]).output
    assert "st/seed-0/student.distill.weight-1" in listed and "st/seed-0/student.distill.weight-3" in listed

    events = [len(run.events()) for run in (first, second)]
    again = CliRunner().invoke(main, submit)
    assert again.exit_code == 0 and "(0 left)" in again.output, again.output
    assert [len(run.events()) for run in (first, second)] == events

    changed = CliRunner().invoke(main, [*submit, "--set", "teacher.epochs=2"])
    assert changed.exit_code != 0 and "teacher.epochs: 1 -> 2 (the teacher and student started" in changed.output
    assert not list(study.glob("seed-0/*/spec.yaml.*"))  # every point is checked before any spec is written

    other = CliRunner().invoke(main, ["submit", "pipeline", "-c", str(spec), "--name", "st", "--seeds", "1"])
    assert other.exit_code != 0 and "leaves out" in other.output
    plain = CliRunner().invoke(main, ["submit", "teacher", "-c", str(spec), "--name", "st"])
    assert plain.exit_code != 0 and "'st' is a study" in plain.output


def test_every_point_is_checked_before_anything_is_written(tmp_path, tiny_shards):
    spec = _spec_file(tmp_path, tiny_shards)
    result = CliRunner().invoke(main, ["submit", "pipeline", "-c", str(spec), "--name", "bad", "--seeds", "0-1",
                                       "--sweep", "data.batch_size=2,1"])
    assert result.exit_code != 0
    assert "study point bad/seed-0/data.batch_size-1" in result.output and "BatchNorm" in result.output
    assert not (tmp_path / "work" / "runs" / "bad").exists()
    for flags, message in ((["--seeds", "0-1"], "not of teacher"), (["--max-parallel", "2"], "--max-parallel")):
        target = "teacher" if flags[0] == "--seeds" else "pipeline"
        refused = CliRunner().invoke(main, ["submit", target, "-c", str(spec), *flags])
        assert refused.exit_code != 0 and message in refused.output
