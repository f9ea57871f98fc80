"""`d3dc submit doctor --cluster slurm`: the node checks as a real Slurm job on the test suite's own cluster."""

import socket

import pytest
import yaml
from click.testing import CliRunner
from conftest import TINY

from d3d_cluster.cli import main


@pytest.mark.integration
def test_submit_doctor_on_slurm_runs_the_checks_on_the_node_and_reports_its_partitions(tmp_path, slurm_cluster):
    spec = tmp_path / "spec.yaml"
    cluster = {"partition": slurm_cluster.partition}
    spec.write_text(yaml.safe_dump({**TINY, "workdir": str(tmp_path / "work"), "cluster": cluster}))
    result = CliRunner().invoke(main, ["submit", "doctor", "-c", str(spec), "--cluster", "slurm"])
    assert result.exit_code == 0, result.output
    job_id = result.output.split("[doctor] submitted job ", 1)[1].split()[0]
    assert job_id.isdigit() and "JobState=COMPLETED" in slurm_cluster.wait_for_job(job_id)
    lines = {line.split(None, 1)[0]: line.split(None, 1)[1] for line in result.output.splitlines() if " " in line}
    assert lines["slurm"] == (f"ok: partitions: {slurm_cluster.partition} (default): 1 node(s), no GPU(s) a node; "
                              f"a stage goes to {slurm_cluster.partition}")
    # Inside the job: the slurm executor's metrics bind every interface, and the stage would run on the CPU.
    assert lines["metrics"].startswith("ok: 0.0.0.0: a free port per rank")
    assert lines["stage"] == "ok: device cpu for the node's 2 ranks, process group gloo, precision fp32"
    assert result.output.splitlines()[-1] == f"{socket.gethostname()}: ok, nothing a stage here needs is broken"
