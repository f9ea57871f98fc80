import pytest
import yaml
from click.testing import CliRunner

from d3d_cluster.cli import main


def test_help_lists_every_command_with_its_help():
    result = CliRunner().invoke(main, ["--help"])
    assert result.exit_code == 0
    for command in ("quickstart", "prep", "submit", "status", "runs", "logs", "cancel", "results", "export",
                    "check-spec", "monitor", "model-info", "ensemble", "compare", "probe", "doctor"):
        assert command in result.output
    assert "Make a small motion dataset" in result.output


def test_check_spec_refuses_a_bad_spec_naming_file_and_key(tmp_path):
    spec = tmp_path / "bad.yaml"
    spec.write_text(yaml.safe_dump({"student": {"distill": {"wieght": 1}}}))
    result = CliRunner().invoke(main, ["check-spec", str(spec)])
    assert result.exit_code != 0
    assert f"{spec}: unknown key student.distill.wieght (expected one of: weight, target, loss, temperature, precompute)" in result.output


def test_check_spec_prints_the_resolved_spec(tmp_path):
    spec = tmp_path / "ok.yaml"
    spec.write_text(yaml.safe_dump({"name": "mine", "cluster": {"tasks_per_node": 1}}))
    result = CliRunner().invoke(main, ["check-spec", str(spec)])
    assert result.exit_code == 0
    resolved = yaml.safe_load(result.stdout)
    assert resolved["name"] == "mine" and resolved["data"]["crop_size"] == 56


def test_training_without_shards_is_refused_and_writes_nothing(tmp_path):
    workdir = tmp_path / "work"
    result = CliRunner().invoke(main, ["submit", "teacher", "--workdir", str(workdir)])
    assert result.exit_code != 0
    assert "manifest.json: no shard manifest (run `d3dc prep` first)" in result.output
    assert not workdir.exists()


def test_student_without_a_finished_teacher_is_refused_before_submission(tmp_path, tiny_shards):
    spec = tmp_path / "spec.yaml"
    tree = {"workdir": str(tmp_path / "work"), "data": {"shards": str(tiny_shards), "clip_frames": 8, "crop_size": 24}}
    spec.write_text(yaml.safe_dump(tree))
    result = CliRunner().invoke(main, ["submit", "student", "-c", str(spec)])
    assert result.exit_code != 0
    assert "teacher/model.pt: the student needs a finished teacher in this run; train the teacher first" in result.output
    assert not (tmp_path / "work" / "runs").exists()


def test_clips_larger_than_the_stored_videos_are_refused_before_submission(tmp_path, tiny_shards):
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump({"workdir": str(tmp_path / "work"), "data": {"shards": str(tiny_shards)}}))
    result = CliRunner().invoke(main, ["submit", "teacher", "-c", str(spec)])
    assert result.exit_code != 0
    assert "data.clip_frames = 16 at data.frame_stride = 1 needs 17 (flow lies between frames)" in result.output


def test_mirror_pairs_naming_a_class_the_shards_lack_are_refused_before_submission(tmp_path, tiny_shards):
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump({"workdir": str(tmp_path / "work"), "data": {
        "shards": str(tiny_shards), "clip_frames": 8, "crop_size": 24, "mirror_pairs": [["left", "right"]]}}))
    result = CliRunner().invoke(main, ["submit", "teacher", "-c", str(spec)])
    assert result.exit_code != 0
    assert "data.mirror_pairs: 'left' is not a class of" in result.output
    assert not (tmp_path / "work" / "runs").exists()


def test_model_info_prints_parameters_and_multiply_adds_per_layer():
    result = CliRunner().invoke(main, ["model-info", "--frames", "16", "--size", "224", "--no-gating"])
    assert result.exit_code == 0, result.output
    assert "8,320,048" in result.output and "17.979 G" in result.output
    for layer in ("conv_1a", "mixed_5c", "head", "total"):
        assert layer in result.output


def test_model_info_takes_defaults_from_a_spec_and_options_override_them(tmp_path):
    import json

    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump({"workdir": str(tmp_path), "model": {"width": 0.5}, "data": {"clip_frames": 8}}))
    result = CliRunner().invoke(main, ["model-info", "-c", str(spec), "--stage", "teacher", "--size", "32", "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    assert (info["frames"], info["size"], info["width"], info["classes"]) == (8, 32, 0.5, 6)
    assert info["input_shape"] == [2, 8, 32, 32] and info["multiply_adds"] > 0


def test_a_missing_init_file_is_refused_before_submission(tmp_path, tiny_shards):
    spec = tmp_path / "spec.yaml"
    tree = {"workdir": str(tmp_path / "work"), "data": {"shards": str(tiny_shards), "clip_frames": 8, "crop_size": 24},
            "student": {"init": {"path": "k400-student.pt"}}}
    spec.write_text(yaml.safe_dump(tree))
    result = CliRunner().invoke(main, ["submit", "teacher", "-c", str(spec)])
    assert result.exit_code != 0
    assert f"student.init.path: {tmp_path / 'work' / 'k400-student.pt'} does not exist" in result.output
    assert not (tmp_path / "work" / "runs").exists()


def test_an_init_file_that_does_not_fit_is_refused_before_submission(tmp_path, tiny_shards):
    import torch

    from d3d_cluster.models import S3DG

    work = tmp_path / "work"
    work.mkdir()
    torch.save(S3DG(400, in_channels=2, width=0.25).state_dict(), work / "k400-teacher.pt")
    spec = tmp_path / "spec.yaml"
    tree = {"workdir": str(work), "data": {"shards": str(tiny_shards), "clip_frames": 8, "crop_size": 24},
            "teacher": {"init": {"path": "k400-teacher.pt"}}}
    spec.write_text(yaml.safe_dump(tree))
    result = CliRunner().invoke(main, ["submit", "teacher", "-c", str(spec)])
    assert result.exit_code != 0
    assert f"{work / 'k400-teacher.pt'}: does not fit this S3D-G" in result.output
    assert "classifier.weight (400, 256, 1, 1, 1) vs (3, 256, 1, 1, 1)" in result.output


def test_results_prints_the_table_and_writes_the_training_curves_of_a_run_given_by_directory_or_name(evaluated_run):
    import json

    from PIL import Image

    run, _ = evaluated_run
    results = json.loads((run.path / "results.json").read_text())
    result = CliRunner().invoke(main, ["results", str(run.path)])
    assert result.exit_code == 0, result.output
    for text in ("top-1", "top-3", "teacher", "student+teacher", "rgb+flow", "10.0", "11.0",
                 f"{results['models']['student']['top1']:.1%}", f"training curves: {run.path / 'curves.png'}"):
        assert text in result.output
    assert "confusion" not in result.output
    with Image.open(run.path / "curves.png") as image:
        assert image.format == "PNG" and image.size == (1500, 400)  # one row of three panels

    by_name = CliRunner().invoke(main, ["results", "evaluated", "--workdir", str(run.path.parents[1])])
    assert by_name.exit_code == 0 and by_name.output == result.output


def test_results_per_class_prints_each_class_and_each_confusion_matrix(evaluated_run):
    import json

    run, _ = evaluated_run
    results = json.loads((run.path / "results.json").read_text())
    result = CliRunner().invoke(main, ["results", str(run.path), "--per-class"])
    assert result.exit_code == 0, result.output
    for name in results["classes"]:
        assert name in result.output
    for model in results["models"]:
        assert f"{model}: confusion matrix in videos (rows: true class, columns: predicted class)" in result.output
    teacher = results["models"]["teacher"]
    first_row = " ".join(str(count) if count else "." for count in teacher["confusion"][0])
    assert first_row in " ".join(result.output.replace("│", " ").split())


def test_results_of_a_run_that_was_not_evaluated_name_the_missing_file(tmp_path):
    from conftest import tiny_spec

    from d3d_cluster.rundir import RunDir

    run = RunDir.create(tiny_spec(tmp_path))
    result = CliRunner().invoke(main, ["results", str(run.path)])
    assert result.exit_code != 0
    assert f"{run.path / 'results.json'}: no results; the run's evaluation has not finished" in result.output


def test_set_overrides_any_spec_key_as_yaml_before_validation(tmp_path):
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump({"deepspeed": {"global_batch_size": 24}}))  # invalid alone: 24 % (16 x 2)
    result = CliRunner().invoke(main, ["check-spec", str(spec), "--set", "deepspeed.global_batch_size=64",
                                       "--set", "student.distill.weight=0.5", "--set", "data.crop_area=[0.3, 1.0]",
                                       "--set", "model.gating=false"])
    assert result.exit_code == 0, result.output
    resolved = yaml.safe_load(result.stdout)
    assert resolved["deepspeed"]["global_batch_size"] == 64 and resolved["student"]["distill"]["weight"] == 0.5
    assert resolved["data"]["crop_area"] == [0.3, 1.0] and resolved["model"]["gating"] is False


@pytest.mark.parametrize("command", [["check-spec", "jobs/quickstart.yaml"], ["submit", "teacher", "--dry-run"],
                                     ["prep"], ["quickstart"]])
@pytest.mark.parametrize("assignment, message", [
    ("student.distill.wieght=1", "unknown key student.distill.wieght (expected one of: weight, "),
    ("data.batch_size=big", "data.batch_size: Input should be a valid integer"),
    ("data.batch_size.x=1", ("data.batch_size.x: data.batch_size is a value (16), not a section",  # in the file
                             "data.batch_size: Input should be a valid integer")),  # a default: no value to name
    ("batch_size", "expected KEY=VALUE with a dotted spec key"),
])
def test_a_bad_set_names_the_key_and_what_was_expected_before_anything_runs(tmp_path, command, assignment, message):
    result = CliRunner().invoke(main, [*command, "--set", assignment]
                                + ([] if command[0] == "check-spec" else ["--workdir", str(tmp_path / "work")]))
    assert result.exit_code != 0
    shown = " ".join(result.output.split())
    assert any(expected in shown for expected in ((message,) if isinstance(message, str) else message)), shown
    assert not (tmp_path / "work").exists()


def test_the_headline_command_says_how_to_fit_the_batch_and_then_shows_the_plan(tmp_path):
    flags = ["submit", "student", "--nodes", "8", "--workdir", str(tmp_path), "--dry-run"]
    local = CliRunner().invoke(main, [*flags, "--cluster", "local"])
    assert local.exit_code != 0 and "queue it on Slurm with --cluster slurm" in local.output
    refused = CliRunner().invoke(main, [*flags, "--cluster", "slurm"])
    advice = " ".join(refused.output.split())
    assert refused.exit_code != 0
    assert "--set deepspeed.global_batch_size=256 (learning rates x 8, the linear scaling rule)" in advice
    assert "--set data.batch_size=2 (BatchNorm then sees 2 clips a rank)" in advice
    planned = CliRunner().invoke(main, [*flags, "--cluster", "slurm", "--set", "deepspeed.global_batch_size=256"])
    assert planned.exit_code == 0, planned.output
    assert planned.output.startswith("# 16 ranks (8 nodes x 2): global batch 256 = 16 clips a rank x 16 ranks x 1 "
                                     "accumulation steps; learning rates teacher 0.003, student 0.001")
    assert "#SBATCH --nodes=8" in planned.output


def test_a_student_submitted_after_a_teacher_of_another_network_is_refused_before_anything_is_queued(tmp_path,
                                                                                                     tiny_shards):
    from conftest import finish_stage, tiny_spec

    from d3d_cluster.rundir import RunDir

    spec = tiny_spec(tmp_path, data={**tiny_spec(tmp_path).data.model_dump(), "shards": str(tiny_shards)})
    run = RunDir.create(spec)
    finish_stage(run, "teacher", seed=0)
    (tmp_path / "spec.yaml").write_text(spec.to_yaml())
    result = CliRunner().invoke(main, ["submit", "student", "-c", str(tmp_path / "spec.yaml"), "--set",
                                       "model.width=0.5", "--force"])
    assert result.exit_code != 0
    assert "teacher/model.pt: does not fit" in result.output and "shape mismatches" in result.output
    assert not (run.path / "student").exists()
