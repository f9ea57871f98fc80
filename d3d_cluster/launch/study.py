"""A study: the pipeline over seeds and settings (`d3dc submit pipeline --seeds 0-4 --sweep KEY=V1,V2`), as researchers
run it to ask whether distillation helps: one run per point, `NAME/seed-S/KEY-VALUE...`, listed in NAME/study.json.

A stage is trained once per distinct input. Two points whose specs agree on everything a stage's network is the
product of (`rundir.trained_with`: seed, data, model and the stage's own settings) share it: the first point in
the study's order trains it, and the others see its stage directory through a symlink, so a sweep over student
keys trains one teacher and one baseline per seed. A point's evaluation scores the stages it trains and reports the
shared ones from their owner's predictions, so it waits for the owner's evaluation.

On Slurm every point's jobs are queued at once, each after the jobs it needs (`afterok`, across points), and
`--max-parallel N` makes a point's first jobs wait for the point N places before it to end (`afterany`). With the
local executor the points run in turn. Every point is checked before the first job is queued, and submitting the
study again queues only what has not finished.
"""

from __future__ import annotations

import itertools
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from d3d_cluster.files import write_json_atomically
from d3d_cluster.launch.executor import sbatch_script
from d3d_cluster.launch.pipeline import EVAL, PlannedJob, check_ready, run_jobs, submit_job
from d3d_cluster.launch.requeue import exit_hook
from d3d_cluster.launch.status import StageStatus, cancel_run, refuse_live_jobs, runs_status
from d3d_cluster.rundir import RESULTS_NAME, SPEC_NAME, STUDY_NAME, RunDir, trained_with
from d3d_cluster.spec import Spec, SpecError, parse_assignment
from d3d_cluster.train.stages import EXPORT_NAME, STAGES

_SEGMENT_CHARACTER = re.compile(r"[^A-Za-z0-9_.-]")


def parse_seeds(text: str) -> list[int]:
    """`0-4`, `0,2,7` or `0-2,9`: the seeds in the order given, each once."""
    seeds: list[int] = []
    for part in text.split(","):
        first, dash, last = part.strip().partition("-")
        try:
            values = range(int(first), int(last) + 1) if dash else [int(first)]
        except ValueError:
            raise SpecError(f"--seeds {text!r}: expected seeds and ranges of seeds, such as 0-4 or 0,2,7") from None
        if dash and not values:
            raise SpecError(f"--seeds {text!r}: the range {part.strip()} is empty")
        seeds.extend(seed for seed in values if seed not in seeds)
    return seeds


def parse_sweep(texts: tuple[str, ...] | list[str]) -> dict[str, list[Any]]:
    """`KEY=V1,V2` (repeatable): each value read as YAML as `--set` reads it; commas inside brackets stay in their
    value (`probe.layers=[a, b],[c]`)."""
    sweep: dict[str, list[Any]] = {}
    for text in texts:
        key, equals, values = text.partition("=")
        if key in sweep:
            raise SpecError(f"--sweep {key}: given twice; list every value in one --sweep {key}=V1,V2")
        parsed = [parse_assignment(f"{key}={value}")[1] for value in _split_values(values)] if equals else []
        if not parsed or any(value == "" for value in _split_values(values)):
            raise SpecError(f"--sweep {text!r}: expected KEY=V1,V2 with a dotted spec key and at least one value")
        if key in ("seed", "name"):
            raise SpecError(f"--sweep {key}: the study sets it (--seeds, --name)")
        sweep[key] = parsed
    return sweep


def _split_values(text: str) -> list[str]:
    values, depth, current = [], 0, ""
    for character in text:
        depth += {"[": 1, "{": 1, "]": -1, "}": -1}.get(character, 0)
        if character == "," and depth == 0:
            values.append(current.strip())
            current = ""
        else:
            current += character
    return [*values, current.strip()]


@dataclass(frozen=True)
class Point:
    """One seed and one setting of the sweep: a run of its own."""

    name: str
    seed: int
    settings: dict[str, Any]
    spec: Spec

    @property
    def run(self) -> RunDir:
        return RunDir(self.spec.run_dir)


def study_points(spec: Spec, seeds: list[int], sweep: dict[str, list[Any]]) -> list[Point]:
    """Every (seed, setting) of the cartesian product, each spec validated; a bad value names its point."""
    points = []
    for seed in seeds:
        for values in itertools.product(*sweep.values()):
            settings = dict(zip(sweep, values))
            name = "/".join([spec.name, f"seed-{seed}",
                             *(f"{key}-{_segment(value)}" for key, value in settings.items())])
            try:
                point_spec = spec.with_overrides(seed=seed, name=name, **settings)
            except SpecError as error:
                raise SpecError(f"study point {name}: {error}") from None
            points.append(Point(name, seed, settings, point_spec))
    names = [point.name for point in points]
    clash = next((name for name in names if names.count(name) > 1), None)
    if clash:
        raise SpecError(f"two points of the study would share the run {clash}: swept values must differ once written "
                        f"as names ({_SEGMENT_CHARACTER.pattern} becomes _)")
    return points


def _segment(value: Any) -> str:
    """A setting as part of a run's name; a section swept whole reads as its keys and values (target-logits-weight-1),
    so several keys that change together make one readable setting."""
    if isinstance(value, dict):
        return "-".join(f"{_segment(key)}-{_segment(item)}" for key, item in value.items())
    text = value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))
    return _SEGMENT_CHARACTER.sub("_", text)


def stage_owners(points: list[Point]) -> dict[tuple[str, str], Point]:
    """(point name, stage) -> the point that trains that stage: the first with the same inputs."""
    first: dict[str, Point] = {}
    owners = {}
    for point in points:
        for stage in STAGES:
            inputs = stage + json.dumps(trained_with(point.spec, stage), sort_keys=True, default=str)
            owners[point.name, stage] = first.setdefault(inputs, point)
    return owners


@dataclass(frozen=True)
class StudyJob:
    """One job of the study: `job` in `point`'s run, after the jobs `after` names as (point name, job name)."""

    point: Point
    job: PlannedJob
    after: tuple[tuple[str, str], ...] = ()


def plan_study(points: list[Point], owners: dict[tuple[str, str], Point], done: set[tuple[str, str]] = frozenset()
               ) -> list[StudyJob]:
    """Each point's own stages and its evaluation, in an order that also runs them one after another; the jobs in
    `done` (finished earlier) are neither queued nor waited for."""
    jobs = []
    for point in points:
        owned = [stage for stage in STAGES if owners[point.name, stage] is point]
        for stage in owned:
            after = (((owners[point.name, "teacher"].name, "teacher"),) if stage == "student" else ())
            jobs.append(StudyJob(point, PlannedJob(stage), after))
        shared = tuple(stage for stage in STAGES if stage not in owned)
        evaluated_elsewhere = dict.fromkeys((owners[point.name, stage].name, EVAL) for stage in shared)
        after = (*((point.name, stage) for stage in owned), *evaluated_elsewhere)
        jobs.append(StudyJob(point, PlannedJob(EVAL, stages=tuple(owned), reported=shared), after))
    return [StudyJob(job.point, job.job, tuple(dep for dep in job.after if dep not in done))
            for job in jobs if (job.point.name, job.job.name) not in done]


def finished_jobs(points: list[Point]) -> set[tuple[str, str]]:
    """The (point, job) pairs already done: a stage that finished after it last started, its network exported, an
    evaluation that finished after it last started with every stage in the point's results. (A cancel that reached
    a job as it ended comes after its `finished`.)"""
    done = set()
    for point in points:
        run = point.run
        last = {}
        for event in run.events():
            if event.get("stage") and event["event"] in ("started", "finished"):
                last[event["stage"]] = event["event"]
        for stage in STAGES:
            if last.get(stage) == "finished" and (run.path / stage / EXPORT_NAME).is_file():
                done.add((point.name, stage))
        results = run.path / RESULTS_NAME
        if last.get(EVAL) == "finished" and results.is_file() and \
                set(STAGES) <= set(json.loads(results.read_text()).get("models", {})):
            done.add((point.name, EVAL))
    return done


def check_study(points: list[Point]) -> None:
    """Every point's every stage, checked as the pipeline checks one run, before anything is written or queued."""
    for point in points:
        try:
            check_ready(point.spec, *STAGES)
        except (FileNotFoundError, ValueError) as error:
            raise type(error)(f"study point {point.name}: {error}") from None


def submit_study(spec: Spec, seeds: list[int], sweep: dict[str, list[Any]], echo: Callable[[str], None] = print,
                 max_parallel: int | None = None, force: bool = False) -> dict:
    """Check every point, make their runs (shared stages as symlinks to their owner's), write study.json, then queue
    every job on Slurm (their job ids, as `point/job`) or run the points in turn (each point's results)."""
    points = study_points(spec, seeds, sweep)
    owners = stage_owners(points)
    check_study(points)
    slurm = spec.cluster.executor == "slurm"
    if slurm:
        refuse_live_jobs(*(point.run for point in points))
    _refuse_other_study(spec, points)
    for point in points:
        point.run.check_spec(point.spec, force)
    for point in points:
        run = RunDir.create(point.spec, force)
        for key, (before, after) in run.changes.items():
            echo(f"{point.name}: spec change in this run: {key}: {before!r} -> {after!r}")
    for point in points:
        _link_shared_stages(point, owners)
    write_json_atomically(spec.run_dir / STUDY_NAME, study_record(spec, seeds, sweep, points, owners))
    done = finished_jobs(points)
    jobs = plan_study(points, owners, done)
    trained = {owner.name + "/" + stage for (_, stage), owner in owners.items()}
    echo(f"study {spec.name}: {len(points)} points, {len(trained)} stages to train "
         f"({sum(job.job.name in STAGES for job in jobs)} left), in {spec.run_dir}")
    if slurm:
        return queue_study(points, jobs, echo, max_parallel)
    results = {}
    for point in points:
        point_jobs = [job.job for job in jobs if job.point is point]
        if point_jobs:
            echo(f"--- {point.name}")
            results[point.name] = run_jobs(point.run, point_jobs, echo)
    return results


def queue_study(points: list[Point], jobs: list[StudyJob], echo: Callable[[str], None],
                max_parallel: int | None) -> dict[str, str]:
    """Queue every job without waiting; their Slurm job ids as `point/job`."""
    ids: dict[tuple[str, str], str] = {}
    for job, dependency in _dependencies(points, jobs, max_parallel, ids):
        submitted = submit_job(job.point.run, job.job.name, job.job.function(job.point.run),
                               lambda line, name=job.point.name: echo(f"{name} {line}"), dependency)
        ids[job.point.name, job.job.name] = submitted.job_id
    return {f"{point}/{name}": job_id for (point, name), job_id in ids.items()}


def _dependencies(points: list[Point], jobs: list[StudyJob], max_parallel: int | None,
                  ids: dict[tuple[str, str], str]) -> Iterator[tuple[StudyJob, str | None]]:
    """Each job with its Slurm dependency, made of the ids in `ids` of the jobs before it (the caller adds each
    job's id before asking for the next): `afterok` on what it needs, and with `max_parallel` a point's first jobs
    `afterany` on the evaluation of the point that many places before."""
    order = [point.name for point in points]
    last_of = {job.point.name: (job.point.name, job.job.name) for job in jobs}  # each point's evaluation
    for job in jobs:
        dependency = ["afterok:" + ":".join(ids[dep] for dep in job.after)] if job.after else []
        index = order.index(job.point.name)
        if max_parallel and index >= max_parallel and not any(dep[0] == job.point.name for dep in job.after):
            ahead = last_of.get(order[index - max_parallel])
            if ahead in ids:
                dependency.append(f"afterany:{ids[ahead]}")
        yield job, ",".join(dependency) or None


def dry_run_study(spec: Spec, seeds: list[int], sweep: dict[str, list[Any]], max_parallel: int | None = None) -> str:
    """What submitting the study would queue, as the sbatch scripts submitit would write (a job id a script depends
    on as `<point/job>`); what has finished is left out, as a submission leaves it. Nothing is created or queued."""
    points = study_points(spec, seeds, sweep)
    jobs = plan_study(points, stage_owners(points), finished_jobs(points))
    header = f"# study {spec.name}: {len(points)} points, {len(jobs)} jobs to queue\n"
    if spec.cluster.executor != "slurm":
        return header + "".join(f"# local executor: no sbatch; runs {job.job.name} of {job.point.name}\n"
                                for job in jobs)
    ids: dict[tuple[str, str], str] = {}
    scripts = []
    for job, dependency in _dependencies(points, jobs, max_parallel, ids):
        ids[job.point.name, job.job.name] = f"<{job.point.name}/{job.job.name}>"
        folder = job.point.spec.run_dir / job.job.name / "submitit"
        scripts.append((f"{job.point.name} {job.job.name}",
                        sbatch_script(job.point.spec.cluster, folder, f"{job.point.spec.name}-{job.job.name}",
                                      dependency=dependency, on_exit=exit_hook(job.point.spec.run_dir, job.job.name))))
    return header + "".join(f"# ----- job {number} of {len(scripts)}: {name} -----\n{script}\n"
                            for number, (name, script) in enumerate(scripts, 1))


def study_record(spec: Spec, seeds: list[int], sweep: dict[str, list[Any]], points: list[Point],
                 owners: dict[tuple[str, str], Point]) -> dict:
    return {"name": spec.name, "seeds": seeds, "sweep": sweep,
            "points": [{"name": point.name, "seed": point.seed, "settings": point.settings,
                        "run": str(point.spec.run_dir),
                        "stages": {stage: owners[point.name, stage].name for stage in STAGES}}
                       for point in points]}


def _refuse_other_study(spec: Spec, points: list[Point]) -> None:
    """A study's directory holds one study: it may grow (more seeds, more values), but a point left out would be
    orphaned, its runs no longer listed."""
    path = spec.run_dir
    if (path / SPEC_NAME).is_file():
        raise ValueError(f"{path}: a run of this name exists; give the study another --name")
    record = path / STUDY_NAME
    if record.is_file():
        left_out = sorted({point["name"] for point in json.loads(record.read_text())["points"]}
                          - {point.name for point in points})
        if left_out:
            raise ValueError(f"{record}: the study {spec.name!r} has points this submission leaves out "
                             f"({', '.join(left_out[:3])}{', ...' if len(left_out) > 3 else ''}); submit it with its "
                             "seeds and sweep to resume it, or give the new study another --name")


def _link_shared_stages(point: Point, owners: dict[tuple[str, str], Point]) -> None:
    for stage in STAGES:
        owner = owners[point.name, stage]
        if owner is point:
            continue
        target = owner.run.stage(stage)
        link = point.run.path / stage
        relative = os.path.relpath(target, link.parent)
        if link.is_symlink() and os.readlink(link) == relative:
            continue
        if link.exists() or link.is_symlink():
            raise ValueError(f"{link}: the study shares this stage with {owner.name}, but the point has a {stage} "
                             "of its own; move it away, or give the study another --name")
        link.symlink_to(relative, target_is_directory=True)


def load_study(path: Path) -> dict:
    """A study's record, with its points' runs."""
    record = path / STUDY_NAME
    try:
        return json.loads(record.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: not a study (no {STUDY_NAME}); `d3dc submit pipeline --seeds ...` makes "
                                "one") from None


def find_study(name: str | None, runs_dir: Path) -> Path | None:
    """NAME as a study directory, or as a study's name under the runs directory; None when it names no study."""
    if name is None:
        return None
    for path in (Path(name), runs_dir / name):
        if (path / STUDY_NAME).is_file():
            return path
    return None


@dataclass(frozen=True)
class PointStatus:
    """A point's jobs, each read from the run that holds it (a shared stage from its owner's), and its results."""

    name: str
    jobs: dict[str, StageStatus | None]
    owners: dict[str, str]
    results: dict | None


def study_status(path: Path) -> list[PointStatus]:
    """Every point of the study and where each of its jobs stands, Slurm asked once for the whole study."""
    points = load_study(path)["points"]
    runs = {point["name"]: RunDir(point["run"]) for point in points}
    by_path = runs_status(list(runs.values()))
    statuses = {name: {status.stage: status for status in by_path[run.path]} for name, run in runs.items()}
    report = []
    for point in points:
        owners = {**point["stages"], EVAL: point["name"]}
        results_file = runs[point["name"]].path / RESULTS_NAME
        jobs = {job: statuses.get(owner, {}).get(job) for job, owner in owners.items()}
        results = json.loads(results_file.read_text()) if results_file.is_file() else None
        report.append(PointStatus(point["name"], jobs, owners, results))
    return report


def cancel_study(path: Path) -> list[tuple[str, list, list]]:
    """Cancel every live job of every point's run: (point, cancelled, gone) as `cancel_run` reports them."""
    return [(point["name"], *cancel_run(RunDir(point["run"]))) for point in load_study(path)["points"]]
