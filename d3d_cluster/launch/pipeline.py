"""Teacher, then student (and the RGB-only baseline), each as a multi-rank job; then the results table."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable

from d3d_cluster.data.pipeline import clip_geometry
from d3d_cluster.data.schema import SPLITS, Manifest
from d3d_cluster.launch.executor import check_cluster, make_executor
from d3d_cluster.launch.job import StageJob
from d3d_cluster.files import write_json_atomically
from d3d_cluster.launch.rundir import RESULTS_NAME, SUMMARY_NAME, RunDir
from d3d_cluster.spec import Spec
from d3d_cluster.train.evaluate import Predictions, ensemble_top1
from d3d_cluster.train.stages import EXPORT_NAME, STAGE_INPUT, STAGES, build_network


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
    executor = make_executor(spec.cluster, run.stage(stage) / "submitit", name=f"{spec.name}-{stage}")
    job = executor.submit(StageJob(str(run.path), stage))
    run.event("submitted", stage=stage, job_id=job.job_id, executor=spec.cluster.executor)
    echo(f"[{stage}] submitted job {job.job_id} ({spec.world_size} ranks, logs in {job.paths.folder})")
    relayed = 0
    while not job.done():
        time.sleep(poll_seconds)
        relayed = _relay(job.paths.stdout, relayed, echo)
    _relay(job.paths.stdout, relayed, echo)
    job.results()  # raises with the failing rank's error output
    return json.loads((run.stage(stage) / SUMMARY_NAME).read_text())


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


def results_table(run: RunDir, stages: tuple[str, ...]) -> dict:
    summaries = {stage: json.loads((run.path / stage / SUMMARY_NAME).read_text()) for stage in stages}
    predictions = {stage: Predictions.load(run.path / stage) for stage in stages}
    models = {
        stage: {"input": STAGE_INPUT[stage], "top1": summaries[stage]["top1"],
                "clips_per_second": summaries[stage]["clips_per_second"], "wall_seconds": summaries[stage]["wall_seconds"]}
        for stage in stages
    }
    if {"teacher", "student"} <= set(stages):
        models["student+teacher"] = {"input": "rgb+flow",
                                     "top1": ensemble_top1(predictions["student"], predictions["teacher"])}
    reference = next(iter(predictions.values()))
    return {"run": run.path.name, "val_samples": len(reference.labels),
            "chance": 1.0 / reference.logits.shape[1], "models": models}


def run_pipeline(run: RunDir, stages: tuple[str, ...] = STAGES, echo: Callable[[str], None] = print) -> dict:
    for stage in stages:
        run_stage(run, stage, echo)
    results = results_table(run, stages)
    write_json_atomically(run.path / RESULTS_NAME, results)
    return results
