"""Every benchmark at its `--smoke` size, run as BENCHMARKS.md runs it (a module, from the repository root): a
change of API breaks one of these tests, not a benchmark found broken months later. The figures of a smoke run
mean nothing; what is checked is that it finishes and writes the report a reader of BENCHMARKS.md needs."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPOSITORY = Path(__file__).resolve().parents[2]


def run_benchmark(name: str, tmp_path: Path, *options: str) -> dict:
    """Runs `python -m benchmarks.NAME --smoke` and returns the JSON report it wrote."""
    out = tmp_path / f"{name}.json"
    done = subprocess.run([sys.executable, "-m", f"benchmarks.{name}", "--smoke", "--out", str(out), *options],
                          cwd=REPOSITORY, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads(out.read_text())


def test_the_dataprep_benchmark_runs_at_smoke_size_and_compares_tvl1_with_farneback(tmp_path):
    report = run_benchmark("dataprep", tmp_path)
    assert len(report["settings"]) == 3 and "farneback" in report["settings"]
    for result in report["settings"].values():
        assert result["videos"] == 2 and result["frames"] == 8 and result["frame_size"] == [32, 42]
        assert result["videos_per_second_per_core"] > 0 and result["videos_per_second_wall"] > 0
        assert 0 < result["flow_seconds_first_video"]
    assert len(report["tvl1_slowdown_vs_farneback"]) == 2
    assert all(slowdown > 0 for slowdown in report["tvl1_slowdown_vs_farneback"].values())


def test_the_loader_benchmark_runs_at_smoke_size_and_reports_both_loaders(tmp_path):
    report = run_benchmark("loader", tmp_path, "--workdir", str(tmp_path / "work"))
    assert set(report["results"]) == {"rgb", "rgb+flow"} and report["decoder"] == "cpu"
    for result in report["results"].values():
        assert len(result["dali_clips_per_second"]) == len(result["pyav_clips_per_second"]) == 1
        assert result["dali_median"] > 0 and result["pyav_median"] > 0
        assert result["ratio"] == pytest.approx(result["dali_median"] / result["pyav_median"])


def test_the_loader_benchmark_times_member_reads_under_an_injected_read_latency(tmp_path):
    report = run_benchmark("loader", tmp_path, "--workdir", str(tmp_path / "work"), "--no-baseline",
                           "--member-reads", "1", "4", "--read-latency-ms", "1")
    assert report["args"]["read_latency_ms"] == 1 and report["args"]["member_reads"] == [1, 4]
    for result in report["results"].values():
        assert set(result) == {"member_reads_1", "member_reads_4"}
        assert all(reads["dali_median"] > 0 for reads in result.values())


def test_the_inference_benchmark_runs_at_smoke_size_and_sets_the_student_against_two_stream(tmp_path,
                                                                                            evaluated_run):
    run, _ = evaluated_run
    report = run_benchmark("inference", tmp_path, "--run", str(run.path))
    [result] = report["results"]
    assert result["videos"] == 2 and result["clips_per_video"] == 1 and result["clip"] == [8, 24, 24]
    assert result["source_video"] == {"frames": 12, "height": 32, "width": 32}
    assert result["flow"]["algorithm"] == "farneback"
    seconds = result["seconds"]
    assert all(len(values) == 2 and min(values) > 0 for values in seconds.values())
    assert seconds["two_stream"] == pytest.approx([d + r + f + n for d, r, f, n in zip(
        seconds["decode_s"], seconds["rgb_network_s"], seconds["flow_s"], seconds["flow_network_s"])])
    assert result["two_stream_over_student"] == pytest.approx(result["medians"]["two_stream"] /
                                                              result["medians"]["student"])
    models = json.loads((run.path / "results.json").read_text())["models"]
    assert report["accuracy"]["student_top1"] == models["student"]["top1"]
    assert report["accuracy"]["two_stream_top1"] == models["student+teacher"]["top1"]


def test_the_metrics_overhead_benchmark_runs_at_smoke_size_and_relates_observing_to_a_step(tmp_path):
    report = run_benchmark("metrics_overhead", tmp_path)
    assert report["observe_step_seconds"] > 0 and report["scrape_seconds"] > 0 and report["train_step_seconds"] > 0
    assert report["observe_over_step"] == pytest.approx(report["observe_step_seconds"] / report["train_step_seconds"])


def test_the_loop_overhead_benchmark_runs_at_smoke_size_and_relates_the_loop_to_the_bare_step(tmp_path):
    report = run_benchmark("loop_overhead", tmp_path)
    assert report["setup"]["rounds"] == 2 and report["setup"]["loop_configurable"]
    assert [r["report_every"] for r in report["results"]] == [1, 2] and report["bare_step_median_us"] > 0
    for result in report["results"]:
        assert len(result["loop_step_us"]) == len(result["overhead_per_step_us"]) == 2
        assert result["overhead_per_step_us"] == pytest.approx(
            [loop - bare for loop, bare in zip(result["loop_step_us"], report["bare_step_us"])])


def test_the_model_step_benchmark_runs_at_smoke_size_and_times_teacher_and_student_steps(tmp_path):
    report = run_benchmark("model_step", tmp_path)
    [row] = report["results"]
    assert (row["width"], row["frames"], row["size"], row["batch"]) == (0.25, 8, 32, 2)
    for step in ("teacher", "student"):
        assert row[step]["clips_per_s"] > 0 and row["gmacs_per_clip"][step] > 0
    assert row["student_over_teacher_time"] > 0


@pytest.mark.integration
def test_the_precompute_benchmark_runs_at_smoke_size_and_trains_the_student_in_every_mode(tmp_path):
    report = run_benchmark("precompute", tmp_path, "--workdir", str(tmp_path / "work"))
    assert report["setup"]["repeats"] == 1 and report["setup"]["epochs"] == 1
    for mode in ("live", "precompute", "reused"):
        assert len(report["runs"][mode]) == 1
        assert report["medians"][mode]["clips_per_second"] > 0 and report["medians"][mode]["wall_seconds"] > 0
    assert report["medians"]["precompute"]["pass_seconds"] > 0
    assert all(ratio > 0 for ratio in [*report["ratios"].values(), *report["paired_ratio_medians"].values()])


@pytest.mark.integration
def test_the_quickstart_benchmark_runs_at_smoke_size_and_reports_every_model_paired_and_probed(tmp_path):
    report = run_benchmark("quickstart", tmp_path, "--workdir", str(tmp_path / "work"), "--probe",
                           "--set", "student.distill.weight=3", "--set", "probe.layers=[mixed_4f, mixed_5c]")
    assert report["seeds"] == [0] and report["chance"] == pytest.approx(1 / 3) and report["prep_seconds"] > 0
    assert set(report["models"]) == {"teacher", "student", "baseline", "student+teacher"}
    for name, model in report["models"].items():
        assert len(model["top1_per_seed"]) == 1 and 0 <= model["top1_mean"] <= 1
        if name != "student+teacher":
            assert model["wall_seconds_median"] > 0 and model["clips_per_second_median"] > 0
    top1 = {name: model["top1_per_seed"][0] for name, model in report["models"].items()}
    paired = report["paired"]
    assert paired["student_minus_baseline"]["per_seed"] == [pytest.approx(top1["student"] - top1["baseline"])]
    assert paired["student_wins"] == int(top1["student"] > top1["baseline"])
    assert paired["ensemble_minus_teacher"]["per_seed"] == [pytest.approx(top1["student+teacher"] - top1["teacher"])]
    assert set(report["probe"]) == {"mixed_4f", "mixed_5c"}
    for layer in report["probe"].values():
        assert all(layer[network]["mean"] > 0 for network in ("teacher", "student", "baseline"))
        assert layer["student_below_baseline"] in (0, 1)
    assert report["spec_changes"] == {"student.distill.weight": 3, "probe.layers": ["mixed_4f", "mixed_5c"]}
    assert report["spec"]["student"]["distill"]["weight"] == 3 and report["probe_settings"]["epochs"] == 1

    # The same command again resumes rather than repeats: the finished run and its probes are read back.
    run = tmp_path / "work" / "runs" / "quickstart" / "seed-0"  # the seeds are a study's points
    probes = {network: (run / network / "probe.json").stat().st_mtime_ns for network in ("teacher", "student", "baseline")}
    again = run_benchmark("quickstart", tmp_path, "--workdir", str(tmp_path / "work"), "--probe",
                          "--set", "student.distill.weight=3", "--set", "probe.layers=[mixed_4f, mixed_5c]")
    assert again["models"] == report["models"] and again["probe"] == report["probe"]
    submitted = [json.loads(line)["stage"] for line in (run / "events.jsonl").read_text().splitlines()
                 if json.loads(line)["event"] == "submitted"]
    assert sorted(submitted) == ["baseline", "eval", "student", "teacher"]
    assert probes == {network: (run / network / "probe.json").stat().st_mtime_ns for network in probes}

    # Another setting in the same runs is refused: its stages would resume from this setting's checkpoints.
    other = subprocess.run([sys.executable, "-m", "benchmarks.quickstart", "--smoke", "--out", str(tmp_path / "o.json"),
                            "--workdir", str(tmp_path / "work"), "--set", "student.distill.weight=4"],
                           cwd=REPOSITORY, capture_output=True, text=True, timeout=600)
    assert other.returncode != 0 and not (tmp_path / "o.json").exists()
    assert f"{run}/spec.yaml: the run 'quickstart/seed-0' was made with another spec" in other.stderr
    assert re.search(r"student.distill.weight: 3(\.0)? -> 4(\.0)? \(the student started with the old value\)",
                     other.stderr), other.stderr

    # ... and in runs of its own it retrains only what it changes: the teacher and the baseline are copied over.
    reusing = run_benchmark("quickstart", tmp_path, "--workdir", str(tmp_path / "other"), "--reuse",
                            str(tmp_path / "work"), "--set", "student.distill.weight=4")
    assert reusing["reused_stages"] == {"0": {"teacher": str(run), "baseline": str(run)}}
    for network in ("teacher", "baseline"):
        assert reusing["models"][network]["top1_per_seed"] == report["models"][network]["top1_per_seed"]
        log = "train_log.jsonl"  # not one step more: the copied stage resumed at its end
        assert (tmp_path / "other" / "runs" / "quickstart" / "seed-0" / network / log).read_text() == \
            (run / network / log).read_text()


@pytest.mark.integration
def test_the_fault_soak_runs_at_smoke_size_and_the_faulted_pipeline_ends_as_the_uninterrupted_one(tmp_path):
    from conftest import require
    from slurm_cluster import find_programs

    require(f"the soak's Slurm cluster needs {', '.join(missing)}" if (missing := find_programs()[1]) else None)
    report = run_benchmark("faults", tmp_path, "--workdir", str(tmp_path / "work"))
    assert report["survived"] and report["faults_by_kind"] == {kind: 1 for kind in report["faults_by_kind"]}
    assert all(report["comparison"]["weights_identical"].values())
    assert all(report["comparison"]["losses_identical"].values()) and report["comparison"]["scores_identical"]
    lost = report["steps_lost"]
    assert lost["preemption"] == lost["sigterm"] == [0] and lost["kill_rank"][0] >= 0
    corrupted = next(f for f in report["faults"] if f["kind"] == "corrupt_checkpoint")
    assert corrupted["resumed_from"] != corrupted["corrupted"]  # passed over the damaged checkpoint
    assert sum(report["requeues_by_cause"].values()) == len(report["faults"])


def test_the_scale_benchmark_runs_at_smoke_size_on_a_split_the_table_reads_and_gathers_before_and_after(tmp_path):
    report = run_benchmark("scale", tmp_path, "--workdir", str(tmp_path / "work"))
    assert report["startup"]["samples"] == {"train": 2000, "val": 300} and report["startup"]["total_seconds"] > 0
    assert report["tables"]["tables_bytes"] > 0 and report["plan"]["train_steps"] == 2000 // (4 * 8)
    before, after = report["eval"]["before"], report["eval"]["after"]
    assert before["videos"] == after["videos"] == 300 and before["gathers"] == 1 and after["gathers"] >= 2
    side = report["side_files"]["targets"]
    assert side["logits"]["bytes_per_clip"] == 20 * 4 and side["mixed_5c"]["shape"] == [1024, 8, 7, 7]
    assert set(report["meets"]) == set(report["targets"])
