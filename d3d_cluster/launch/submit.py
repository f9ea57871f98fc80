"""`d3dc submit`: from a spec and the command line's flags to jobs, every check done before the first is queued.

On Slurm the jobs are queued and `submit` returns (follow them with `d3dc status` and `d3dc logs`); with the local
executor there is no scheduler, so they run one after another in the foreground. `--dry-run` prints the sbatch
scripts submitit would write and touches nothing.
"""

from __future__ import annotations

from typing import Callable

from d3d_cluster.launch.doctor import doctor_script, submit_doctor
from d3d_cluster.launch.executor import parse_time, sbatch_script
from d3d_cluster.launch.requeue import exit_hook
from d3d_cluster.launch.pipeline import PlannedJob, check_ready, plan_jobs, queue_jobs, run_jobs
from d3d_cluster.launch.prep import LOGS, prep_clusters, prepare_locally, submit_prep
from d3d_cluster.launch.status import refuse_live_jobs
from d3d_cluster.launch.study import dry_run_study, submit_study
from d3d_cluster.rundir import STUDY_NAME, RunDir
from d3d_cluster.spec import Spec
from d3d_cluster.train.stages import STAGES

PREP = "prep"
DOCTOR = "doctor"

# Slurm's --time forms: M, M:S, H:M:S, D-H, D-H:M, D-H:M:S.
# Command-line flag -> the spec keys it sets. One rank per GPU: --gpus-per-node also sets the ranks per node.
FLAG_KEYS = {
    "nodes": ("cluster.nodes",),
    "gpus_per_node": ("cluster.gpus_per_node", "cluster.tasks_per_node"),
    "cpus_per_task": ("cluster.cpus_per_task",),
    "mem": ("cluster.mem",),
    "partition": ("cluster.partition",),
    "account": ("cluster.account",),
    "qos": ("cluster.qos",),
    "time": ("cluster.timeout_min",),
    "constraint": ("cluster.constraint",),
    "exclusive": ("cluster.exclusive",),
    "cluster": ("cluster.executor",),
    "name": ("name",),
}


def flag_overrides(**flags) -> dict:
    """The spec overrides (dotted keys) of the flags given; flags left at None keep the spec's value."""
    unknown = sorted(set(flags) - set(FLAG_KEYS))
    if unknown:
        raise ValueError(f"no spec key for flag(s) {', '.join(unknown)}")
    overrides = {}
    for flag, value in flags.items():
        if value is None:
            continue
        if flag == "time":
            value = parse_time(value)
        overrides.update(dict.fromkeys(FLAG_KEYS[flag], value))
    return overrides


def batch_plan(spec: Spec) -> str:
    """How the world shares the batch, and the rule behind it: the world size never changes the global batch or the
    learning rates; gradient accumulation makes up the difference."""
    cluster = spec.cluster
    return (f"{spec.world_size} ranks ({cluster.nodes} nodes x {cluster.tasks_per_node}): global batch "
            f"{spec.deepspeed.global_batch_size} = {spec.data.batch_size} clips a rank x {spec.world_size} ranks x "
            f"{spec.grad_accumulation} accumulation steps; learning rates teacher {spec.teacher.optimizer.lr:g}, "
            f"student {spec.student.optimizer.lr:g} (as the spec says: the world size changes neither)")


def dry_run(spec: Spec, target: str, prep_tasks: int = 1, prep_workers: int | None = None,
            seeds: list[int] | None = None, sweep: dict | None = None, max_parallel: int | None = None) -> str:
    """What `submit` would queue, as the sbatch scripts submitit would write for it; the job ids a script depends
    on are placeholders (`<teacher>`). Nothing is created or queued; Slurm is not needed."""
    if _is_study(target, seeds, sweep, max_parallel):
        return dry_run_study(spec, seeds or [spec.seed], sweep or {}, max_parallel)
    if spec.cluster.executor != "slurm":
        if target == DOCTOR:
            return "# local executor: no sbatch; `d3dc submit` runs doctor in the foreground, one task\n"
        names = [PREP] if target == PREP else [planned.name for planned in plan_jobs(spec, target)]
        plan = "" if target == PREP else f"# {batch_plan(spec)}\n"
        return (f"# local executor: no sbatch; `d3dc submit` runs {', '.join(names)} in the foreground, one after "
                f"another, {spec.world_size} ranks each\n{plan}")
    if target == DOCTOR:
        scripts = [(DOCTOR, doctor_script(spec))]
    elif target == PREP:
        array, final = prep_clusters(spec, prep_workers or spec.prep.workers)
        name = f"{spec.name}-{PREP}"
        scripts = [("prep array", sbatch_script(array, spec.path(LOGS), name, array_tasks=prep_tasks)),
                   ("prep finalize", sbatch_script(final, spec.path(LOGS), name, dependency="afterok:<prep array>"))]
    else:
        scripts = [(planned.name, _job_script(spec, planned)) for planned in plan_jobs(spec, target)]
    header = "" if target in (DOCTOR, PREP) else f"# {batch_plan(spec)}\n"
    return header + "".join(f"# ----- job {number} of {len(scripts)}: {name} -----\n{script}\n"
                            for number, (name, script) in enumerate(scripts, 1))


def _job_script(spec: Spec, planned: PlannedJob) -> str:
    dependency = "afterok:" + ":".join(f"<{name}>" for name in planned.after) if planned.after else None
    return sbatch_script(spec.cluster, spec.run_dir / planned.name / "submitit", f"{spec.name}-{planned.name}",
                         dependency=dependency, on_exit=exit_hook(spec.run_dir, planned.name))


def submit(spec: Spec, target: str, echo: Callable[[str], None] = print, prep_tasks: int = 1,
           prep_workers: int | None = None, force: bool = False, seeds: list[int] | None = None,
           sweep: dict | None = None, max_parallel: int | None = None) -> dict:
    """Check everything, then queue `target`'s jobs (Slurm: their job ids by name) or run them in the foreground
    (local: the last job's result). `prep` writes the spec's shards, outside any run; `doctor` checks the nodes,
    also outside any run, and waits on Slurm too: its result is every node's report. Seeds or a sweep make the
    pipeline a study (`launch.study`)."""
    if _is_study(target, seeds, sweep, max_parallel):
        return submit_study(spec, seeds or [spec.seed], sweep or {}, echo, max_parallel, force)
    if target == PREP:
        return _submit_prep(spec, echo, prep_tasks, prep_workers)
    if target == DOCTOR:  # a check of the nodes, outside any run, as prep is
        return {"reports": submit_doctor(spec, echo)}
    if (spec.run_dir / STUDY_NAME).is_file():
        raise ValueError(f"{spec.run_dir}: {spec.name!r} is a study; submit it with its --seeds and --sweep, or name "
                         "the run another way (--name)")
    jobs = plan_jobs(spec, target)
    check_ready(spec, *(planned.name for planned in jobs if planned.name in STAGES))
    slurm = spec.cluster.executor == "slurm"
    if slurm:
        refuse_live_jobs(RunDir(spec.run_dir))
    run = RunDir.create(spec, force)
    echo(f"run directory: {run.path}")
    for key, (before, after) in run.changes.items():
        echo(f"spec change in this run: {key}: {before!r} -> {after!r}")
    echo(batch_plan(spec))
    if slurm:
        return queue_jobs(run, jobs, echo)
    return run_jobs(run, jobs, echo)


def _submit_prep(spec: Spec, echo: Callable[[str], None], tasks: int, workers: int | None) -> dict:
    if spec.cluster.executor == "slurm":
        array, final = submit_prep(spec, tasks, workers or spec.prep.workers, echo=echo, wait=False)
        return {"prep array": array[0].job_id.split("_")[0], "prep finalize": final.job_id}
    if tasks != 1:
        raise ValueError("--array needs the slurm executor (locally, --workers sets the parallelism)")
    prepare_locally(spec, workers)
    return {}


def _is_study(target: str, seeds: list[int] | None, sweep: dict | None, max_parallel: int | None) -> bool:
    if seeds or sweep:
        if target != "pipeline":
            raise ValueError(f"--seeds and --sweep make a study of the pipeline, not of {target}")
        return True
    if max_parallel is not None:
        raise ValueError("--max-parallel limits a study's points (with --seeds or --sweep)")
    return False
