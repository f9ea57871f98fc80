"""`d3dc submit` before anything is queued: flags to spec keys, --time, the dry run's scripts, the job plan."""

import json
import re
import sys
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from conftest import TINY

from d3d_cluster.cli import main
from d3d_cluster.launch.pipeline import plan_jobs
from d3d_cluster.launch.executor import parse_time
from d3d_cluster.launch.submit import dry_run, flag_overrides
from d3d_cluster.spec import SBATCH_OPTIONS_SET_HERE, Spec

GOLDEN = Path(__file__).parent / "golden"
EVERY_FLAG = ["--cluster", "slurm", "--nodes", "2", "--gpus-per-node", "4", "--cpus-per-task", "8", "--mem", "200G",
              "--partition", "gpu", "--account", "vision", "--qos", "high", "--time", "1-12:30:00",
              "--constraint", "h100", "--exclusive", "--name", "k400-d3d"]


@pytest.mark.parametrize("given, minutes", [
    ("90", 90), ("5:00", 5), ("5:01", 6), ("0:30", 1), ("2:30:00", 150), ("1-0", 1440), ("2-6", 3240),
    ("1-12:30", 2190), ("1-12:30:00", 2190), ("1-0:0:1", 1441), (" 45 ", 45)])
def test_time_takes_minutes_and_slurms_forms_rounding_seconds_up(given, minutes):
    assert parse_time(given) == minutes


@pytest.mark.parametrize("given", ["1h", "", "1:2:3:4", "-5", "1-", "1.5", "1-2:3:4:5", "a:b"])
def test_a_time_slurm_would_not_take_is_refused_with_the_forms_it_takes(given):
    with pytest.raises(ValueError, match=r"expected minutes or one of Slurm's forms MM, MM:SS, HH:MM:SS, D-HH"):
        parse_time(given)


def test_flags_become_spec_overrides_and_gpus_per_node_sets_the_ranks_per_node():
    overrides = flag_overrides(nodes=2, gpus_per_node=4, cpus_per_task=None, mem="200G", partition="gpu",
                               account=None, qos="high", time="2:00:00", constraint="h100", exclusive=True,
                               cluster="slurm", name="k400")
    assert overrides == {"cluster.nodes": 2, "cluster.gpus_per_node": 4, "cluster.tasks_per_node": 4,
                         "cluster.mem": "200G", "cluster.partition": "gpu", "cluster.qos": "high",
                         "cluster.timeout_min": 120, "cluster.constraint": "h100", "cluster.exclusive": True,
                         "cluster.executor": "slurm", "name": "k400"}
    spec = Spec(deepspeed={"global_batch_size": 128}).with_overrides(**overrides)
    assert (spec.world_size, spec.name, spec.cluster.timeout_min) == (8, "k400", 120)


def _spec_file(tmp_path, **sections) -> Path:
    path = tmp_path / "spec.yaml"
    cluster = {"executor": "local", **sections.pop("cluster", {})}  # not auto: a test's Slurm cluster would answer
    path.write_text(yaml.safe_dump({**TINY, "workdir": str(tmp_path / "work"), **sections, "cluster": cluster}))
    return path


def test_flags_are_checked_by_the_spec_with_its_usual_messages(tmp_path):
    spec = _spec_file(tmp_path)
    for flags, message in [
        (["--gpus-per-node", "3"], "deepspeed.global_batch_size (4) must be a multiple of data.batch_size x world "
                                   "size (2 x 3 = 6)"),
        (["--nodes", "2"], "cluster.nodes is 2: the local executor runs on one node"),
        (["--cluster", "slurm", "--time", "1"], "cluster.signal_delay_s (90) must be shorter than "
                                                "cluster.timeout_min (1 min)"),
        (["--mem", "lots"], "cluster.mem: String should match pattern"),
        (["--name", "../elsewhere"], "name: String should match pattern"),
        (["--time", "2 hours"], "--time '2 hours': expected minutes"),
        # Injection attempts, which the dry run's script showed as lines of their own before they were refused:
        (["--cluster", "slurm", "--partition", "gpu\nrm -rf ~"], "cluster.partition: 'gpu\\nrm -rf ~' holds a "
                                                                     "control character"),
        (["--cluster", "slurm", "--account", "$(id)"], "cluster.account: String should match pattern"),
        (["--cluster", "slurm", "--constraint", "a100;id"], "cluster.constraint: String should match pattern"),
    ]:
        result = CliRunner().invoke(main, ["submit", "teacher", "-c", str(spec), "--dry-run", *flags])
        assert result.exit_code != 0 and message in result.output, (flags, result.output)
    assert not (tmp_path / "work").exists()


def test_the_dry_run_prints_the_pipelines_four_scripts_with_every_flag_and_creates_nothing(tmp_path):
    workdir = tmp_path / "work"
    result = CliRunner().invoke(main, ["submit", "pipeline", "-c", str(_spec_file(tmp_path, deepspeed={
        "global_batch_size": 16})), "--dry-run", *EVERY_FLAG])
    assert result.exit_code == 0, result.output
    scripts = result.output.split("# ----- job ")[1:]
    assert [script.split("\n", 1)[0] for script in scripts] == [
        "1 of 4: teacher -----", "2 of 4: baseline -----", "3 of 4: student -----", "4 of 4: eval -----"]
    for name, script in zip(("teacher", "baseline", "student", "eval"), scripts):
        for line in ("#SBATCH --nodes=2", "#SBATCH --gpus-per-node=4", "#SBATCH --ntasks-per-node=4",
                     "#SBATCH --cpus-per-task=8", "#SBATCH --mem=200G", "#SBATCH --partition=gpu",
                     "#SBATCH --account=vision", "#SBATCH --qos=high", "#SBATCH --time=2190",
                     "#SBATCH --constraint=h100", "#SBATCH --exclusive", "#SBATCH --requeue",
                     "#SBATCH --signal=USR2@90", "#SBATCH --open-mode=append", f"#SBATCH --job-name=k400-d3d-{name}",
                     f"#SBATCH --output={workdir}/runs/k400-d3d/{name}/submitit/%j_0_log.out"):
            assert line + "\n" in script, (name, line)
        srun = next(line for line in script.splitlines() if line.startswith("srun "))
        assert "--open-mode=append" in srun.split()
    dependencies = [[line for line in script.splitlines() if "--dependency" in line] for script in scripts]
    assert dependencies == [[], [], ["#SBATCH --dependency='afterok:<teacher>'"],
                            ["#SBATCH --dependency='afterok:<student>:<baseline>'"]]
    assert "#SBATCH --kill-on-invalid-dep=yes" in scripts[2] and "kill-on-invalid-dep" not in scripts[0]
    assert not workdir.exists()


def test_the_student_script_is_submitits_sbatch_text_as_the_golden_file_has_it():
    """A pure function of the spec: a change in what is submitted shows here first."""
    spec = Spec(workdir="/cluster/work", name="k400-d3d", deepspeed={"global_batch_size": 128},
                cluster={"executor": "slurm", "nodes": 2, "tasks_per_node": 4, "gpus_per_node": 4, "cpus_per_task": 8,
                         "mem": "200G", "partition": "gpu", "timeout_min": 240, "signal_delay_s": 300})
    rendered = dry_run(spec, "pipeline").replace(sys.executable, "PYTHON")
    student = rendered.split("# ----- job 3 of 4: student -----\n")[1].split("# ----- job")[0]
    assert student == (GOLDEN / "student.sbatch").read_text()


def test_site_sbatch_options_and_setup_lines_reach_every_batch_script_after_the_exit_hook(tmp_path):
    cluster = {"executor": "slurm", "sbatch_options": {"mail-type": "END", "reservation": "maint", "hold": True},
               "setup": ["module load cuda/12.4", "export NCCL_SOCKET_IFNAME=ib0"]}
    result = CliRunner().invoke(main, ["submit", "pipeline", "-c", str(_spec_file(tmp_path, cluster=cluster)),
                                       "--dry-run"])
    assert result.exit_code == 0, result.output
    scripts = result.output.split("# ----- job ")[1:]
    assert len(scripts) == 4
    for script in scripts:
        assert all(f"#SBATCH {line}\n" in script for line in ("--mail-type=END", "--reservation=maint", "--hold"))
        setup = script.split("# setup\n")[1].split("\n\n")[0].splitlines()
        assert setup[0].startswith("trap ") and setup[1:] == cluster["setup"]  # the exit hook is armed first


def test_the_prep_dry_run_prints_the_array_and_its_finalize_job(tmp_path):
    result = CliRunner().invoke(main, ["submit", "prep", "-c", str(_spec_file(tmp_path)), "--dry-run", "--cluster",
                                       "slurm", "--array", "3", "--workers", "4", "--partition", "cpu"])
    assert result.exit_code == 0, result.output
    array, final = result.output.split("# ----- job ")[1:]
    assert "#SBATCH --array=0-2%3\n" in array and "#SBATCH --cpus-per-task=4\n" in array
    assert "#SBATCH --dependency='afterok:<prep array>'\n" in final and "#SBATCH --cpus-per-task=1\n" in final
    assert all("#SBATCH --partition=cpu\n" in script and "#SBATCH --requeue\n" in script for script in (array, final))
    assert not (tmp_path / "work").exists()


def test_with_the_local_executor_the_dry_run_says_what_would_run_in_the_foreground(tmp_path):
    result = CliRunner().invoke(main, ["submit", "pipeline", "-c", str(_spec_file(tmp_path)), "--dry-run"])
    assert result.exit_code == 0 and "#SBATCH" not in result.output
    assert "local executor: no sbatch; `d3dc submit` runs teacher, baseline, student, eval in the foreground" \
        in result.output


def test_the_pipeline_trains_teacher_and_baseline_then_the_student_then_evaluates_all_three(tmp_path):
    jobs = plan_jobs(Spec(workdir=str(tmp_path)), "pipeline")
    assert [(job.name, job.after) for job in jobs] == [
        ("teacher", ()), ("baseline", ()), ("student", ("teacher",)), ("eval", ("student", "baseline"))]
    assert jobs[-1].stages == ("teacher", "student", "baseline")


def test_evaluation_alone_evaluates_the_trained_stages_and_needs_one(tmp_path):
    spec = Spec(workdir=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="no trained stage to evaluate"):
        plan_jobs(spec, "eval")
    for stage in ("teacher", "baseline"):
        (spec.run_dir / stage).mkdir(parents=True)
        (spec.run_dir / stage / "model.pt").write_bytes(b"")
    assert plan_jobs(spec, "eval")[0].stages == ("teacher", "baseline")


def test_prep_options_are_refused_for_training_jobs(tmp_path):
    result = CliRunner().invoke(main, ["submit", "teacher", "-c", str(_spec_file(tmp_path)), "--array", "4"])
    assert result.exit_code != 0 and "--array and --workers are for `d3dc submit prep`" in result.output


def test_one_clip_a_rank_is_refused_before_queueing_where_batchnorm_would_see_one_value(tmp_path, tiny_shards):
    spec = _spec_file(tmp_path, data={**TINY["data"], "shards": str(tiny_shards)})
    refused = CliRunner().invoke(main, ["submit", "teacher", "-c", str(spec), "--set", "data.batch_size=1",
                                        "--set", "deepspeed.global_batch_size=2"])
    assert refused.exit_code != 0 and not (tmp_path / "work" / "runs").exists()
    assert ("data.batch_size 1: mixed_5c has 1 position a clip at 8x24x24, so BatchNorm would see one value per "
            "channel on each rank") in refused.output
    # At the papers' 64x224x224, mixed_5c has 8x7x7 positions a clip: one clip a rank is fine.
    from d3d_cluster.launch.pipeline import check_batchnorm_batch

    check_batchnorm_batch(Spec().with_overrides(**{"data.batch_size": 1, "deepspeed.global_batch_size": 2,
                                                   "data.clip_frames": 64, "data.crop_size": 224,
                                                   "prep.short_side": 256, "prep.synthetic.frames": 65}))


def test_a_stage_too_short_for_one_full_step_is_refused_before_queueing(tmp_path, tiny_shards):
    spec = _spec_file(tmp_path, data={**TINY["data"], "shards": str(tiny_shards)})
    refused = CliRunner().invoke(main, ["submit", "teacher", "-c", str(spec), "--set", "data.batch_size=8",
                                        "--set", "deepspeed.global_batch_size=16", "--set", "teacher.epochs=1"])
    assert refused.exit_code != 0 and not (tmp_path / "work" / "runs").exists()
    assert ("teacher: the training split has 12 videos: 1 epoch(s) of them make fewer clips than one step of 2 "
            "ranks x data.batch_size 8") in refused.output


def test_nvdec_asked_for_frames_it_cannot_decode_is_refused_before_queueing(tmp_path, tiny_shards):
    spec = _spec_file(tmp_path, data={**TINY["data"], "shards": str(tiny_shards)})
    refused = CliRunner().invoke(main, ["submit", "teacher", "-c", str(spec), "--set", "data.decoder=gpu"])
    assert refused.exit_code != 0 and not (tmp_path / "work" / "runs").exists()
    assert (f"{tiny_shards}: data.decoder gpu: NVDEC decodes no VP9 frame smaller than 128x128, and the stored frames "
            "are 32x32; use data.decoder auto or cpu") in " ".join(refused.output.split())


@pytest.mark.integration
def test_with_the_local_executor_submit_runs_the_jobs_in_the_foreground(tmp_path, tiny_shards):
    spec = _spec_file(tmp_path, data={**TINY["data"], "shards": str(tiny_shards)}, teacher={"epochs": 1})
    result = CliRunner().invoke(main, ["submit", "teacher", "-c", str(spec), "--name", "here"])
    assert result.exit_code == 0, result.output
    assert "[teacher] submitted job" in result.output and "[teacher] done:" in result.output
    result = CliRunner().invoke(main, ["submit", "eval", "-c", str(spec), "--name", "here"])
    assert result.exit_code == 0, result.output
    assert "here: video-level accuracy on 6 validation videos" in result.output

    run = tmp_path / "work" / "runs" / "here"
    events = [(e["event"], e["stage"], e.get("executor")) for e in map(json.loads, (run / "events.jsonl").open())]
    assert events == [("submitted", "teacher", "local"), ("started", "teacher", None),
                      ("checkpointed", "teacher", None), ("finished", "teacher", None),
                      ("submitted", "eval", "local"), ("started", "eval", None), ("finished", "eval", None)]
    assert json.loads((run / "results.json").read_text())["models"].keys() == {"teacher"}
    result = CliRunner().invoke(main, ["cancel", str(run)])
    assert result.exit_code == 0 and "here: no live job to cancel" in result.output


def test_every_sbatch_option_our_scripts_carry_is_one_cluster_sbatch_options_refuses(tmp_path):
    """SBATCH_OPTIONS_SET_HERE says which options the executor sets itself; a new one the scripts carry must join it,
    or a site's sbatch_options could set it a second time."""
    spec = _spec_file(tmp_path, deepspeed={"global_batch_size": 16})
    result = CliRunner().invoke(main, ["submit", "pipeline", "-c", str(spec), "--dry-run", *EVERY_FLAG])
    prep = CliRunner().invoke(main, ["submit", "prep", "-c", str(_spec_file(tmp_path)), "--dry-run", "--cluster",
                                     "slurm", "--array", "2", "--partition", "cpu"])
    assert result.exit_code == 0 and prep.exit_code == 0, result.output + prep.output
    carried = set(re.findall(r"^#SBATCH --([a-z-]+)", result.output + prep.output, flags=re.MULTILINE))
    assert {"nodes", "gpus-per-node", "dependency", "array", "signal"} <= carried
    assert carried - set(SBATCH_OPTIONS_SET_HERE) == set()
