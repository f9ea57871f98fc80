"""Shared fixtures: a tiny motion dataset, prepared into shards once per test session by the real dataprep."""

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
    from dataprep.sources import load_source

    workdir = tmp_path_factory.mktemp("tiny")
    spec = tiny_spec(workdir)
    prepare_dataset(spec.prep, load_source(spec.prep, workdir), spec.path(spec.data.shards), progress=False)
    return spec.path(spec.data.shards)
