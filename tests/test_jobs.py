"""Every job spec in jobs/ loads with the project's spec loader; the public datasets' specs use the papers' inputs."""

from pathlib import Path

import pytest

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
