"""The test suite's private Slurm cluster: it runs jobs, and it leaves nothing behind."""

import os
import tempfile
import time
from pathlib import Path

import pytest
from slurm_cluster import ClusterStartError, find_programs, start_cluster


@pytest.fixture
def programs(slurm_cluster):
    """Only where the session cluster could start (so it skips or fails the same way)."""
    return find_programs()[0]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return not Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1].startswith("Z")


def test_stop_ends_its_jobs_and_exactly_the_daemons_it_started(programs):
    with tempfile.TemporaryDirectory(prefix="d3dc-slurm-") as root:
        cluster = start_cluster(Path(root), programs)
        try:
            assert cluster.node_states() == ["idle"]
            daemons = {name: process.pid for name, process in cluster.processes.items()}
            assert set(daemons) == {"munged", "slurmctld", f"slurmd-{cluster.node}"}
            marker = Path(root) / "job.pid"
            cluster.run("sbatch", "--wrap", f"echo $$ > {marker}; exec sleep 300", "-o", "/dev/null")
            deadline = time.monotonic() + 120
            while not marker.exists() or not marker.read_text().strip():
                assert time.monotonic() < deadline, "the job did not start"
                time.sleep(0.2)
            job = int(marker.read_text())
            assert _alive(job)
        finally:
            cluster.stop()
        assert not _alive(job)
        assert not any(_alive(pid) for pid in daemons.values())
        assert cluster.processes == {}


def test_a_cluster_that_does_not_come_up_reports_its_daemons_logs(programs, tmp_path):
    failing = tmp_path / "munged"  # a munged that cannot start, whatever the machine's speed
    failing.write_text("#!/bin/sh\necho 'munged: Error: no key (as the test wants)'\nexit 3\n")
    failing.chmod(0o755)
    with tempfile.TemporaryDirectory(prefix="d3dc-slurm-") as root:
        with pytest.raises(ClusterStartError) as error:
            start_cluster(Path(root), {**programs, "munged": str(failing)})
    assert "waiting for munged to open its socket: exited: {'munged': 3}" in str(error.value)
    assert "----- munged.out -----\nmunged: Error: no key (as the test wants)" in str(error.value)
