"""The evaluation job on 2 local ranks over a split whose views do not fill the last global step."""

import numpy as np
import pytest
import torch
from conftest import EVAL_VIEWS, EVALUATED_STAGES

from d3d_cluster.data.index import SampleTable
from d3d_cluster.data.schema import Manifest
from d3d_cluster.train.evaluate import Predictions, evaluate_stage


@pytest.mark.integration
def test_two_rank_evaluation_scores_every_validation_video_once_when_the_views_do_not_divide_evenly(evaluated_run,
                                                                                                     tiny_shards):
    run, output = evaluated_run
    spec = run.spec()
    manifest = Manifest.load(tiny_shards)
    table = SampleTable(*manifest.shard_paths(tiny_shards, "val"))
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
def test_results_json_scores_each_model_and_the_two_stream_ensemble(evaluated_run, tiny_shards):
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
