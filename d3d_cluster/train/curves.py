"""Training curves of a run (`RUN/curves.png`): loss, training accuracy and throughput against step, one line
per stage, read from each stage's train_log.jsonl.

Long runs have thousands of steps whose per-batch accuracy is noisy, so each line is a running mean over
1/50 of its stage's steps (the legend says over how many); short runs are drawn as logged.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from d3d_cluster.files import replace_atomically
from d3d_cluster.rundir import TRAIN_LOG_NAME
from d3d_cluster.train.stages import STAGES

CURVES_NAME = "curves.png"
PANELS = {"loss": "loss", "accuracy": "training top-1 (rank 0's batch)", "clips_per_second": "clips/s (all ranks)"}
POINTS_PER_LINE = 50


def read_train_log(path: Path) -> list[dict]:
    """The step records of a train_log.jsonl. A last line without its newline is still being written and is
    left out; any other line that is not JSON is an error naming the file and line."""
    *complete, _unfinished = path.read_text().split("\n")
    records = []
    for number, line in enumerate(complete, start=1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}:{number}: not a JSON step record ({error})") from None
    return records


def run_train_logs(run_path: Path) -> dict[str, list[dict]]:
    """Each stage's step records, for the stages of the run that have a train log."""
    logs = {stage: read_train_log(run_path / stage / TRAIN_LOG_NAME) for stage in STAGES
            if (run_path / stage / TRAIN_LOG_NAME).is_file()}
    if not logs:
        raise FileNotFoundError(f"{run_path}: no stage has a {TRAIN_LOG_NAME} "
                                f"(looked in {', '.join(str(run_path / stage) for stage in STAGES)})")
    return logs


def curves_figure(logs: dict[str, list[dict]]) -> Figure:
    """One row of panels (`PANELS`); a stage whose records lack a panel's key (older logs) is not drawn there."""
    figure = Figure(figsize=(5 * len(PANELS), 4), layout="constrained")
    FigureCanvasAgg(figure)
    for axes, (key, title) in zip(figure.subplots(1, len(PANELS)), PANELS.items()):
        for stage, records in logs.items():
            points = [(record["step"], record[key]) for record in records if key in record]
            if not points:
                continue
            steps, values = np.array(points, dtype=np.float64).T
            window = max(1, len(values) // POINTS_PER_LINE)
            smoothed = np.convolve(values, np.ones(window) / window, mode="valid")
            label = stage if window == 1 else f"{stage} (mean of {window} steps)"
            axes.plot(steps[window - 1 :], smoothed, label=label)
        axes.set_title(title)
        axes.set_xlabel("step")
        axes.grid(alpha=0.3)
        if axes.lines:
            axes.legend()
    return figure


def write_curves(run_path: Path) -> Path:
    figure = curves_figure(run_train_logs(run_path))
    return replace_atomically(run_path / CURVES_NAME, lambda tmp: figure.savefig(tmp, format="png", dpi=100))
