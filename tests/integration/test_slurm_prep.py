"""`d3dc prep` as a real Slurm job array plus a finalize job on the test suite's own cluster."""

import json
import urllib.request

import pytest
import yaml
from click.testing import CliRunner
from conftest import TINY

from d3d_cluster.cli import main
from d3d_cluster.data.schema import Manifest


def _spec_file(tmp_path, workdir, **sections):
    cluster = {"executor": "local", **sections.pop("cluster", {})}  # not auto: the test cluster would answer
    tree = {**TINY, "workdir": str(tmp_path / workdir), **sections, "cluster": cluster}
    path = tmp_path / f"{workdir}.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


@pytest.mark.integration
def test_an_array_of_two_slurm_tasks_and_a_finalize_job_write_what_a_local_prep_writes(tmp_path, slurm_cluster,
                                                                                       pushgateway):
    local = CliRunner().invoke(main, ["prep", "-c", str(_spec_file(tmp_path, "local")), "--workers", "1"])
    assert local.exit_code == 0, local.output
    cluster = {"executor": "slurm", "partition": slurm_cluster.partition, "timeout_min": 10}
    spec = _spec_file(tmp_path, "array", name="array-prep", cluster=cluster, metrics={"pushgateway": pushgateway})
    result = CliRunner().invoke(main, ["prep", "-c", str(spec), "--array", "2", "--workers", "1"])
    assert result.exit_code == 0, result.output
    assert "prep: array job" in result.output and "2 tasks x 1 workers" in result.output

    expected, got = (json.loads((tmp_path / name / "shards" / "manifest.json").read_text()) for name in ("local", "array"))
    assert got == expected  # shards are byte-reproducible: checksums included
    assert Manifest.load(tmp_path / "array" / "shards").splits["train"].samples > 0
    logs = list((tmp_path / "array" / "prep-logs").glob("*_0_0_log.out"))  # array job, task 0, rank 0
    assert logs and "[prep task 1/2]" in logs[0].read_text()
    pushed = urllib.request.urlopen(f"{pushgateway}/metrics", timeout=5).read().decode()
    written = [line for line in pushed.splitlines()
               if line.startswith("d3d_prep_videos_written_total") and 'run="array-prep"' in line]
    assert len(written) == 2 and sum(float(line.split()[-1]) for line in written) == expected_written(expected)


def expected_written(manifest: dict) -> int:
    return sum(split["samples"] for split in manifest["splits"].values())


def test_an_array_without_slurm_is_refused(tmp_path):
    result = CliRunner().invoke(main, ["prep", "-c", str(_spec_file(tmp_path, "local")), "--array", "2"])
    assert result.exit_code != 0 and "--array needs --cluster slurm" in result.output
    assert not (tmp_path / "local").exists()


@pytest.mark.integration
def test_more_array_tasks_than_shards_is_refused_before_anything_is_queued(tmp_path, slurm_cluster):
    cluster = {"executor": "slurm", "partition": slurm_cluster.partition}
    result = CliRunner().invoke(main, ["prep", "-c", str(_spec_file(tmp_path, "array", cluster=cluster)),
                                       "--array", "50"])
    assert result.exit_code != 0 and "--array 50: the dataset has" in result.output
    assert not (tmp_path / "array" / "prep-logs").exists()
