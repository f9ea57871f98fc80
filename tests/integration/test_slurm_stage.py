"""A real stage job through real sbatch on the test suite's own Slurm cluster: 2 tasks, one world of 2."""

import json

import pytest
import torch
from conftest import TINY, tiny_spec

from d3d_cluster.launch.pipeline import run_stage
from d3d_cluster.rundir import RunDir
from d3d_cluster.train.stages import EXPORT_NAME


@pytest.mark.integration
def test_teacher_stage_runs_as_two_slurm_tasks_and_exports_its_model(tmp_path, tiny_shards, slurm_cluster):
    spec = tiny_spec(tmp_path, data={**TINY["data"], "shards": str(tiny_shards)}, teacher={"epochs": 1},
                     cluster={"executor": "slurm", "partition": slurm_cluster.partition, "timeout_min": 10})
    run = RunDir.create(spec)
    lines = []
    summary = run_stage(run, "teacher", echo=lines.append, poll_seconds=0.5)

    submitted, started, finished = [e for e in run.events() if e["stage"] == "teacher" and e["event"] != "checkpointed"]
    assert (submitted["event"], started["event"], finished["event"]) == ("submitted", "started", "finished")
    job_id = submitted["job_id"]
    assert job_id.isdigit() and started["job_id"] == finished["job_id"] == job_id
    assert started["world_size"] == 2 and summary["steps"] > 0
    # Rank 0's address and the port submitit derives from the job id: Slurm's node list, not localhost defaults.
    host, port = started["master"].rsplit(":", 1)
    assert host == slurm_cluster.node and 20000 <= int(port) <= 60000

    # The result is back once rank 0 has pickled it; Slurm completes the job a moment later.
    job = slurm_cluster.wait_for_job(job_id)
    for field in ("JobState=COMPLETED", "NumTasks=2", f"Partition={slurm_cluster.partition}", "Name=quickstart-teacher"):
        assert field in job
    assert any(line.startswith("[teacher] rank 0/2 metrics at") for line in lines)
    assert any(line.startswith("[teacher] done:") for line in lines)

    stage = run.path / "teacher"
    result = json.loads((stage / "summary.json").read_text())
    assert result["world_size"] == 2 and result["steps"] > 0
    weights = torch.load(stage / EXPORT_NAME)
    assert weights and all(torch.isfinite(v).all() for v in weights.values() if v.is_floating_point())
    script = next((stage / "submitit").glob(f"{job_id}_submission.sh")).read_text()
    assert "#SBATCH --signal=USR2@90" in script and "#SBATCH --ntasks-per-node=2" in script
