"""Shared fixtures: a tiny motion dataset, prepared into shards once per test session by the real dataprep, and
a private one-machine Slurm cluster (tests/slurm_cluster.py) for the session."""

import os
from pathlib import Path

import pytest

from d3d_cluster.spec import Spec

TINY = {
    "prep": {
        "synthetic": {"classes": 3, "videos_per_class": 6, "frames": 12, "size": 32, "val_fraction": 0.34},
        "short_side": 32,
        "flow": {"algorithm": "farneback"},
        "shard_samples": 4,
        "workers": 1,
    },
    "data": {"clip_frames": 8, "crop_size": 24, "batch_size": 2},
    "deepspeed": {"global_batch_size": 4},
}


def tiny_spec(workdir: Path, **sections) -> Spec:
    tree = {**TINY, **sections, "workdir": str(workdir)}
    return Spec.model_validate(tree)


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory) -> Path:
    from dataprep.prepare import prepare_dataset
    from dataprep.synthetic import make_motion_dataset

    workdir = tmp_path_factory.mktemp("tiny")
    spec = tiny_spec(workdir)
    labels = make_motion_dataset(spec.prep.synthetic, spec.path("raw"), seed=0)
    prepare_dataset(spec.prep, labels, spec.path(spec.data.shards), progress=False)
    return spec.path(spec.data.shards)


@pytest.fixture(scope="session")
def slurm_cluster():
    """A private one-machine Slurm cluster for the session, reached through SLURM_CONF (set for this process and
    its children). Without Slurm installed it skips, except with CI=true, where it fails: CI must run these tests."""
    import tempfile

    from slurm_cluster import find_programs, start_cluster

    programs, missing = find_programs()
    if missing:
        reason = f"a test Slurm cluster needs {', '.join(missing)} (bash scripts/setup.sh installs slurm-wlm and munge)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    # Not pytest's tmp_path: munged's socket path must stay short.
    with tempfile.TemporaryDirectory(prefix="d3dc-slurm-") as root:
        cluster = start_cluster(Path(root), programs)
        with pytest.MonkeyPatch.context() as patch:
            for name, value in cluster.env.items():
                patch.setenv(name, value)
            try:
                yield cluster
            finally:
                cluster.stop()
