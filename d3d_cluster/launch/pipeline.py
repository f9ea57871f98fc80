"""Teacher, then student (and the RGB-only baseline), each as a multi-rank job; then their evaluation, which
writes the results table."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable

from d3d_cluster.data.pipeline import clip_geometry
from d3d_cluster.data.schema import SPLITS, Manifest
from d3d_cluster.launch.executor import check_cluster, make_executor
from d3d_cluster.launch.job import EvalJob, StageJob
from d3d_cluster.launch.rundir import RESULTS_NAME, SUMMARY_NAME, RunDir
from d3d_cluster.spec import Spec
from d3d_cluster.train.stages import EXPORT_NAME, STAGE_INPUT, STAGES, build_network
from d3d_cluster.train.teacher_outputs import check_space


def check_ready(spec: Spec, stage: str) -> None:
    """Refuse, before anything is written or submitted, a stage whose inputs are missing or whose cluster
    request cannot run."""
    shards = spec.path(spec.data.shards)
    manifest = Manifest.load(shards)
    for split in SPLITS:
        manifest.shard_paths(shards, split)
    clip_geometry(manifest, shards, spec.data)
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r} (expected one of {', '.join(STAGES)})")
    teacher = spec.run_dir / "teacher" / EXPORT_NAME
    if stage == "student" and not teacher.is_file():
        raise FileNotFoundError(f"{teacher}: the student needs a finished teacher in this run; train the teacher first")
    if stage == "student" and spec.student.distill.precompute:
        check_space(spec, len(manifest.classes), manifest.splits["train"].samples)
    check_initial_weights(spec, len(manifest.classes))
    check_cluster(spec.cluster)


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


def run_stage(run: RunDir, stage: str, echo: Callable[[str], None] = print, poll_seconds: float = 1.0) -> dict:
    """Submit one stage, relay its rank-0 output and metrics endpoints while it runs, wait for it."""
    spec = run.spec()
    check_ready(spec, stage)
    job = _submit(run, stage, StageJob(str(run.path), stage), echo)
    _follow(job, echo, poll_seconds)
    return json.loads((run.stage(stage) / SUMMARY_NAME).read_text())


def run_evaluation(run: RunDir, stages: tuple[str, ...], echo: Callable[[str], None] = print,
                   poll_seconds: float = 1.0) -> dict:
    """Evaluate the trained `stages` as a job of the run's world size; the results table it writes."""
    job = _submit(run, "eval", EvalJob(str(run.path), tuple(stages)), echo)
    _follow(job, echo, poll_seconds)
    return json.loads((run.path / RESULTS_NAME).read_text())


def _submit(run: RunDir, name: str, function, echo: Callable[[str], None]):
    spec = run.spec()
    executor = make_executor(spec.cluster, run.stage(name) / "submitit", name=f"{spec.name}-{name}")
    job = executor.submit(function)
    run.event("submitted", stage=name, job_id=job.job_id, executor=spec.cluster.executor)
    echo(f"[{name}] submitted job {job.job_id} ({spec.world_size} ranks, logs in {job.paths.folder})")
    return job


def _follow(job, echo: Callable[[str], None], poll_seconds: float) -> None:
    relayed = 0
    while not job.done():
        time.sleep(poll_seconds)
        relayed = _relay(job.paths.stdout, relayed, echo)
    _relay(job.paths.stdout, relayed, echo)
    job.results()  # raises with the failing rank's error output


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


def run_pipeline(run: RunDir, stages: tuple[str, ...] = STAGES, echo: Callable[[str], None] = print) -> dict:
    for stage in stages:
        run_stage(run, stage, echo)
    return run_evaluation(run, stages, echo)
