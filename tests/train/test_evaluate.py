import numpy as np
import pytest
import torch

from d3d_cluster.train.evaluate import gather_predictions, softmax

KEYS = ["c", "a", "b"]


def test_a_video_scores_the_mean_softmax_of_its_views_and_videos_come_out_sorted_by_key():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [3.0, 0.0], [0.0, 3.0], [1.0, 1.0], [0.0, 2.0]])
    samples, views = torch.tensor([0, 0, 1, 1, 2, 2]), torch.tensor([0, 1, 1, 0, 0, 1])
    labels = torch.tensor([0, 0, 1, 1, 1, 1])
    predictions = gather_predictions(samples, views, logits, labels, KEYS, views_per_video=2)
    assert predictions.keys.tolist() == ["a", "b", "c"]
    expected_c = (softmax(logits[:2].numpy()).mean(axis=0))
    assert np.allclose(softmax(predictions.logits)[2], expected_c)
    assert predictions.labels.tolist() == [1, 1, 0]
    assert predictions.top1() == pytest.approx(2 / 3)


def test_missing_or_repeated_views_are_errors_but_skipped_corrupt_videos_are_left_out():
    logits = torch.zeros(4, 2)
    samples, labels = torch.tensor([0, 0, 1, 1]), torch.zeros(4, dtype=torch.long)
    with pytest.raises(RuntimeError, match="missing views of 1 videos"):
        gather_predictions(samples, torch.tensor([0, 1, 0, 1]), logits, labels, KEYS, views_per_video=2)
    with pytest.raises(RuntimeError, match="read some views twice"):
        gather_predictions(samples, torch.tensor([0, 0, 0, 1]), logits, labels, KEYS, views_per_video=2)
    kept = gather_predictions(samples, torch.tensor([0, 1, 0, 1]), logits, labels, KEYS, views_per_video=2,
                              skipped=[2])
    assert kept.keys.tolist() == ["a", "c"]
