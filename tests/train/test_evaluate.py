import numpy as np
import pytest
import torch
from click.testing import CliRunner

from d3d_cluster.cli import main
from d3d_cluster.train.evaluate import Predictions, ensemble_report, gather_predictions, softmax

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


ENSEMBLE_KEYS = np.array(["a", "b", "c", "d"])
LABELS = np.array([0, 1, 2, 0])


def _stage(directory, logits) -> str:
    directory.mkdir(parents=True)
    Predictions(ENSEMBLE_KEYS, np.array(logits, dtype=np.float32), LABELS).save(directory)
    return str(directory)


@pytest.fixture
def two_students(tmp_path):
    # Each student gets half the clips right, confidently; where it is wrong it is unsure, so the softmax
    # average follows whichever student is confident: the ensemble gets all four right.
    first = _stage(tmp_path / "seed0" / "student", [[5, 0, 0], [0, 5, 0], [0, 0.2, 0], [0, 0.1, 0]])
    second = _stage(tmp_path / "seed1" / "student", [[0, 0, 0.3], [0.2, 0, 0], [0, 0, 5], [5, 0, 0]])
    return first, second


def test_student_plus_student_ensemble_averages_softmax_scores(two_students):
    report = ensemble_report(two_students)
    assert report["members"] == {two_students[0]: 0.5, two_students[1]: 0.5}
    assert report["ensemble_top1"] == 1.0 and report["val_samples"] == 4


def test_members_evaluated_on_other_samples_are_refused(tmp_path, two_students):
    other = tmp_path / "other" / "student"
    other.mkdir(parents=True)
    Predictions(np.array(["a", "b", "c", "x"]), np.zeros((4, 3), np.float32), LABELS).save(other)
    with pytest.raises(ValueError, match=f"{other} and {two_students[0]} were evaluated on different samples"):
        ensemble_report([two_students[0], str(other)])


def test_ensemble_cli_prints_members_and_ensemble(two_students, tmp_path):
    result = CliRunner().invoke(main, ["ensemble", *two_students])
    assert result.exit_code == 0, result.output
    assert "50.0%" in result.output and "ensemble" in result.output and "100.0%" in result.output
    unfinished = tmp_path / "seed2" / "student"
    unfinished.mkdir(parents=True)
    result = CliRunner().invoke(main, ["ensemble", two_students[0], str(unfinished)])
    assert result.exit_code != 0 and "predictions.npz: no predictions" in result.output
