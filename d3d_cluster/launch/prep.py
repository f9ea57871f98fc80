"""`d3dc prep`: shards written by local worker processes, or by a Slurm job array and a finalize job.

On a cluster, `--array K` submits K tasks through submitit (task i writes shards i, i + K, ...; each
task's listings are read again on its node from the small pickled spec) and one finalize job that
depends on the whole array (`afterok`) and writes the manifest. Anything that can be refused - the
spec, the source's listings, the Slurm request - is refused on the login node before anything is queued.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from d3d_cluster.launch.executor import check_cluster, make_executor
from d3d_cluster.spec import ClusterSpec, Spec

LOGS = "prep-logs"


@dataclass(frozen=True)
class PrepTask:
    """One array task; what submitit pickles is the spec and two numbers."""

    spec: Spec
    tasks: int
    workers: int

    def __call__(self, task: int) -> list[str]:
        import submitit

        from d3d_cluster.metrics import PrepProgress
        from dataprep.prepare import plan_shards, run_array_task
        from dataprep.sources import load_source

        spec = self.spec
        dataset = load_source(spec.prep, spec.workdir)
        out_dir = spec.path(spec.data.shards)
        progress = None
        if spec.metrics.pushgateway:
            planned = plan_shards(spec.prep, dataset, out_dir, spec.data.clip_span)[task::self.tasks]
            progress = PrepProgress(spec.metrics.pushgateway, spec.name, task, sum(len(job.samples) for job in planned),
                                    job_id=submitit.JobEnvironment().job_id)

        def on_shard(name: str, sidecar: dict) -> None:
            if progress:
                progress.record(written=sidecar["samples"], rejected=len(sidecar["rejects"]))
        written = run_array_task(spec.prep, dataset, out_dir, task, self.tasks, workers=self.workers,
                                 min_frames=spec.data.clip_span, on_shard=on_shard)
        if progress:
            progress.finish()
        return written


@dataclass(frozen=True)
class FinalizeTask:
    spec: Spec

    def __call__(self) -> str:
        from dataprep.prepare import finalize
        from dataprep.sources import load_source

        spec = self.spec
        finalize(spec.prep, load_source(spec.prep, spec.workdir), spec.path(spec.data.shards),
                 min_frames=spec.data.clip_span)
        return str(spec.path(spec.data.shards))


def prepare_locally(spec: Spec, workers: int | None = None, progress: bool = True) -> None:
    from dataprep.prepare import prepare_dataset
    from dataprep.sources import load_source

    dataset = load_source(spec.prep, spec.workdir)
    prepare_dataset(spec.prep, dataset, spec.path(spec.data.shards), workers=workers, progress=progress,
                    min_frames=spec.data.clip_span)


def prep_clusters(spec: Spec, workers: int) -> tuple[ClusterSpec, ClusterSpec]:
    """What an array task asks for (one task of `workers` CPUs, no GPU) and what the finalize job asks for (one CPU)."""
    array = spec.cluster.model_copy(update={"nodes": 1, "tasks_per_node": 1, "cpus_per_task": workers,
                                            "gpus_per_node": None})
    return array, array.model_copy(update={"cpus_per_task": 1})


def submit_prep(spec: Spec, tasks: int, workers: int, echo: Callable[[str], None] = print, wait: bool = True):
    """Submit the array and its finalize job; with `wait`, follow them and raise if one fails."""
    from dataprep.prepare import plan_shards
    from dataprep.sources import load_source

    dataset = load_source(spec.prep, spec.workdir)  # listings refused here, before anything is queued
    shards = len(plan_shards(spec.prep, dataset, spec.path(spec.data.shards), spec.data.clip_span))
    if not 1 <= tasks <= shards:
        raise ValueError(f"--array {tasks}: the dataset has {shards} shards; ask for 1 to {shards} tasks")
    array_cluster, final_cluster = prep_clusters(spec, workers)
    check_cluster(array_cluster)
    name = f"{spec.name}-prep"
    array = make_executor(array_cluster, spec.path(LOGS), name=name).map_array(PrepTask(spec, tasks, workers),
                                                                              range(tasks))
    array_id = array[0].job_id.split("_")[0]
    final = make_executor(final_cluster, spec.path(LOGS), name=name,
                          dependency=f"afterok:{array_id}").submit(FinalizeTask(spec))
    echo(f"prep: array job {array_id} ({tasks} tasks x {workers} workers, {shards} shards), finalize job "
         f"{final.job_id} after it; logs in {spec.path(LOGS)}")
    if not wait:
        return array, final
    for job in array:
        job.result()  # raises with the task's traceback when a task failed
    echo(f"prep: shards written in {final.result()}")
    return array, final
