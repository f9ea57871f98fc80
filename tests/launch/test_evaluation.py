"""The evaluation job on 2 local ranks over a split whose views do not fill the last global step."""

import numpy as np
import pytest
import torch
from conftest import EVAL_VIEWS, EVALUATED_STAGES, tensorboard_scalars

from d3d_cluster.data.index import SampleTable
from d3d_cluster.data.schema import Manifest
from d3d_cluster.train.evaluate import Predictions, evaluate_stage


@pytest.mark.integration
def test_two_rank_evaluation_scores_every_validation_video_once_when_the_views_do_not_divide_evenly(evaluated_run,
                                                                                                     tiny_shards):
    run, output = evaluated_run
    spec = run.spec()
    manifest = Manifest.load(tiny_shards)
    table = SampleTable.of_split(manifest, tiny_shards, "val")
    views = EVAL_VIEWS["eval_clips"] * EVAL_VIEWS["eval_crops"]
    assert len(table.keys) * views % (spec.world_size * spec.data.batch_size) != 0  # what this test is about
    label_of = {key: table.label(sample) for sample, key in enumerate(table.keys)}

    for stage in EVALUATED_STAGES:
        predictions = Predictions.load(run.path / stage)
        assert predictions.keys.tolist() == sorted(table.keys)
        assert predictions.labels.tolist() == [label_of[key] for key in predictions.keys]
        assert predictions.views == views
        # One process reading every view scores each video the same: no view was lost, doubled or given to
        # another video when the ranks' shares were gathered.
        alone = evaluate_stage(spec, run.path, stage, rank=0, world=1, device=torch.device("cpu"))
        np.testing.assert_allclose(predictions.logits, alone.logits, atol=1e-4)
        assert any(line.startswith(f"[eval] {stage}: top-1") for line in output)


@pytest.mark.integration
def test_results_json_and_tensorboard_score_each_model_and_the_two_stream_ensemble(evaluated_run, tiny_shards):
    import json

    run, _ = evaluated_run
    results = json.loads((run.path / "results.json").read_text())
    classes = Manifest.load(tiny_shards).classes
    assert (results["val_samples"], results["views_per_video"], results["classes"]) == (6, 6, classes)
    assert results["chance"] == pytest.approx(1 / 3)
    assert set(results["models"]) == {"teacher", "student", "student+teacher"}
    for name, row in results["models"].items():
        confusion = np.array(row["confusion"])
        assert confusion.shape == (3, 3) and confusion.sum() == row["videos"] == 6
        assert row["top1"] == pytest.approx(np.trace(confusion) / 6)
        assert row["top5"] == 1.0  # top-5 of 3 classes is top-3
        assert list(row["per_class"]) == classes
        for index, accuracy in enumerate(row["per_class"].values()):
            assert accuracy == pytest.approx(confusion[index, index] / confusion[index].sum())
    assert results["models"]["teacher"]["input"] == "flow" and results["models"]["student+teacher"]["input"] == "rgb+flow"
    assert results["models"]["student"]["clips_per_second"] == 11.0 and "clips_per_second" not in results["models"]["student+teacher"]
    for stage in EVALUATED_STAGES:
        assert results["models"][stage]["top1"] == pytest.approx(Predictions.load(run.path / stage).top1())
    # In each stage's TensorBoard run, at its last training step (6); the ensemble's in the student's.
    boards = {stage: tensorboard_scalars(run.path / stage / "tb") for stage in EVALUATED_STAGES}
    shown = {"teacher": boards["teacher"]["eval/top1"], "student": boards["student"]["eval/top1"],
             "student+teacher": boards["student"]["eval/top1_two_stream"]}
    assert shown == {name: [(6, pytest.approx(row["top1"]))] for name, row in results["models"].items()}


@pytest.mark.integration
def test_a_validation_video_the_student_cannot_decode_is_counted_as_skipped_not_dropped(tmp_path, tiny_shards):
    import shutil

    from conftest import TINY, finish_stage, tiny_spec

    from d3d_cluster.data.schema import RGB_EXT
    from d3d_cluster.launch.pipeline import run_evaluation
    from d3d_cluster.rundir import RunDir

    shards = tmp_path / "shards"
    shutil.copytree(tiny_shards, shards)
    table = SampleTable.of_split(Manifest.load(shards), shards, "val")
    victim, member = table.keys[0], table.members[0][RGB_EXT]
    with open(table.tars[member.tar], "r+b") as handle:  # same length: the index still holds
        handle.seek(member.offset)
        handle.write(b"\x00garbage" * (member.size // 8))
    table.close()
    run = RunDir.create(tiny_spec(tmp_path, name="damaged", data={**TINY["data"], "shards": str(shards)}))
    for seed, stage in enumerate(EVALUATED_STAGES):
        finish_stage(run, stage, seed)

    results = run_evaluation(run, EVALUATED_STAGES, echo=lambda line: None, poll_seconds=0.2)

    videos = len(table.keys)
    teacher, student, both = (results["models"][name] for name in ("teacher", "student", "student+teacher"))
    assert (teacher["videos"], teacher["skipped_videos"]) == (videos, 0)  # it reads flow, which is intact
    for model in (student, both):
        assert (model["videos"], model["skipped_videos"], model["skipped"]) == (videos - 1, 1, [victim])
        assert model["top1_all_videos"] == pytest.approx(model["top1"] * (videos - 1) / videos)
