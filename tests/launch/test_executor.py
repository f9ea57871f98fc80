"""The Slurm side of the executor: what is passed to sbatch, and what is refused before anything is queued."""

import pytest
import yaml
from click.testing import CliRunner
from conftest import TINY

from d3d_cluster.cli import main
from d3d_cluster.launch.executor import check_cluster, make_executor, slurm_parameters
from d3d_cluster.spec import ClusterSpec


def test_only_the_slurm_settings_given_are_passed_one_task_per_rank():
    assert slurm_parameters(ClusterSpec(executor="slurm", nodes=4, tasks_per_node=8)) == {
        "nodes": 4, "ntasks_per_node": 8, "cpus_per_task": 1, "time": 60, "signal_delay_s": 90}
    full = ClusterSpec(executor="slurm", nodes=2, tasks_per_node=4, gpus_per_node=4, cpus_per_task=8, mem="200G",
                       partition="gpu", account="vision", qos="high", constraint="h100", exclusive=True,
                       timeout_min=240, signal_delay_s=300)
    assert slurm_parameters(full) == {
        "nodes": 2, "ntasks_per_node": 4, "cpus_per_task": 8, "time": 240, "partition": "gpu", "account": "vision",
        "qos": "high", "constraint": "h100", "gpus_per_node": 4, "mem": "200G", "exclusive": True,
        "signal_delay_s": 300}


def test_slurm_executor_carries_the_spec_and_its_requeue_limit(tmp_path, slurm_cluster):
    executor = make_executor(ClusterSpec(executor="slurm", tasks_per_node=2, max_time_limit_requeues=5), tmp_path, name="run-teacher")
    assert executor.max_num_timeout == 5
    assert executor.parameters["job_name"] == "run-teacher" and executor.parameters["ntasks_per_node"] == 2
    # A requeued job keeps its id: it may be requeued, and its task logs are appended to, not truncated.
    assert executor.parameters["additional_parameters"] == {"requeue": True}
    assert executor.parameters["srun_args"] == ["--open-mode=append", "--kill-on-bad-exit=1"]
    assert "dependency" not in executor.parameters
    chained = make_executor(ClusterSpec(executor="slurm"), tmp_path, name="run-student", dependency="afterok:7")
    assert chained.parameters["dependency"] == "afterok:7"
    assert chained.parameters["additional_parameters"] == {"requeue": True, "kill-on-invalid-dep": "yes"}


def test_a_cluster_without_slurm_commands_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(ValueError, match="cluster.executor is slurm, but sbatch, srun, sinfo cannot be found on PATH"):
        check_cluster(ClusterSpec(executor="slurm"))


def _submit_teacher(tmp_path, shards, cluster: dict):
    spec = tmp_path / "spec.yaml"
    tree = {**TINY, "workdir": str(tmp_path / "work"), "data": {**TINY["data"], "shards": str(shards)},
            "cluster": {"executor": "slurm", **cluster}}
    spec.write_text(yaml.safe_dump(tree))
    return CliRunner().invoke(main, ["submit", "teacher", "-c", str(spec)])


def _queued(slurm_cluster) -> set[str]:
    """Every job Slurm lists (id and name). A finished job of an earlier test may drop off the list while a test
    runs, so a test checks that none joined it."""
    return set(slurm_cluster.run("squeue", "-h", "-t", "all", "-o", "%i %j").split("\n")) - {""}


def test_an_unknown_partition_is_refused_before_anything_is_queued(tmp_path, tiny_shards, slurm_cluster):
    queued = _queued(slurm_cluster)
    result = _submit_teacher(tmp_path, tiny_shards, {"partition": "gpu-h100"})
    assert result.exit_code != 0
    assert "cluster.partition: no partition 'gpu-h100' on this cluster (partitions: debug)" in result.output
    assert not _queued(slurm_cluster) - queued
    assert not (tmp_path / "work" / "runs").exists()


def test_a_site_sbatch_option_slurm_refuses_is_refused_before_anything_is_queued(tmp_path, tiny_shards,
                                                                                  slurm_cluster):
    queued = _queued(slurm_cluster)
    result = _submit_teacher(tmp_path, tiny_shards, {"sbatch_options": {"reservation": "no-such-reservation"}})
    assert result.exit_code != 0
    assert "cluster: Slurm refuses the request" in result.output and "--reservation=no-such-reservation" in \
        result.output
    assert not _queued(slurm_cluster) - queued
    assert not (tmp_path / "work" / "runs").exists()


def test_a_request_no_node_can_satisfy_is_refused_before_anything_is_queued(tmp_path, tiny_shards, slurm_cluster):
    queued = _queued(slurm_cluster)
    result = _submit_teacher(tmp_path, tiny_shards, {"nodes": 2, "tasks_per_node": 1})
    assert result.exit_code != 0
    assert "cluster: Slurm refuses the request --nodes=2 --ntasks-per-node=1" in result.output
    assert "Requested node configuration is not available" in result.output
    assert not _queued(slurm_cluster) - queued
    assert not (tmp_path / "work" / "runs").exists()


@pytest.mark.parametrize("visible, cluster, given", [
    (0, {}, 0),                                   # a CPU machine: no GPU to give
    (2, {}, 2),                                   # auto, and a GPU for each of the 2 ranks
    (1, {}, 0),                                   # auto, but not one each: every rank on the CPU, none mixed
    (2, {"device": "cpu"}, 0),                    # never a GPU
    (1, {"device": "cuda"}, 0),                   # too few: the ranks stop and say so (launch.devices.compute_device)
])
def test_a_local_job_is_given_one_gpu_per_rank_where_the_machine_has_them_and_the_spec_allows(visible, cluster, given,
                                                                                           tmp_path, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: visible > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: visible)
    executor = make_executor(ClusterSpec(executor="local", tasks_per_node=2, **cluster), tmp_path)
    assert executor.parameters["gpus_per_node"] == given  # submitit's local executor shows the ranks only these
