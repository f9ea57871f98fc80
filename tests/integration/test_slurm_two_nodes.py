"""A stage job across two Slurm nodes: two slurmd on this machine, each in its own network namespace with its own
address, one rank on each, DeepSpeed (gloo) talking across the private bridge."""

import pytest
from conftest import TINY, tiny_spec

from d3d_cluster.launch.pipeline import run_stage
from d3d_cluster.rundir import RunDir
from d3d_cluster.train.stages import EXPORT_NAME


@pytest.mark.integration
def test_teacher_stage_trains_across_two_nodes(tmp_path, tiny_shards, two_node_slurm_cluster):
    cluster = two_node_slurm_cluster
    first, second = cluster.nodes
    assert first.address != second.address
    spec = tiny_spec(tmp_path, data={**TINY["data"], "shards": str(tiny_shards)}, teacher={"epochs": 1},
                     cluster={"executor": "slurm", "nodes": 2, "tasks_per_node": 1, "timeout_min": 10})
    run = RunDir.create(spec)
    summary = run_stage(run, "teacher", echo=lambda line: None, poll_seconds=0.5)
    assert summary["world_size"] == 2

    started = next(e for e in run.events() if e["event"] == "started")
    assert started["world_size"] == 2 and started["master"].startswith(f"{first.name}:")
    job = cluster.wait_for_job(started["job_id"])
    for field in ("JobState=COMPLETED", "NumNodes=2", "NumTasks=2", f"NodeList={first.name[:-1]}[1-2]"):
        assert field in job
    assert (run.path / "teacher" / EXPORT_NAME).is_file()
