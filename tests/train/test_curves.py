import json

import numpy as np
import pytest

from d3d_cluster.train.curves import PANELS, curves_figure, read_train_log, run_train_logs, write_curves


def _log(path, records, unfinished: str = ""):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + unfinished)
    return path


def test_a_last_line_still_being_written_is_left_out_and_a_bad_line_is_named(tmp_path):
    log = _log(tmp_path / "train_log.jsonl", [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}], '{"step": 3, "lo')
    assert [r["step"] for r in read_train_log(log)] == [1, 2]
    log.write_text('{"step": 1}\nnot json\n{"step": 3}\n')
    with pytest.raises(ValueError, match=f"{log}:2: not a JSON step record"):
        read_train_log(log)


def test_one_panel_per_curve_with_one_line_per_stage_and_older_logs_left_out_where_they_lack_the_key():
    logs = {
        "teacher": [{"step": s, "loss": 3.0 - s, "accuracy": s / 4, "clips_per_second": 10.0 * s} for s in (1, 2, 3)],
        "student": [{"step": s, "loss": 5.0 - s} for s in (1, 2)],  # written before accuracy and clips/s were logged
    }
    figure = curves_figure(logs)
    panels = figure.axes
    assert [axes.get_title() for axes in panels] == list(PANELS.values())
    assert all(axes.get_xlabel() == "step" for axes in panels)
    loss, accuracy, throughput = ({line.get_label(): line for line in axes.lines} for axes in panels)
    assert set(loss) == {"teacher", "student"} and set(accuracy) == set(throughput) == {"teacher"}
    assert loss["student"].get_xdata().tolist() == [1, 2] and loss["student"].get_ydata().tolist() == [4.0, 3.0]
    assert accuracy["teacher"].get_ydata().tolist() == [0.25, 0.5, 0.75]
    assert throughput["teacher"].get_ydata().tolist() == [10.0, 20.0, 30.0]


def test_long_logs_are_drawn_as_a_running_mean_over_a_fiftieth_of_the_steps():
    records = [{"step": s, "loss": float(s % 2), "accuracy": 0.5, "clips_per_second": 1.0} for s in range(1, 201)]
    line = curves_figure({"baseline": records}).axes[0].lines[0]
    assert line.get_label() == "baseline (mean of 4 steps)"
    assert line.get_xdata()[0] == 4 and len(line.get_xdata()) == 197
    assert np.allclose(line.get_ydata(), 0.5)


def test_a_run_without_train_logs_is_refused_by_name_and_a_run_with_them_gets_a_png(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"{tmp_path}: no stage has a train_log.jsonl"):
        run_train_logs(tmp_path)
    _log(tmp_path / "teacher" / "train_log.jsonl", [{"step": 1, "loss": 1.0, "accuracy": 0.0, "clips_per_second": 3.0}])
    path = write_curves(tmp_path)
    assert path == tmp_path / "curves.png" and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
