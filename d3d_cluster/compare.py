"""Student against baseline, paired by seed, over the points of a study or a list of runs: `d3dc compare`, and the
quickstart benchmark's paired comparison.

Student and baseline of a seed start from the same weights and see the same clips in the same order, so their
top-1 difference is distillation's alone: the comparison is of those paired differences, not of two means. The
95% interval is Student's t over a setting's seeds, mean +- t(0.975, n - 1) s / sqrt(n), the quantile computed
here exactly from t's closed-form distribution function for integer degrees of freedom (no SciPy). A single seed
has no spread to estimate and so no interval. A point whose evaluation failed or has not finished is listed with
its evaluation job's state and left out of its setting's statistics, which say how many were left out.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
import yaml

from d3d_cluster.files import replace_atomically
from d3d_cluster.launch.pipeline import EVAL
from d3d_cluster.launch.status import StageStatus, runs_status
from d3d_cluster.launch.study import load_study, study_status
from d3d_cluster.rundir import RESULTS_NAME, RunDir, spec_changes

FIGURE_NAME = "study.png"
MODELS = ("teacher", "student", "baseline", "student+teacher")
CONFIDENCE = 0.95
INTERVAL = ("95% Student t interval of the paired student - baseline top-1 difference over a setting's seeds: "
            "mean +- t(0.975, n-1) s/sqrt(n); none for a single seed")
NOT_SETTINGS = ("seed", "name")  # what tells runs of one setting apart, not what they compare


@dataclass(frozen=True)
class Point:
    """One seed of one setting, and the run whose results.json scores all its networks."""

    name: str
    seed: int
    settings: dict
    run: Path


def compare_study(study_dir: Path) -> dict:
    """The report of a study's points, as its study.json lists them; a shared stage's job is read from the point
    that trains it."""
    record = load_study(study_dir)
    points = [Point(point["name"], point["seed"], point["settings"], Path(point["run"])) for point in record["points"]]
    return compare_points(points, {status.name: status.jobs for status in study_status(study_dir)}, record["name"])


def compare_runs(runs: list[RunDir]) -> dict:
    """The report of runs, each a point: its spec's seed, and as settings its values of every key on which the
    runs' specs differ (seed and name aside), so that runs differing only in seed make one setting."""
    specs = [run.spec() for run in runs]
    changes = [spec_changes(specs[0], spec) for spec in specs]
    first = {key: values[0] for change in changes for key, values in change.items() if key not in NOT_SETTINGS}
    points = [Point(spec.name, spec.seed, {key: change[key][1] if key in change else value
                                           for key, value in sorted(first.items())}, run.path)
              for run, spec, change in zip(runs, specs, changes)]
    jobs = runs_status(runs)
    return compare_points(points, {point.name: {job.stage: job for job in jobs[point.run]} for point in points})


def paired_row(seed: int, models: dict) -> dict:
    """A seed's top-1 per network, student minus baseline, and the share of the baseline-to-teacher gap the
    student closes (None when the teacher is no better than the baseline: there is no gap to close)."""
    top1 = {model: models[model]["top1"] for model in MODELS if model in models}
    gain = top1["student"] - top1["baseline"]
    teacher = top1.get("teacher")
    closed = gain / (teacher - top1["baseline"]) if teacher is not None and teacher > top1["baseline"] else None
    return {"seed": seed, "top1": top1, "student_minus_baseline": gain, "gap_closed": closed}


def spread(values: list[float]) -> dict | None:
    """Mean, sample standard deviation (None for one value), range and the values; None for no values."""
    if not values:
        return None
    return {"mean": statistics.mean(values), "stdev": statistics.stdev(values) if len(values) > 1 else None,
            "min": min(values), "max": max(values), "per_seed": values}


def paired_summary(rows: list[dict]) -> dict:
    """What the paired rows of one setting say together: the difference with its interval, wins, ties and losses
    of the student, the gap closed, and the student + teacher ensemble against the teacher."""
    gains = [row["student_minus_baseline"] for row in rows]
    difference = spread(gains)
    if difference is not None:
        difference["interval"] = t_interval(gains)
    ensembled = [row["top1"]["student+teacher"] - row["top1"]["teacher"] for row in rows
                 if {"student+teacher", "teacher"} <= set(row["top1"])]
    return {"student_minus_baseline": difference, "student_wins": sum(gain > 0 for gain in gains),
            "ties": sum(gain == 0 for gain in gains), "student_losses": sum(gain < 0 for gain in gains),
            "gap_closed": spread([row["gap_closed"] for row in rows if row["gap_closed"] is not None]),
            "ensemble_minus_teacher": spread(ensembled)}


def student_t_cdf(t: float, df: int) -> float:
    """P(T <= t) for Student's t with `df` (integer) degrees of freedom, in closed form (Abramowitz and Stegun
    26.7.3-4): with theta = atan(t / sqrt(df)), P(|T| <= t) is a finite sum of powers of cos(theta)."""
    theta = math.atan(abs(t) / math.sqrt(df))
    cos2 = math.cos(theta) ** 2
    if df % 2:
        term, total = math.cos(theta), 0.0
        for k in range(1, (df - 1) // 2 + 1):
            total += term
            term *= cos2 * 2 * k / (2 * k + 1)
        within = 2 / math.pi * (theta + math.sin(theta) * total)
    else:
        term, total = 1.0, 0.0
        for k in range(1, df // 2 + 1):
            total += term
            term *= cos2 * (2 * k - 1) / (2 * k)
        within = math.sin(theta) * total
    return 0.5 + math.copysign(within / 2, t)


def student_t_quantile(p: float, df: int) -> float:
    """The t with P(T <= t) = p, by bisection of the closed-form distribution function on theta in (0, pi/2)."""
    if not 0 < p < 1 or df < 1:
        raise ValueError(f"need 0 < p < 1 and df >= 1, got p={p}, df={df}")
    if p < 0.5:
        return -student_t_quantile(1 - p, df)
    low, high = 0.0, math.pi / 2
    for _ in range(100):
        middle = (low + high) / 2
        low, high = (middle, high) if student_t_cdf(math.sqrt(df) * math.tan(middle), df) < p else (low, middle)
    return math.sqrt(df) * math.tan((low + high) / 2)


def t_interval(values: list[float], confidence: float = CONFIDENCE) -> list[float] | None:
    """The Student t interval of the mean of `values`; None for fewer than two."""
    n = len(values)
    if n < 2:
        return None
    half = student_t_quantile((1 + confidence) / 2, n - 1) * statistics.stdev(values) / math.sqrt(n)
    mean = statistics.mean(values)
    return [mean - half, mean + half]


def evaluation_state(jobs: dict[str, StageStatus | None]) -> tuple[str, str | None]:
    """Where a point without results stands: its evaluation job's state (queued, running, failed, cancelled, not
    submitted...) and what explains it: the job's error, a stage that failed before it, or what it waits for."""
    evaluation = jobs.get(EVAL)
    failed = [job for stage, job in jobs.items() if stage != EVAL and job is not None and _job_state(job) == "failed"]
    upstream = f"{failed[0].stage} failed: {failed[0].error or failed[0].state}" if failed else None
    if evaluation is None:
        return "not submitted", upstream
    waiting = evaluation.slurm and (evaluation.slurm.waiting_for or evaluation.slurm.reason)
    return _job_state(evaluation), evaluation.error or upstream or waiting or None


def _job_state(job: StageStatus) -> str:
    if job.live:
        return "queued" if job.slurm.state == "PENDING" else "running"
    if job.last_event in ("failed", "cancelled"):
        return job.last_event
    if job.slurm is not None:
        state = job.slurm.state
        return "finished" if state == "COMPLETED" else "cancelled" if state.startswith("CANCELLED") else "failed"
    if job.ended and job.last_event != "finished":  # a Slurm job that Slurm has forgotten, its end unrecorded
        return "ended"
    return {"submitted": "queued", "finished": "finished"}.get(job.last_event, "running")


def point_row(point: Point, jobs: dict[str, StageStatus | None]) -> dict:
    """The point's paired row when its results.json scores student and baseline; else its evaluation's state."""
    row = {"name": point.name, "seed": point.seed, "settings": point.settings, "run": str(point.run)}
    results = point.run / RESULTS_NAME
    if not results.is_file():
        state, detail = evaluation_state(jobs)
        return {**row, "state": state, "detail": detail, "top1": None, "student_minus_baseline": None,
                "gap_closed": None}
    models = json.loads(results.read_text())["models"]
    missing = [model for model in ("student", "baseline") if model not in models]
    if missing:
        return {**row, "state": "incomplete", "detail": f"{results} scores no {' and no '.join(missing)}",
                "top1": None, "student_minus_baseline": None, "gap_closed": None}
    return {**row, "state": "evaluated", "detail": None, **paired_row(point.seed, models)}


def settings_label(settings: dict) -> str:
    """KEY=VALUE as `--sweep` reads it; a section swept whole in YAML's flow style ({target: logits, weight: 1})."""
    return ", ".join(f"{key}={_flow(value)}" for key, value in settings.items()) or "(one setting)"


def _flow(value) -> str:
    return yaml.safe_dump(value, default_flow_style=True, width=10**6).strip() if isinstance(value, (dict, list)) \
        else str(value)


def compare_points(points: list[Point], jobs: dict[str, dict[str, StageStatus | None]],
                   study: str | None = None) -> dict:
    """The report: a row per point, and per setting (points grouped by settings, in order of first appearance)
    each network's top-1 and the paired summary over the evaluated seeds, with the count of points left out.
    `jobs`: each point's jobs by name, for the state of those without results."""
    rows = [point_row(point, jobs.get(point.name, {})) for point in points]
    groups: dict[str, list[dict]] = {}
    for row in rows:
        groups.setdefault(json.dumps(row["settings"], sort_keys=True, default=str), []).append(row)
    settings = []
    for members in groups.values():
        evaluated = sorted((row for row in members if row["state"] == "evaluated"), key=lambda row: row["seed"])
        settings.append({
            "settings": members[0]["settings"], "label": settings_label(members[0]["settings"]),
            "points": len(members), "left_out": len(members) - len(evaluated),
            "seeds": [row["seed"] for row in evaluated],
            "top1": {model: spread([row["top1"][model] for row in evaluated if model in row["top1"]])
                     for model in MODELS},
            **paired_summary(evaluated),
        })
    return {"study": study, "interval": INTERVAL, "points": rows, "settings": settings}


def comparison_figure(report: dict) -> Figure:
    """A column per setting: each seed's paired difference as a dot, beside it the mean with its interval; under
    each setting, its seeds and the points left out."""
    settings = report["settings"]
    figure = Figure(figsize=(3 + 2 * len(settings), 4.5), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots()
    axes.axhline(0.0, color="grey", linewidth=0.8)
    for x, setting in enumerate(settings):
        difference = setting["student_minus_baseline"]
        if difference is None:
            continue
        axes.scatter([x] * len(difference["per_seed"]), [100 * gain for gain in difference["per_seed"]],
                     color="tab:blue", alpha=0.7)
        mean, interval = 100 * difference["mean"], difference["interval"]
        error = [[mean - 100 * interval[0]], [100 * interval[1] - mean]] if interval else None
        axes.errorbar([x + 0.2], [mean], yerr=error, fmt="o", color="black", capsize=4)
        if interval is None:
            axes.annotate("one seed: no interval", (x + 0.2, mean), textcoords="offset points", xytext=(0, -14),
                          fontsize=8, ha="center")
    labels = [f"{setting['label']}\n{len(setting['seeds'])} seed{'' if len(setting['seeds']) == 1 else 's'}"
              + (f", {setting['left_out']} left out" if setting["left_out"] else "") for setting in settings]
    axes.set_xticks(range(len(settings)), labels, fontsize=8)
    axes.set_xlim(-0.5, len(settings) - 0.5)
    axes.set_ylabel("student - baseline top-1 (points)")
    axes.set_title(f"{report['study'] or 'runs'}: student - baseline, paired by seed\n"
                   "dots: seeds; black: mean and 95% Student t interval", fontsize=10)
    return figure


def write_figure(report: dict, path: Path) -> Path:
    figure = comparison_figure(report)
    return replace_atomically(path, lambda tmp: figure.savefig(tmp, format="png", dpi=100))
