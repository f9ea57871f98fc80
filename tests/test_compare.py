"""Student against baseline, paired by seed: a study's and a list of runs' report, read from hand-written results,
its t interval against the tables, the figure, and `d3dc compare`."""

import json
import math
import statistics

import pytest
from click.testing import CliRunner
from matplotlib.collections import PathCollection
from conftest import tiny_spec

from d3d_cluster import cli
from d3d_cluster.compare import (FIGURE_NAME, comparison_figure, compare_runs, compare_study, evaluation_state,
                                 paired_row, paired_summary, settings_label, student_t_cdf, student_t_quantile,
                                 t_interval, write_figure)
from d3d_cluster.launch.status import run_status
from d3d_cluster.launch.study import STUDY_NAME
from d3d_cluster.rundir import RESULTS_NAME, RunDir

MODELS = ("teacher", "student", "baseline", "student+teacher")
# (distill weight, seed) -> top-1 of teacher, student, baseline and student+teacher; a string: no results.json, the
# evaluation's story told by these events instead.
STUDY = {
    (1, 0): (0.80, 0.70, 0.50, 0.85),
    (1, 1): (0.75, 0.60, 0.60, 0.78),  # a tie
    (1, 2): (0.70, 0.65, 0.40, 0.72),
    (1, 3): (0.50, 0.45, 0.55, 0.52),  # a loss, and a teacher no better than the baseline: no gap to close
    (10, 0): (0.80, 0.90, 0.50, 0.88),
    (10, 1): "failed",
    (10, 2): "student failed",
    (10, 3): "running",
}
EVENTS = {
    "failed": [("submitted", "eval"), ("started", "eval"), ("failed", "eval")],
    "student failed": [("submitted", "student"), ("started", "student"), ("failed", "student")],
    "running": [("submitted", "eval"), ("started", "eval")],
    "queued": [("submitted", "eval")],
    "cancelled": [("submitted", "eval"), ("started", "eval"), ("cancelled", "eval")],
    "not submitted": [],
}


def _point_run(workdir, name: str, seed: int, weight: float) -> RunDir:
    return RunDir.create(tiny_spec(workdir, name=name, seed=seed, student={"distill": {"weight": weight}}))


def _finish(run: RunDir, outcome) -> None:
    """Hand-written results.json, or the events of an evaluation that has not written one."""
    if isinstance(outcome, tuple):
        models = {model: {"top1": top1} for model, top1 in zip(MODELS, outcome)}
        (run.path / RESULTS_NAME).write_text(json.dumps({"run": run.path.name, "val_samples": 20, "models": models}))
        return
    for event, stage in EVENTS[outcome]:
        run.event(event, stage=stage, job_id="4242", executor="local",
                  **({"error": "RuntimeError: out of memory"} if event == "failed" else {}))


@pytest.fixture
def study(tmp_path):
    """A study of student.distill.weight 1 and 10 over seeds 0-3 (STUDY), as `d3dc submit pipeline` records it."""
    points = []
    for (weight, seed), outcome in STUDY.items():
        name = f"study/seed-{seed}/student.distill.weight-{weight}"
        run = _point_run(tmp_path, name, seed, weight)
        _finish(run, outcome)
        owner = f"study/seed-{seed}/student.distill.weight-1"
        points.append({"name": name, "seed": seed, "settings": {"student.distill.weight": weight},
                       "run": str(run.path), "stages": {"teacher": owner, "baseline": owner, "student": name}})
    path = tmp_path / "runs" / "study"
    (path / STUDY_NAME).write_text(json.dumps({"name": "study", "seeds": [0, 1, 2, 3],
                                               "sweep": {"student.distill.weight": [1, 10]}, "points": points}))
    return path


def test_t_quantiles_match_the_tables_and_the_closed_forms_of_one_and_two_degrees_of_freedom():
    assert student_t_quantile(0.975, 1) == pytest.approx(12.706, abs=5e-4)
    assert student_t_quantile(0.975, 4) == pytest.approx(2.776, abs=5e-4)
    assert student_t_quantile(0.975, 30) == pytest.approx(2.042, abs=5e-4)
    assert student_t_quantile(0.975, 1) == pytest.approx(math.tan(math.pi * 0.475), rel=1e-12)  # Cauchy
    assert student_t_quantile(0.975, 2) == pytest.approx(0.95 / math.sqrt(2 * 0.975 * 0.025), rel=1e-12)
    assert student_t_quantile(0.975, 10_000) == pytest.approx(1.960, abs=1e-3)  # towards the normal
    assert student_t_quantile(0.025, 5) == -student_t_quantile(0.975, 5)
    for df in (1, 2, 3, 8):
        assert student_t_cdf(0.0, df) == 0.5 and student_t_cdf(-1.5, df) == pytest.approx(1 - student_t_cdf(1.5, df))


def test_the_interval_is_the_mean_plus_or_minus_t_times_the_standard_error_and_one_value_has_none():
    values = [0.1, 0.2, 0.3]
    half = 4.302653 * 0.1 / math.sqrt(3)  # t(0.975, 2) from the tables; the sample standard deviation is 0.1
    assert t_interval(values) == pytest.approx([0.2 - half, 0.2 + half], abs=1e-6)
    assert t_interval([0.4]) is None


def test_a_setting_reads_as_sweep_takes_it_a_section_swept_whole_in_yaml_flow_style():
    assert settings_label({"student.distill.weight": 1, "data.pipelines": 2}) == \
        "student.distill.weight=1, data.pipelines=2"
    assert settings_label({"student.distill": {"target": "logits", "weight": 1}}) == \
        "student.distill={target: logits, weight: 1}"
    assert settings_label({"probe.layers": ["mixed_4f", "mixed_5c"]}) == "probe.layers=[mixed_4f, mixed_5c]"
    assert settings_label({}) == "(one setting)"


def test_each_point_is_paired_and_each_setting_summarised_over_its_evaluated_seeds(study):
    report = compare_study(study)
    assert report["study"] == "study" and "Student t" in report["interval"]
    rows = {(row["settings"]["student.distill.weight"], row["seed"]): row for row in report["points"]}
    assert list(rows) == list(STUDY)
    first = rows[1, 0]
    assert first["state"] == "evaluated" and first["top1"] == dict(zip(MODELS, STUDY[1, 0]))
    assert first["student_minus_baseline"] == pytest.approx(0.20)
    assert first["gap_closed"] == pytest.approx(0.20 / 0.30)
    assert rows[1, 1]["student_minus_baseline"] == 0 and rows[1, 1]["gap_closed"] == 0
    assert rows[1, 3]["student_minus_baseline"] == pytest.approx(-0.10) and rows[1, 3]["gap_closed"] is None

    one, ten = report["settings"]
    assert one["label"] == "student.distill.weight=1" and one["seeds"] == [0, 1, 2, 3] and one["left_out"] == 0
    gains = [0.20, 0.0, 0.25, -0.10]
    mean = sum(gains) / 4
    sd = math.sqrt(sum((gain - mean) ** 2 for gain in gains) / 3)
    difference = one["student_minus_baseline"]
    assert difference["mean"] == pytest.approx(0.0875) and difference["stdev"] == pytest.approx(sd)
    assert difference["per_seed"] == pytest.approx(gains)
    half = 3.182446 * sd / 2  # t(0.975, 3) from the tables, over sqrt(4)
    assert difference["interval"] == pytest.approx([mean - half, mean + half], abs=1e-6)
    assert (one["student_wins"], one["ties"], one["student_losses"]) == (2, 1, 1)
    assert one["gap_closed"]["per_seed"] == pytest.approx([0.2 / 0.3, 0.0, 0.25 / 0.3])
    teachers = [STUDY[1, seed][0] for seed in range(4)]
    assert one["top1"]["teacher"]["mean"] == pytest.approx(statistics.mean(teachers))
    assert one["top1"]["teacher"]["stdev"] == pytest.approx(statistics.stdev(teachers))
    assert one["ensemble_minus_teacher"]["per_seed"] == pytest.approx([0.05, 0.03, 0.02, 0.02])

    assert ten["seeds"] == [0] and ten["points"] == 4 and ten["left_out"] == 3
    assert ten["student_minus_baseline"]["mean"] == pytest.approx(0.40)
    assert ten["student_minus_baseline"]["stdev"] is None and ten["student_minus_baseline"]["interval"] is None
    assert ten["gap_closed"]["mean"] == pytest.approx(0.40 / 0.30)


def test_a_point_without_results_shows_its_evaluation_state_and_is_left_out_of_the_statistics(study):
    rows = {row["seed"]: row for row in compare_study(study)["points"]
            if row["settings"]["student.distill.weight"] == 10}
    assert (rows[1]["state"], rows[1]["detail"]) == ("failed", "RuntimeError: out of memory")
    assert (rows[2]["state"], rows[2]["detail"]) == ("not submitted", "student failed: RuntimeError: out of memory")
    assert (rows[3]["state"], rows[3]["detail"]) == ("running", None)
    assert all(rows[seed]["top1"] is None and rows[seed]["student_minus_baseline"] is None for seed in (1, 2, 3))


@pytest.mark.parametrize("outcome", ["queued", "running", "failed", "cancelled", "not submitted"])
def test_the_evaluation_state_is_read_from_the_runs_events(tmp_path, outcome):
    run = _point_run(tmp_path, "run", 0, 1)
    _finish(run, outcome)
    state, _detail = evaluation_state({job.stage: job for job in run_status(run)})
    assert state == outcome


def test_runs_that_differ_only_in_seed_make_one_setting_and_every_other_difference_another(tmp_path):
    runs = [_point_run(tmp_path, f"run-{index}", seed, weight)
            for index, (seed, weight) in enumerate([(0, 1), (1, 1), (0, 10), (1, 10), (2, 1)])]
    for run, outcome in zip(runs, [(0.8, 0.7, 0.5, 0.8), (0.8, 0.6, 0.5, 0.8), (0.8, 0.9, 0.5, 0.8),
                                   (0.8, 0.4, 0.5, 0.8), "queued"]):
        _finish(run, outcome)
    report = compare_runs(runs)
    assert report["study"] is None
    assert [(row["name"], row["seed"], row["settings"]) for row in report["points"]] == [
        ("run-0", 0, {"student.distill.weight": 1.0}), ("run-1", 1, {"student.distill.weight": 1.0}),
        ("run-2", 0, {"student.distill.weight": 10.0}), ("run-3", 1, {"student.distill.weight": 10.0}),
        ("run-4", 2, {"student.distill.weight": 1.0})]
    one, ten = report["settings"]
    assert (one["seeds"], one["left_out"], ten["seeds"]) == ([0, 1], 1, [0, 1])
    assert one["student_minus_baseline"]["per_seed"] == pytest.approx([0.2, 0.1])
    assert (ten["student_wins"], ten["ties"], ten["student_losses"]) == (1, 0, 1)
    alike = compare_runs(runs[:2])
    assert [setting["label"] for setting in alike["settings"]] == ["(one setting)"]


def test_the_paired_summary_keeps_the_keys_of_the_quickstart_benchmark_report():
    summary = paired_summary([paired_row(seed, {model: {"top1": top1} for model, top1 in zip(MODELS, scores)})
                              for seed, scores in enumerate([(0.8, 0.7, 0.5, 0.85), (0.7, 0.75, 0.3, 0.72)])])
    assert summary["student_minus_baseline"]["per_seed"] == pytest.approx([0.2, 0.45])
    assert {"mean", "stdev", "min", "max"} <= set(summary["student_minus_baseline"])
    assert summary["student_wins"] == 2 and summary["gap_closed"]["per_seed"] == pytest.approx([2 / 3, 0.45 / 0.4])
    assert summary["ensemble_minus_teacher"]["per_seed"] == pytest.approx([0.05, 0.02])


def test_the_figure_draws_each_seed_and_each_settings_mean_with_its_interval(study, tmp_path):
    report = compare_study(study)
    axes = comparison_figure(report).axes[0]
    dots = [collection.get_offsets()[:, 1].tolist() for collection in axes.collections
            if isinstance(collection, PathCollection)]
    assert dots == [pytest.approx([20, 0, 25, -10]), pytest.approx([40])]  # percentage points
    first, second = axes.containers
    low, high = report["settings"][0]["student_minus_baseline"]["interval"]
    [bar] = first.lines[2][0].get_segments()
    assert bar[:, 1].tolist() == pytest.approx([100 * low, 100 * high])
    assert second.lines[2] == () and second.lines[0].get_ydata().tolist() == pytest.approx([40])  # one seed: no bar
    assert [label.get_text() for label in axes.get_xticklabels()] == [
        "student.distill.weight=1\n4 seeds", "student.distill.weight=10\n1 seed, 3 left out"]
    path = write_figure(report, tmp_path / "figure.png")
    assert path.read_bytes().startswith(b"\x89PNG")


def test_compare_prints_a_studys_tables_and_writes_its_figure_beside_study_json(study, monkeypatch):
    monkeypatch.setattr(cli.console, "width", 250)
    result = CliRunner().invoke(cli.main, ["compare", "study", "--workdir", str(study.parents[1])])
    assert result.exit_code == 0, result.output
    assert (study / FIGURE_NAME).read_bytes().startswith(b"\x89PNG")
    assert "failed: RuntimeError: out of memory" in result.output and "running" in result.output
    assert "2/1/1" in result.output and "none (one seed)" in result.output and "Student t" in result.output


def test_compare_json_prints_the_whole_report_of_runs_given_by_directory_and_draws_only_when_asked(study, tmp_path):
    runs = [str(study / "seed-0" / "student.distill.weight-1"), str(study / "seed-1" / "student.distill.weight-1")]
    result = CliRunner().invoke(cli.main, ["compare", *runs, "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert "figure" not in report and not (study / FIGURE_NAME).exists()
    [setting] = report["settings"]
    assert setting["seeds"] == [0, 1] and setting["student_minus_baseline"]["per_seed"] == pytest.approx([0.2, 0.0])
    drawn = CliRunner().invoke(cli.main, ["compare", *runs, "--json", "--figure", str(tmp_path / "runs.png")])
    assert json.loads(drawn.output)["figure"] == str(tmp_path / "runs.png") and (tmp_path / "runs.png").is_file()
