"""Shared fixtures: a tiny motion dataset, prepared into shards once per test session by the real dataprep, and
a private one-machine Slurm cluster (tests/slurm_cluster.py) for the session."""

import os
import tempfile
from contextlib import contextmanager
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


def require(missing: str | None) -> None:
    """Skip a test whose external service cannot run here, with the reason; with CI=true fail instead: CI must
    run every test."""
    if missing is None:
        return
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(missing)
    pytest.skip(missing)


def _slurm_programs() -> dict[str, str]:
    from slurm_cluster import find_programs

    programs, missing = find_programs()
    require(f"a test Slurm cluster needs {', '.join(missing)} (bash scripts/setup.sh installs slurm-wlm and munge)"
            if missing else None)
    return programs


@contextmanager
def running_cluster(nodes: int = 1):
    """A private Slurm cluster, reached through SLURM_CONF (set for this process and its children meanwhile)."""
    from slurm_cluster import start_cluster

    programs = _slurm_programs()
    # Not pytest's tmp_path: munged's socket path must stay short.
    with tempfile.TemporaryDirectory(prefix="d3dc-slurm-") as root:
        cluster = start_cluster(Path(root), programs, nodes=nodes)
        try:
            with pytest.MonkeyPatch.context() as patch:
                for name, value in cluster.env.items():
                    patch.setenv(name, value)
                yield cluster
        finally:
            cluster.stop()


@pytest.fixture(scope="session")
def slurm_cluster():
    """One node (this host) for the session."""
    with running_cluster() as cluster:
        yield cluster


@pytest.fixture(scope="module")
def two_node_slurm_cluster():
    """Two nodes, each slurmd in its own network namespace with its own address (tests/netns.py)."""
    from netns import unavailable

    require(unavailable())
    with running_cluster(nodes=2) as cluster:
        yield cluster
