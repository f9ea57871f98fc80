import pytest

from d3d_cluster.data.schema import Manifest
from d3d_cluster.data.verify import shards_of, verify_shards
from d3d_cluster.files import write_json_atomically
from d3d_cluster.launch.verify import PLAN_NAME, VerifyTask, merged_reports


def test_array_task_reports_merge_into_the_local_reports_and_a_missing_one_is_named(tiny_shards, tmp_path):
    write_json_atomically(tmp_path / PLAN_NAME, {"directory": str(tiny_shards), "tasks": 2})
    task = VerifyTask(str(tiny_shards), str(tmp_path), tasks=2, workers=1)
    task(1)
    with pytest.raises(FileNotFoundError, match="no report yet from array tasks 0 of 2"):
        merged_reports(tmp_path)
    task(0)
    local = verify_shards(tiny_shards, shards_of(Manifest.load(tiny_shards)))
    assert sorted(merged_reports(tmp_path), key=lambda r: r["shard"]) == sorted(local, key=lambda r: r["shard"])
