"""The submitit executor a stage runs on, from the spec's cluster section."""

from __future__ import annotations

from pathlib import Path

import submitit

from d3d_cluster.spec import ClusterSpec


def make_executor(cluster: ClusterSpec, folder: Path) -> submitit.Executor:
    if cluster.executor != "local":
        raise ValueError(f"cluster.executor {cluster.executor!r}: only the local executor runs stages for now")
    if cluster.nodes != 1:
        raise ValueError(f"cluster.nodes is {cluster.nodes}: the local executor runs on one node")
    executor = submitit.LocalExecutor(folder=folder)
    executor.update_parameters(tasks_per_node=cluster.tasks_per_node, timeout_min=cluster.timeout_min)
    return executor
