"""The headline command as a user types it on a Slurm login node, `d3dc submit student --nodes 8`, on a cluster of
eight nodes (eight slurmd on this machine, each in its own network namespace): with the run's teacher finished,
it queues one student job across the eight nodes without being told the executor, and that job trains."""

import json

import pytest
import yaml
from click.testing import CliRunner
from conftest import TINY, finish_stage, require, running_cluster

from d3d_cluster.cli import main
from d3d_cluster.rundir import SUMMARY_NAME, RunDir
from d3d_cluster.spec import Spec
from d3d_cluster.train.stages import EXPORT_NAME

NODES = 8


@pytest.fixture(scope="module")
def eight_nodes():
    from netns import unavailable

    require(unavailable())
    with running_cluster(nodes=NODES) as cluster:
        yield cluster


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """The tiny dataset with 18 training videos: one global batch of 2 clips on each of 8 ranks."""
    from d3d_cluster.launch.prep import prepare_locally

    spec = Spec.model_validate({**TINY, "workdir": str(tmp_path_factory.mktemp("eight")), "prep": {
        **TINY["prep"], "synthetic": {**TINY["prep"]["synthetic"], "videos_per_class": 9}}})
    prepare_locally(spec, progress=False)
    return spec.path(spec.data.shards)


@pytest.mark.integration
def test_submit_student_on_eight_nodes_queues_one_job_across_them_that_trains(tmp_path, shards, eight_nodes):
    # One rank a node: the eight nodes share this machine's cores.
    tree = {**TINY, "workdir": str(tmp_path / "work"), "data": {**TINY["data"], "shards": str(shards)},
            "student": {"epochs": 2}, "cluster": {"executor": "auto", "timeout_min": 10}}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(tree))
    finish_stage(RunDir.create(Spec.model_validate(tree)), "teacher", seed=0)

    result = CliRunner().invoke(main, ["submit", "student", "--nodes", str(NODES), "-c", str(path),
                                       "--set", "cluster.tasks_per_node=1",
                                       "--set", f"deepspeed.global_batch_size={2 * NODES}"])

    assert result.exit_code == 0, result.output
    assert result.output.startswith("cluster.executor auto: slurm (sinfo answered)")
    assert f"{NODES} ranks ({NODES} nodes x 1)" in result.output
    run = RunDir(tmp_path / "work" / "runs" / "quickstart")
    job_id = next(e["job_id"] for e in run.events() if e["event"] == "submitted" and e["stage"] == "student")
    shown = eight_nodes.wait_for_job(job_id, timeout=900)
    for field in ("JobState=COMPLETED", f"NumNodes={NODES}", f"NumTasks={NODES}"):
        assert field in shown, f"{shown}{run.events()[-3:]}"
    started = next(e for e in run.events() if e["event"] == "started" and e["stage"] == "student")
    assert started["world_size"] == NODES
    summary = json.loads((run.path / "student" / SUMMARY_NAME).read_text())
    assert summary["world_size"] == NODES and summary["steps"] == 2
    assert (run.path / "student" / EXPORT_NAME).is_file()
