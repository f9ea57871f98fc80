"""What a run's jobs are (a stage, the evaluation, or the whole chain: teacher and baseline, the student after the
teacher, the evaluation after both), and the two ways to run them: queued on Slurm with `afterok` dependencies,
or one after another in the foreground with the local executor, relaying rank 0's output."""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from d3d_cluster.data.pipeline import clip_geometry, decodes_on_gpu, mirrored_labels, training_steps
from d3d_cluster.data.schema import SPLITS, Manifest
from d3d_cluster.launch.executor import check_cluster, make_executor
from d3d_cluster.launch.job import EvalJob, StageJob
from d3d_cluster.launch.requeue import count_events, exit_hook, job_events
from d3d_cluster.rundir import RESULTS_NAME, SUMMARY_NAME, RunDir
from d3d_cluster.spec import Spec
from d3d_cluster.train.stages import (EXPORT_NAME, STAGE_INPUT, STAGES, build_network, load_frozen_teacher,
                                      stage_settings)
from d3d_cluster.train.teacher_outputs import check_space

EVAL = "eval"
TARGETS = (*STAGES, EVAL, "pipeline")


@dataclass(frozen=True)
class PlannedJob:
    """One job of a submission: a stage's training, or the evaluation of `stages` (reporting `reported` too, stages
    another run of a study evaluated); `after` names the jobs of the same submission it waits for (`afterok`)."""

    name: str
    after: tuple[str, ...] = ()
    stages: tuple[str, ...] = ()
    reported: tuple[str, ...] = ()

    def function(self, run: RunDir) -> StageJob | EvalJob:
        if self.name == EVAL:
            return EvalJob(str(run.path), self.stages, self.reported)
        return StageJob(str(run.path), self.name)


def plan_jobs(spec: Spec, target: str) -> list[PlannedJob]:
    """The jobs `target` submits, in an order that also runs them one after another: the pipeline trains the
    teacher and the RGB-only baseline at once, the student after the teacher, and evaluates all three after."""
    if target == "pipeline":
        return [PlannedJob("teacher"), PlannedJob("baseline"), PlannedJob("student", after=("teacher",)),
                PlannedJob(EVAL, after=("student", "baseline"), stages=STAGES)]
    if target == EVAL:
        trained = tuple(stage for stage in STAGES if (spec.run_dir / stage / EXPORT_NAME).is_file())
        if not trained:
            raise FileNotFoundError(f"{spec.run_dir}: no trained stage to evaluate (no {EXPORT_NAME} under "
                                    f"{', '.join(STAGES)}); submit a stage or the pipeline first")
        return [PlannedJob(EVAL, stages=trained)]
    if target not in STAGES:
        raise ValueError(f"unknown job {target!r} (expected one of {', '.join(TARGETS)})")
    return [PlannedJob(target)]


def check_ready(spec: Spec, *stages: str) -> None:
    """Refuse, before anything is written or submitted, stages whose inputs are missing or whose cluster request
    cannot run. The student needs a finished teacher unless the teacher is among `stages` (queued before it)."""
    shards = spec.path(spec.data.shards)
    manifest = Manifest.load(shards)
    for split in SPLITS:
        manifest.shard_paths(shards, split)
    clip_geometry(manifest, shards, spec.data)
    mirrored_labels(manifest, shards, spec.data)
    decodes_on_gpu(manifest, shards, spec.data)
    unknown = [stage for stage in stages if stage not in STAGES]
    if unknown:
        raise ValueError(f"unknown stage {unknown[0]!r} (expected one of {', '.join(STAGES)})")
    for stage in stages:
        try:
            training_steps(manifest, spec.data, spec.world_size, stage_settings(spec, stage).epochs)
        except ValueError as error:
            raise ValueError(f"{shards}: {stage}: {error}") from None
    teacher = spec.run_dir / "teacher" / EXPORT_NAME
    if "student" in stages and "teacher" not in stages:
        if not teacher.is_file():
            raise FileNotFoundError(f"{teacher}: the student needs a finished teacher in this run; train the teacher "
                                    "first (or submit the pipeline)")
        load_frozen_teacher(spec, teacher.parent, len(manifest.classes), torch.device("cpu"))  # it is the spec's network
    if "student" in stages and spec.student.distill.precompute:
        check_space(spec, len(manifest.classes), manifest.splits["train"].samples)
    check_initial_weights(spec, len(manifest.classes))
    check_batchnorm_batch(spec)
    check_cluster(spec.cluster)


def check_batchnorm_batch(spec: Spec) -> None:
    """BatchNorm normalises over a rank's clips and positions, and needs more than one value per channel: one clip
    a rank fails every rank at step 1 where the deepest layers have one position per clip (small clips)."""
    from d3d_cluster.models.info import model_info

    info = model_info(2, 3, spec.data.clip_frames, spec.data.crop_size, spec.model.width, spec.model.gating)
    name, positions = min(((layer.name, math.prod(layer.output_shape[1:])) for layer in reversed(info.layers[:-1])),
                          key=lambda pair: pair[1])
    if spec.data.batch_size * positions < 2:
        raise ValueError(f"data.batch_size {spec.data.batch_size}: {name} has {positions} position a clip at "
                         f"{spec.data.clip_frames}x{spec.data.crop_size}x{spec.data.crop_size}, so BatchNorm would "
                         "see one value per channel on each rank; give each rank 2 clips (data.batch_size) or "
                         "larger clips (data.crop_size, data.clip_frames)")


def check_initial_weights(spec: Spec, num_classes: int) -> None:
    """Every `init` file the spec names exists and fits its network: loaded once here, on the login node."""
    for section in ("teacher", "student"):
        settings = getattr(spec, section)
        if settings.init.path is None:
            continue
        path = spec.path(settings.init.path)
        if not path.is_file():
            raise FileNotFoundError(f"{section}.init.path: {path} does not exist")
        build_network(spec, settings, STAGE_INPUT[section], num_classes)


def queue_jobs(run: RunDir, jobs: list[PlannedJob], echo: Callable[[str], None] = print) -> dict[str, str]:
    """Submit every job without waiting, each after the jobs it depends on; their Slurm job ids by name."""
    job_ids: dict[str, str] = {}
    for planned in jobs:
        dependency = "afterok:" + ":".join(job_ids[name] for name in planned.after) if planned.after else None
        job_ids[planned.name] = submit_job(run, planned.name, planned.function(run), echo, dependency).job_id
    return job_ids


def run_jobs(run: RunDir, jobs: list[PlannedJob], echo: Callable[[str], None] = print,
             poll_seconds: float = 1.0) -> dict:
    """Run the jobs one after another in the foreground; the last one's result (a summary, or the results)."""
    result: dict = {}
    for planned in jobs:
        if planned.name == EVAL:
            result = run_evaluation(run, planned.stages, echo, poll_seconds, planned.reported)
        else:
            result = run_stage(run, planned.name, echo, poll_seconds)
    return result


def run_stage(run: RunDir, stage: str, echo: Callable[[str], None] = print, poll_seconds: float = 1.0) -> dict:
    """Submit one stage, relay its rank-0 output and metrics endpoints while it runs, wait for it."""
    check_ready(run.spec(), stage)
    job = submit_job(run, stage, StageJob(str(run.path), stage), echo)
    _follow(run, stage, job, echo, poll_seconds)
    return json.loads((run.stage(stage) / SUMMARY_NAME).read_text())


def run_evaluation(run: RunDir, stages: tuple[str, ...], echo: Callable[[str], None] = print,
                   poll_seconds: float = 1.0, reported: tuple[str, ...] = ()) -> dict:
    """Evaluate the trained `stages` as a job of the run's world size; the results table it writes."""
    job = submit_job(run, EVAL, EvalJob(str(run.path), tuple(stages), tuple(reported)), echo)
    _follow(run, EVAL, job, echo, poll_seconds)
    return json.loads((run.path / RESULTS_NAME).read_text())


def run_pipeline(run: RunDir, echo: Callable[[str], None] = print) -> dict:
    """Teacher, baseline, student and their evaluation in the foreground; the results table."""
    return run_jobs(run, plan_jobs(run.spec(), "pipeline"), echo)


def submit_job(run: RunDir, name: str, function, echo: Callable[[str], None], dependency: str | None = None):
    """Queue one job of the run (its logs under RUN/NAME/submitit) and record it in the events log."""
    spec = run.spec()
    executor = make_executor(spec.cluster, run.stage(name) / "submitit", name=f"{spec.name}-{name}",
                             dependency=dependency, on_exit=exit_hook(run.path, name))
    job = executor.submit(function)
    run.event("submitted", stage=name, job_id=job.job_id, executor=spec.cluster.executor, dependency=dependency)
    after = f", after {dependency}" if dependency else ""
    ranks = f"{spec.world_size} rank{'s' if spec.world_size > 1 else ''}"
    echo(f"[{name}] submitted job {job.job_id} ({ranks}{after}, logs in {job.paths.folder})")
    return job


class JobCancelled(RuntimeError):
    """A job followed in the foreground was cancelled (`d3dc cancel`)."""


def _follow(run: RunDir, name: str, job, echo: Callable[[str], None], poll_seconds: float) -> None:
    relayed = 0
    while not job.done():
        time.sleep(poll_seconds)
        relayed = _relay(job.paths.stdout, relayed, echo)
    _relay(job.paths.stdout, relayed, echo)
    try:
        job.results()  # raises with the failing rank's error output
    except Exception:
        if count_events(job_events(run, name, job.job_id), "cancelled"):
            raise JobCancelled(f"[{name}] job {job.job_id} was cancelled; its checkpoints are kept: submit it again "
                               "to resume") from None
        raise


def _relay(log: Path, offset: int, echo: Callable[[str], None]) -> int:
    if not log.exists():
        return offset
    with log.open("rb") as handle:
        handle.seek(offset)
        complete, newline, _ = handle.read().rpartition(b"\n")
    for line in complete.decode(errors="replace").splitlines():
        if line.startswith("["):
            echo(line)
    return offset + len(complete) + len(newline)
