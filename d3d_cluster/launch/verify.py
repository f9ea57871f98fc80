"""`d3dc verify --cluster slurm`: the shards checked by a Slurm job array, task i taking shards i, i + K, ...

Each task writes its reports to `task-NNNNN.json` in a folder made for the submission, beside `plan.json` (the
shard directory and the number of tasks), so the reports are merged when read: at once with `--wait`, or later with
`d3dc verify SHARD_DIR --reports FOLDER`. The manifest and the Slurm request are refused on the login node, as
`d3dc prep` refuses its own, before anything is queued.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from d3d_cluster.files import write_json_atomically
from d3d_cluster.launch.executor import check_cluster, make_executor
from d3d_cluster.launch.prep import prep_clusters
from d3d_cluster.spec import Spec

LOGS = "verify-logs"
PLAN_NAME = "plan.json"


def report_path(folder: Path, task: int) -> Path:
    return Path(folder) / f"task-{task:05d}.json"


@dataclass(frozen=True)
class VerifyTask:
    """One array task; what submitit pickles is three paths' worth of text and two numbers."""

    directory: str
    reports: str
    tasks: int
    workers: int

    def __call__(self, task: int) -> str:
        from d3d_cluster.data.schema import Manifest
        from d3d_cluster.data.verify import shards_of, verify_shards

        mine = shards_of(Manifest.load(self.directory))[task::self.tasks]
        reports = verify_shards(self.directory, mine, self.workers)
        return str(write_json_atomically(report_path(Path(self.reports), task), reports))


def merged_reports(folder: str | Path) -> list[dict]:
    """Every task's reports; a task without one (still running, or failed: see its log) is an error naming it."""
    folder = Path(folder)
    tasks = json.loads((folder / PLAN_NAME).read_text())["tasks"]
    missing = [task for task in range(tasks) if not report_path(folder, task).is_file()]
    if missing:
        raise FileNotFoundError(f"{folder}: no report yet from array tasks {', '.join(map(str, missing))} of {tasks} "
                                f"(still running, or failed: see their logs in {folder.parent})")
    return [report for task in range(tasks) for report in json.loads(report_path(folder, task).read_text())]


def submit_verify(spec: Spec, directory: str | Path, tasks: int, workers: int, echo: Callable[[str], None] = print,
                  wait: bool = True) -> list[dict] | None:
    """Submit the array; with `wait`, follow it and return the merged reports (a failed task raises)."""
    from d3d_cluster.data.schema import Manifest
    from d3d_cluster.data.verify import shards_of

    directory = Path(directory).absolute()
    shards = len(shards_of(Manifest.load(directory)))  # a missing or malformed manifest is refused here
    if not 1 <= tasks <= shards:
        raise ValueError(f"--array {tasks}: {directory} has {shards} shards; ask for 1 to {shards} tasks")
    cluster = prep_clusters(spec, workers)[0]  # one task of `workers` CPUs, no GPU: what a prep task asks for
    check_cluster(cluster)
    logs = spec.path(LOGS)
    logs.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix="reports-", dir=logs))
    write_json_atomically(folder / PLAN_NAME, {"directory": str(directory), "tasks": tasks})
    array = make_executor(cluster, logs, name=f"{spec.name}-verify").map_array(
        VerifyTask(str(directory), str(folder), tasks, workers), range(tasks))
    echo(f"verify: array job {array[0].job_id.split('_')[0]} ({tasks} tasks x {workers} workers, {shards} shards); "
         f"reports in {folder}")
    if not wait:
        echo(f"verify: read them with `d3dc verify {directory} --reports {folder}`")
        return None
    for job in array:
        job.result()  # raises with the task's traceback when a task failed
    return merged_reports(folder)


def run_verify(spec: Spec, directory: str | Path, tasks: int, workers: int, echo: Callable[[str], None] = print,
               wait: bool = True) -> list[dict] | None:
    """The reports, from `workers` local processes or, where `cluster.executor` is slurm, a `tasks`-task array."""
    if spec.cluster.executor == "slurm":
        return submit_verify(spec, directory, tasks, workers, echo, wait)
    from d3d_cluster.data.schema import Manifest
    from d3d_cluster.data.verify import shards_of, verify_shards

    return verify_shards(directory, shards_of(Manifest.load(directory)), workers)
