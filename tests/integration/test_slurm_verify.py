"""`d3dc verify` as a real Slurm job array on the test suite's own cluster."""

import pytest
from click.testing import CliRunner

from d3d_cluster.cli import main
from d3d_cluster.data.schema import Manifest


@pytest.mark.integration
def test_an_array_of_two_tasks_verifies_every_shard_and_merges_their_reports(tiny_shards, tmp_path, slurm_cluster):
    shards = sum(len(split.shards) for split in Manifest.load(tiny_shards).splits.values())
    result = CliRunner().invoke(main, ["verify", str(tiny_shards), "--workdir", str(tmp_path), "--cluster", "slurm",
                                       "--set", f"cluster.partition={slurm_cluster.partition}",
                                       "--array", "2", "--workers", "1"])
    assert result.exit_code == 0, result.output
    assert "verify: array job" in result.output and f"{shards} shards ok, 0 damaged" in result.output
