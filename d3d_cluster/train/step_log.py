"""Rank 0's record of a stage's steps, written twice from the same records: train_log.jsonl (what `curves`,
`d3dc results` and `d3dc status` read) and TensorBoard event files beside it in `tb/`, so that
`tensorboard --logdir WORKDIR` shows every stage of every run as a run of its own (`runs/NAME/STAGE/tb`), each
record's fields as `train/FIELD` at its step, and the evaluated networks' top-1 as `eval/...` at their last step.

The train log's step numbers are the truth. A resumed stage has dropped the log's records past its checkpoint
(they are run again), so its event file starts with a purge at the step after that checkpoint: TensorBoard hides
every earlier file's events from that step on (its data server also drops a series' later points where a step
comes again), and shows no step twice.
"""

from __future__ import annotations

import json
from pathlib import Path

from torch.utils.tensorboard import SummaryWriter

from d3d_cluster.rundir import TENSORBOARD_NAME


class StepLog:
    """Appends step records (dicts with a `step`) to the train log at `path` and to the event files beside it;
    `resumed_at` is the last step the log keeps (0 for a fresh start)."""

    def __init__(self, path: Path, resumed_at: int):
        self.file = path.open("a")
        # A fresh start purges nothing: a purge at step 1 would also hide the points of any file read after it.
        self.board = SummaryWriter(path.parent / TENSORBOARD_NAME, purge_step=resumed_at + 1 if resumed_at else None)

    def write(self, records: list[dict]) -> None:
        self.file.write("".join(json.dumps(record) + "\n" for record in records))
        self.file.flush()
        for record in records:
            for field, value in record.items():
                if field != "step" and value is not None:  # a skipped step has no gradient norm
                    self.board.add_scalar(f"train/{field}", float(value), record["step"])
        self.board.flush()

    def close(self) -> None:
        self.file.close()
        self.board.close()


def add_evaluation(stage_dir: Path, step: int, scores: dict[str, float]) -> None:
    """Scores of a stage's trained network as `eval/NAME` in its TensorBoard run, at its last training step."""
    with SummaryWriter(stage_dir / TENSORBOARD_NAME) as board:
        for name, value in scores.items():
            board.add_scalar(f"eval/{name}", value, step)
