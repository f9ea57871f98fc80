"""Every job spec in jobs/ loads with the project's spec loader; the public datasets' specs use the papers' inputs."""

from pathlib import Path

import pytest

from d3d_cluster.launch.submit import dry_run
from d3d_cluster.spec import load_spec

JOBS = Path(__file__).resolve().parents[1] / "jobs"
DATASETS = {"ucf101.yaml": "ucf101", "hmdb51.yaml": "hmdb51", "kinetics400.yaml": "kinetics", "kinetics600.yaml": "kinetics"}


@pytest.mark.parametrize("path", sorted(JOBS.glob("**/*.yaml")), ids=lambda path: path.name)
def test_every_job_spec_loads(path):
    load_spec(path)


@pytest.mark.parametrize("name, source", DATASETS.items())
def test_dataset_specs_use_the_d3d_and_s3dg_papers_inputs(name, source):
    spec = load_spec(JOBS / name)
    assert spec.prep.source == source and spec.cluster.executor == "slurm"
    assert (spec.data.clip_frames, spec.data.crop_size, spec.prep.min_side, spec.prep.fps) == (64, 224, 256, 25.0)
    assert (spec.prep.flow.algorithm, spec.prep.flow.bound) == ("tvl1", 20.0)
    assert spec.model.width == 1.0 and spec.model.gating


@pytest.mark.parametrize("name", DATASETS)
def test_dataset_specs_ask_slurm_for_a_gpu_per_rank_in_every_job_they_submit(name):
    spec = load_spec(JOBS / name)
    assert spec.cluster.wants_gpu and spec.cluster.gpus_per_node == spec.cluster.tasks_per_node
    scripts = dry_run(spec, "pipeline").split("# ----- job ")[1:]
    assert len(scripts) == 4
    for script in scripts:
        assert f"#SBATCH --gpus-per-node={spec.cluster.tasks_per_node}\n" in script, script
