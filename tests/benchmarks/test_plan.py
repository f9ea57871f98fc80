"""The cost plan (benchmarks/plan.py): it runs on the repository's own results, and its arithmetic holds on a small
fabricated results set whose answers can be worked out by hand."""

import json
import sys
from dataclasses import fields, replace
from pathlib import Path

import pytest

from benchmarks import plan
from benchmarks.plan import SOURCES, Assumptions, MissingInput, allreduce_seconds, make_plan

REPOSITORY = Path(__file__).resolve().parents[2]
SPEC = REPOSITORY / "jobs" / "kinetics400.yaml"
TVL1 = "tvl1 (jobs/: OpenCV defaults, 5 scales x 5 warps)"
GEOMETRY = {"width": 1.0, "frames": 64, "size": 224, "batch": 8}  # jobs/kinetics400.yaml's clips


def fabricate(folder: Path, teacher_step: float = 0.1, student_step: float = 0.2) -> Path:
    """The three results files the plan reads, with round figures: 63 s a 64-frame video, bare steps of
    `teacher_step` and `student_step`, real stage steps four times as long."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "dataprep.json").write_text(json.dumps({
        "load_average_1min_before_after": [1.0, 1.0],
        "settings": {TVL1: {"seconds_per_video": [63.0, 31.5, 126.0], "frames": 64, "frame_size": [256, 340]}}}))
    (folder / "model_step_h100.json").write_text(json.dumps({
        "machine": "a fabricated H100",
        "results": [{"precision": "bf16", **GEOMETRY, "batch": 16, "teacher": {"median_step_s": 9.0},
                     "student": {"median_step_s": 9.0}},
                    {"precision": "bf16", **GEOMETRY, "teacher": {"median_step_s": teacher_step},
                     "student": {"median_step_s": student_step}}]}))
    (folder / "data_wait_h100.json").write_text(json.dumps({
        "args": {"clip_frames": 64, "crop": 224, "batch": 8, "width": 1.0},
        "results": {"teacher": {"median_step_s": 4 * teacher_step}, "student": {"median_step_s": 4 * student_step}}}))
    return folder


def test_the_plan_runs_on_the_repository_results_and_names_the_source_of_every_figure(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(REPOSITORY)
    monkeypatch.setattr(sys, "argv", ["plan", "--out", str(tmp_path / "plan.json")])
    plan.main()
    printed = capsys.readouterr().out
    written = json.loads((tmp_path / "plan.json").read_text())
    assert [row["gpus"] for row in written["scales"]] == [8, 64, 512]
    for entry in written["inputs"]["measured"].values():
        assert entry["source"].split(":")[0] in {"dataprep.json", "model_step_h100.json", "data_wait_h100.json"}
        assert entry["source"] in printed
    assert all(f"- {name} = " in printed for name in SOURCES)
    assert written["inputs"]["from_the_code"]["parameters"] == {"teacher": 9_541_920, "student": 9_545_056}


def test_gpu_hours_are_the_clips_over_the_measured_clips_per_second_and_double_when_the_step_takes_twice_as_long(
        tmp_path):
    fast = make_plan(fabricate(tmp_path / "fast"), SPEC)
    slow = make_plan(fabricate(tmp_path / "slow", teacher_step=0.2), SPEC)
    # 60 epochs x 240k clips at 8 clips / 0.1 s = 80 clips/s: 50 GPU-hours at full efficiency.
    assert fast["stages"]["teacher"]["gpu_hours_ideal"]["step"] == pytest.approx(50.0)
    assert fast["stages"]["teacher"]["gpu_hours_ideal"]["stage"] == pytest.approx(200.0)
    assert slow["stages"]["teacher"]["gpu_hours_ideal"]["step"] == pytest.approx(100.0)
    for row in fast["scales"]:
        teacher = row["stages"]["teacher"]
        compute = row["accumulation"] * 0.1
        assert teacher["efficiency"]["step"] == pytest.approx(compute / (compute + teacher["allreduce_seconds"]))
        assert teacher["gpu_hours"]["step"] == pytest.approx(50.0 / teacher["efficiency"]["step"])
        assert teacher["wall_hours"]["step"] == pytest.approx(teacher["gpu_hours"]["step"] / row["gpus"])


def test_allreduce_time_doubles_when_bandwidth_halves_inside_a_node_and_across_nodes():
    no_latency = Assumptions(nvlink_step_latency_us=0.0, infiniband_step_latency_us=0.0)
    halved = replace(no_latency, nvlink_bus_gb_s=no_latency.nvlink_bus_gb_s / 2,
                     nic_bus_gb_s=no_latency.nic_bus_gb_s / 2)
    gradients = 38e6
    for world in (8, 64, 512):
        assert allreduce_seconds(gradients, world, 8, halved) == pytest.approx(
            2 * allreduce_seconds(gradients, world, 8, no_latency))
    assert allreduce_seconds(gradients, 8, 8, no_latency) == pytest.approx(2 * 7 / 8 * gradients / 360e9)
    # 8 NICs of 40 GB/s a node: 320 GB/s between nodes, below NVLink's 360.
    assert allreduce_seconds(gradients, 64, 8, no_latency) == pytest.approx(2 * 63 / 64 * gradients / 320e9)
    # The latency term: 2(n-1) ring steps between nodes.
    assert allreduce_seconds(0.0, 512, 8, Assumptions()) == pytest.approx(2 * 511 * 10e-6)
    assert allreduce_seconds(gradients, 1, 8, Assumptions()) == 0.0


def test_prep_scales_the_measured_video_to_the_specs_frames_and_counts_every_video(tmp_path):
    prep = make_plan(fabricate(tmp_path), SPEC)["prep"]
    # 63 s for 63 flow pairs at 256x340 -> 249 s for the 249 pairs of a 10 s clip at 25 fps, same frame size.
    assert prep["scale_from_measured"] == pytest.approx(249 / 63)
    assert prep["core_hours"]["median"] == pytest.approx(260_000 * 249 / 3600)
    assert prep["core_hours"]["fastest"] == pytest.approx(prep["core_hours"]["median"] / 2)


def test_storage_of_teacher_outputs_follows_the_layer_shape_at_the_specs_clip_geometry(tmp_path):
    result = make_plan(fabricate(tmp_path), SPEC)
    per_clip = result["inputs"]["from_the_code"]["teacher_output_bytes_per_clip"]
    assert per_clip["logits"] == 400 * 4
    assert per_clip["mixed_5c"] == 1024 * 8 * 7 * 7 * 2  # float16 maps, T/8 x H/32 x W/32
    assert result["storage"]["teacher_outputs_bytes"]["mixed_5c"] == per_clip["mixed_5c"] * 240_000 * 61


def test_a_global_batch_the_world_cannot_share_is_raised_to_clips_a_gpu_times_gpus(tmp_path):
    scales = {row["gpus"]: row for row in make_plan(fabricate(tmp_path), SPEC)["scales"]}
    assert (scales[8]["global_batch"], scales[8]["accumulation"], scales[8]["spec_global_batch_fits"]) == (512, 8, True)
    assert (scales[64]["global_batch"], scales[64]["accumulation"]) == (512, 1)
    assert (scales[512]["global_batch"], scales[512]["accumulation"], scales[512]["spec_global_batch_fits"]) == (
        4096, 1, False)


def test_a_missing_results_file_or_key_is_named_in_the_error(tmp_path):
    results = fabricate(tmp_path)
    wait = json.loads((results / "data_wait_h100.json").read_text())
    del wait["results"]["student"]
    (results / "data_wait_h100.json").write_text(json.dumps(wait))
    with pytest.raises(MissingInput, match=r"data_wait_h100\.json: no key results\.student"):
        make_plan(results, SPEC)

    results = fabricate(tmp_path / "other-batch")
    steps = json.loads((results / "model_step_h100.json").read_text())
    steps["results"] = steps["results"][:1]  # only batch 16 measured
    (results / "model_step_h100.json").write_text(json.dumps(steps))
    with pytest.raises(MissingInput, match=r"model_step_h100\.json: no entry results\[precision=bf16, width=1\.0, "
                                           r"frames=64, size=224, batch=8\]"):
        make_plan(results, SPEC)

    (results / "dataprep.json").unlink()
    with pytest.raises(MissingInput, match=r"dataprep\.json: no such results file"):
        make_plan(results, SPEC)


def test_every_assumption_has_its_source():
    assert set(SOURCES) == {field.name for field in fields(Assumptions)}
