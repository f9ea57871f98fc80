import numpy as np
import pytest
from click.testing import CliRunner

from d3d_cluster.cli import main
from d3d_cluster.train.evaluate import Predictions, ensemble_report

KEYS = np.array(["a", "b", "c", "d"])
LABELS = np.array([0, 1, 2, 0])


def _stage(directory, logits) -> str:
    directory.mkdir(parents=True)
    Predictions(KEYS, np.array(logits, dtype=np.float32), LABELS).save(directory)
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
