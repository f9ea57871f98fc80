"""Rank 0's step log: the train log and TensorBoard's event files, written from the same records."""

import json
import time

from conftest import assert_tensorboard_shows_the_train_log, tensorboard_scalars

from d3d_cluster.rundir import TENSORBOARD_NAME, TRAIN_LOG_NAME
from d3d_cluster.train.step_log import StepLog, add_evaluation


def _records(steps: range, loss: float) -> list[dict]:
    return [{"step": step, "loss": loss + step / 10, "lr": 0.1, "grad_norm": None if step == 2 else 1.5,
             "skipped": step == 2} for step in steps]


def test_a_resumed_step_log_shows_each_step_once_with_the_values_logged_after_the_resume(tmp_path):
    first = StepLog(tmp_path / TRAIN_LOG_NAME, resumed_at=0)
    first.write(_records(range(1, 9), loss=1.0))  # killed at step 8; the checkpoint it resumes from is at step 5
    first.close()
    # As the resumed job cuts it: the records past the checkpoint are run again.
    (tmp_path / TRAIN_LOG_NAME).write_text("".join(json.dumps(r) + "\n" for r in _records(range(1, 6), loss=1.0)))

    # TensorBoard reads event files in name order, which starts with the second a file was made in: the resumed job
    # runs later, and so does this one (within one second the order would hang on a counter's digits).
    time.sleep(1.1)
    resumed = StepLog(tmp_path / TRAIN_LOG_NAME, resumed_at=5)
    resumed.write(_records(range(6, 10), loss=2.0))
    resumed.close()

    loss = tensorboard_scalars(tmp_path / TENSORBOARD_NAME)["train/loss"]
    assert [step for step, _ in loss] == list(range(1, 10))
    assert_tensorboard_shows_the_train_log(tmp_path)


def test_evaluation_scores_sit_at_the_stages_last_step_beside_its_training_curves(tmp_path):
    log = StepLog(tmp_path / TRAIN_LOG_NAME, resumed_at=0)
    log.write(_records(range(1, 4), loss=1.0))
    log.close()

    add_evaluation(tmp_path, 3, {"top1": 0.5, "top1_two_stream": 0.75})

    shown = tensorboard_scalars(tmp_path / TENSORBOARD_NAME)
    assert (shown["eval/top1"], shown["eval/top1_two_stream"]) == ([(3, 0.5)], [(3, 0.75)])
    assert_tensorboard_shows_the_train_log(tmp_path)
