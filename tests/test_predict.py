"""`d3dc predict` on raw video files, against the evaluation job's own prediction for the same videos: the same
views of the same frames (evaluation reads the shards; predict reads the source files and stores and decodes them as
the shards and the loader do). And at scale: folders, globs and CSV listings, rows written as videos finish, a run
killed halfway and resumed, PyTorch against onnxruntime."""

import csv
import json
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import TINY, finish_stage, tiny_spec

from d3d_cluster.cli import main
from d3d_cluster.data.index import SampleTable
from d3d_cluster.data.schema import META_EXT, Manifest
from d3d_cluster.launch.pipeline import run_evaluation
from d3d_cluster.predict import ExportedModel, score_videos
from d3d_cluster.predict_io import ResultsFile, list_videos
from d3d_cluster.rundir import RunDir
from d3d_cluster.train.evaluate import Predictions
from d3d_cluster.train.export import export_stage
from d3d_cluster.train.stages import EXPORT_NAME
from dataprep.video import read_video

CLASSES = {"down", "sideways", "up"}


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_shards):
    """A run of the tiny shards whose student finished with random weights (to be evaluated with 2 clips x the
    centre crop), exported with its ONNX file; and the source video of each validation sample."""
    workdir = tmp_path_factory.mktemp("predict")
    spec = tiny_spec(workdir, name="predict", data={**TINY["data"], "shards": str(tiny_shards), "eval_clips": 2,
                                                    "eval_crops": 1})
    run = RunDir.create(spec)
    network = finish_stage(run, "student", seed=3)
    table = SampleTable.of_split(Manifest.load(tiny_shards), tiny_shards, "val")
    sources = {key: tiny_shards.parent / "raw" / json.loads(bytes(table.read(i, META_EXT)))["source"]
               for i, key in enumerate(table.keys)}
    table.close()
    # Random weights with BatchNorm statistics of noise score every video alike. Statistics of these videos'
    # clips up to Mixed_4f (and a larger classifier) make the scores follow the input, so that a wrong frame, crop
    # or normalisation in predict shows. Not in Mixed_5b/5c: statistics of a dozen 1x1 maps there amplify fp32
    # rounding until PyTorch itself is 1e-4 of a logit from float64, and no other runtime could match it.
    clips = torch.cat([ExportedModel(network, [], spec, torch.device("cpu")).clips(*read_video(path), 2)
                       for path in sources.values()])
    for name, layer in network.base.named_children():
        for module in layer.modules():
            if isinstance(module, torch.nn.BatchNorm3d):
                module.reset_running_stats()
                module.momentum = None  # a cumulative average over the passes
        layer.train()
        if name == "mixed_4f":
            break
    with torch.no_grad():
        network(clips)
        network.classifier.weight *= 30
    torch.save(network.state_dict(), run.path / "student" / EXPORT_NAME)
    export_stage(run, "student", workdir / "export", onnx=True)
    return run, workdir / "export", sources


@pytest.fixture
def videos(exported, tmp_path):
    """The validation videos copied into a folder, with a file that is no video beside them."""
    folder = tmp_path / "videos"
    folder.mkdir()
    for source in exported[2].values():
        shutil.copy(source, folder / source.name)
    (folder / "broken.mp4").write_bytes(b"not a video")
    return folder


@pytest.mark.integration
def test_predict_on_the_source_videos_agrees_with_the_evaluation_of_their_shards(exported):
    run, export, sources = exported
    run_evaluation(run, ("student",), echo=lambda line: None, poll_seconds=0.2)
    evaluated = Predictions.load(run.path / "student")
    model = ExportedModel.load(export)
    for key, logits in zip(evaluated.keys, evaluated.logits):
        probabilities = model.probabilities(sources[str(key)], clips=2)
        assert np.abs(probabilities - np.exp(logits)).max() < 1e-4, key
        assert probabilities.argmax() == logits.argmax(), key


def test_d3dc_predict_prints_the_top_classes_and_json_lines_and_names_a_video_it_cannot_read(exported, videos):
    _, export, _ = exported
    first, second = sorted(videos.glob("*_*.mp4"))[:2]
    broken = videos / "broken.mp4"
    runner = CliRunner()

    shown = runner.invoke(main, ["predict", str(export), str(first), "--clips", "2", "--top", "2"])
    assert shown.exit_code == 0, shown.output
    assert first.name in shown.stdout and "probability" in shown.stdout

    as_json = runner.invoke(main, ["predict", str(export), str(first), str(second), str(broken), "--json",
                                   "--top", "3"])
    assert as_json.exit_code == 1
    rows = [json.loads(line) for line in as_json.stdout.splitlines()]
    assert [row["path"] for row in rows] == [str(first), str(second), str(broken)]
    for row in rows[:2]:
        assert row["clips"] == 10 and row["error"] is None
        assert len(row["top"]) == 3 and {entry["class"] for entry in row["top"]} == CLASSES
        assert sum(entry["probability"] for entry in row["top"]) == pytest.approx(1.0, abs=1e-5)
    assert str(broken) in rows[2]["error"] and rows[2]["top"] == [] and rows[2]["clips"] == 0
    assert "2 videos scored, 1 unreadable" in as_json.stderr


@pytest.mark.parametrize("given", ["folder", "glob", "csv"])
def test_predict_scores_a_folder_a_glob_or_a_csv_into_a_file_naming_and_counting_the_unreadable(exported, videos,
                                                                                                given):
    _, export, sources = exported
    if given == "csv":
        listing = videos / "listing.csv"
        listing.write_text("path,label\n" + "".join(f"{p.name},x\n" for p in sorted(videos.glob("*.mp4"))))
        argument = str(listing)
    else:
        argument = str(videos) if given == "folder" else str(videos / "*.mp4")
    out = videos.parent / "rows.csv"
    result = CliRunner().invoke(main, ["predict", str(export), argument, "--clips", "2", "--out", str(out),
                                       "--batch", "3"])
    assert result.exit_code == 1, result.output
    rows = list(csv.DictReader(out.open()))
    assert sorted(row["path"] for row in rows) == sorted(str(p) for p in videos.glob("*.mp4"))
    broken = next(row for row in rows if row["path"].endswith("broken.mp4"))
    assert "unreadable video" in broken["error"] and broken["class_1"] == ""
    scored = [row for row in rows if row is not broken]
    assert len(scored) == len(sources)
    assert all(row["error"] == "" and row["clips"] == "2" and row["class_1"] in CLASSES for row in scored)
    assert f"{len(sources)} videos scored, 1 unreadable" in result.stderr and "broken.mp4" in result.stderr


def test_predict_writes_each_row_as_its_video_finishes_and_resume_skips_those_of_a_killed_run(exported, videos,
                                                                                              tmp_path):
    _, export, sources = exported
    many = tmp_path / "many"
    many.mkdir()
    for copy in range(4):  # enough videos that the run is still going when it is killed
        for source in sources.values():
            shutil.copy(source, many / f"{copy}-{source.name}")
    out = tmp_path / "rows.jsonl"
    command = [sys.executable, "-m", "d3d_cluster.cli", "predict", str(export), str(many), "--clips", "2",
               "--batch", "1", "--workers", "1", "--out", str(out)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not (out.exists() and out.read_text().count("\n") >= 2):
        assert process.poll() is None and time.monotonic() < deadline, process.stderr.read().decode()[-2000:]
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL
    process.stderr.close()
    before = out.read_text().splitlines()
    assert 2 <= len(before) < 4 * len(sources)
    assert all(json.loads(line)["top"] for line in before)

    result = CliRunner().invoke(main, ["predict", str(export), str(many), "--clips", "2", "--out", str(out),
                                       "--resume"])
    assert result.exit_code == 0, result.output
    after = out.read_text().splitlines()
    assert after[: len(before)] == before
    assert sorted(json.loads(line)["path"] for line in after) == sorted(str(p) for p in many.glob("*.mp4"))
    assert f"; {len(before)} already in {out}, skipped" in result.stderr

    again = CliRunner().invoke(main, ["predict", str(export), str(many), "--out", str(out)])
    assert again.exit_code != 0 and f"{out} exists: pass --resume to continue it" in again.output


def test_the_torch_and_onnx_backends_give_the_same_top_classes(exported):
    _, export, sources = exported
    videos = [str(path) for path in sources.values()]
    by_torch = list(score_videos(ExportedModel.load(export), videos, clips=2, batch_clips=4))
    by_onnx = list(score_videos(ExportedModel.load(export, backend="onnx"), videos, clips=2, batch_clips=4))
    assert [s.video for s in by_torch] == [s.video for s in by_onnx] == videos
    for torch_scored, onnx_scored in zip(by_torch, by_onnx):
        assert list(np.argsort(-torch_scored.probabilities)) == list(np.argsort(-onnx_scored.probabilities))
        assert np.abs(torch_scored.probabilities - onnx_scored.probabilities).max() < 1e-5


def test_scores_of_videos_batched_together_are_those_of_each_video_alone(exported):
    _, export, sources = exported
    model = ExportedModel.load(export)
    videos = [str(path) for path in sources.values()][:3]
    together = list(score_videos(model, videos, clips=2, batch_clips=len(videos) * 2))
    assert [scored.video for scored in together] == videos
    for scored in together:
        assert np.abs(scored.probabilities - model.probabilities(scored.video, clips=2)).max() < 1e-5


def test_predict_refuses_a_flow_network_saying_why(tmp_path):
    (tmp_path / "model.json").write_text(json.dumps({"stage": "teacher", "input": {"modality": "flow"}}))
    with pytest.raises(ValueError, match="reads flow; predict runs an RGB network"):
        ExportedModel.load(tmp_path)


def test_videos_are_listed_from_folders_globs_and_csvs_each_once_in_order(tmp_path):
    (tmp_path / "a" / "deep").mkdir(parents=True)
    for name in ("a/2.mp4", "a/deep/1.MKV", "a/notes.txt", "b.avi"):
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "list.csv").write_text("label,path\nx,b.avi\ny,a/2.mp4\n")
    found = list_videos([str(tmp_path / "a"), str(tmp_path / "*.avi"), str(tmp_path / "list.csv"), "missing.mp4"])
    assert found == [str(tmp_path / "a/2.mp4"), str(tmp_path / "a/deep/1.MKV"), str(tmp_path / "b.avi"),
                     "missing.mp4"]
    with pytest.raises(ValueError, match=r"\*.webm: the pattern matches no file"):
        list_videos([str(tmp_path / "*.webm")])
    (tmp_path / "bad.csv").write_text("video\nb.avi\n")
    with pytest.raises(ValueError, match="bad.csv: a CSV of videos needs a `path` column"):
        list_videos([str(tmp_path / "bad.csv")])


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_a_results_file_resumed_drops_a_row_cut_short_and_keeps_its_columns(tmp_path, suffix):
    path = tmp_path / f"rows{suffix}"
    row = {"path": "a.mp4", "clips": 2, "top": [{"class": "up", "probability": 0.75}], "error": None}
    with ResultsFile(path, top_k=1) as results:
        results.write(row)
        results.write({**row, "path": "b.mp4", "top": [], "clips": 0, "error": "b.mp4: unreadable"})
    whole = path.read_text()
    with path.open("a") as handle:
        handle.write(whole.splitlines()[-1][:5])  # the row being written when the run was killed
    with ResultsFile(path, top_k=1, resume=True) as results:
        assert results.done == {"a.mp4", "b.mp4"}
    assert path.read_text() == whole
    if suffix == ".csv":
        assert whole.splitlines()[:2] == ["path,class_1,probability_1,clips,error", "a.mp4,up,0.75,2,"]
        with pytest.raises(ValueError, match="resume with the --top it was written with"):
            ResultsFile(path, top_k=2, resume=True)
    with pytest.raises(FileExistsError, match="pass --resume to continue it"):
        ResultsFile(path, top_k=1)
