import csv
from collections import Counter

import numpy as np

from d3d_cluster.spec import SyntheticSpec
from dataprep.synthetic import CLASSES, DIRECTIONS, MOTIONS, dot_tracks, make_motion_dataset, object_track
from dataprep.video import read_video

TINY = SyntheticSpec(classes=3, videos_per_class=5, frames=6, size=32, val_fraction=0.4)


def _rows(labels):
    with open(labels, newline="") as handle:
        return list(csv.reader(handle))


def test_same_seed_makes_the_same_dataset_and_another_seed_a_different_one(tmp_path):
    first = make_motion_dataset(TINY, tmp_path / "a", seed=3)
    again = make_motion_dataset(TINY, tmp_path / "b", seed=3)
    other = make_motion_dataset(TINY, tmp_path / "c", seed=4)
    assert first.read_text() == again.read_text()
    for (path, _, _) in _rows(first)[1:]:
        frames, _ = read_video(first.parent / path)
        assert np.array_equal(frames, read_video(again.parent / path)[0])
        assert not np.array_equal(frames, read_video(other.parent / path)[0])


def test_labels_csv_lists_every_video_relative_to_itself_with_splits_stratified_per_class(tmp_path):
    labels = make_motion_dataset(TINY, tmp_path / "raw", seed=0)
    header, *rows = _rows(labels)
    assert header == ["path", "label", "split"] and len(rows) == 15
    assert {label for _, label, _ in rows} == set(CLASSES[:3])
    assert Counter((label, split) for _, label, split in rows) == {
        (label, split): count for label in CLASSES[:3] for split, count in (("train", 3), ("val", 2))
    }
    for path, _, _ in rows:
        frames, fps = read_video(labels.parent / path)
        assert not path.startswith("/") and frames.shape == (6, 32, 32, 3) and fps == 25


def _pooled_frame_states(label, videos=1500, frames=8, size=64):
    """Per-frame object state of many videos, pooled over frames: what one random frame shows."""
    rng = np.random.default_rng(0)
    motions = MOTIONS[label]
    tracks = [object_track(rng, motions[rng.integers(len(motions))], frames, size) for _ in range(videos)]
    centre = np.concatenate([t["centre"] for t in tracks])
    return {
        "x": centre[:, 0] / size,
        "y": centre[:, 1] / size,
        "angle": np.concatenate([t["angle"] for t in tracks]) / (2 * np.pi),
        "log_radius": np.log(np.concatenate([t["radius"] for t in tracks])),
    }


def test_a_single_frame_shows_the_same_object_state_distribution_for_every_class():
    states = {label: _pooled_frame_states(label) for label in CLASSES}
    quantiles = np.linspace(0.1, 0.9, 9)
    for name in ("x", "y", "angle"):  # uniform for every class: nothing to read off one frame
        for label in CLASSES:
            assert np.allclose(np.quantile(states[label][name], quantiles), quantiles, atol=0.03), (name, label)
    reference = np.quantile(states["up"]["log_radius"], quantiles)
    for label in CLASSES:
        assert np.allclose(np.quantile(states[label]["log_radius"], quantiles), reference, atol=0.03), label


def test_classes_differ_in_how_objects_move():
    rng = np.random.default_rng(1)
    for label, motions in MOTIONS.items():
        for dx, dy, spin, zoom in motions:
            track = object_track(rng, (dx, dy, spin, zoom), 8, 64)
            step = (np.diff(track["centre"], axis=0) + 32) % 64 - 32  # undo the wrap-around
            turn = (np.diff(track["angle"]) + np.pi) % (2 * np.pi) - np.pi
            assert np.all(np.sign(step) == (dx, dy)), label
            assert np.all(np.sign(turn) == spin) and np.all(np.sign(np.diff(track["radius"])) == zoom), label


def test_every_class_keeps_its_label_under_horizontal_mirroring():
    """The loader mirrors half the training clips; a mirrored clip must still show its own class."""
    for label, motions in MOTIONS.items():
        mirrored = {(-dx, dy, -spin, zoom) for dx, dy, spin, zoom in motions}
        assert mirrored == set(motions), label
        others = {m for other, ms in MOTIONS.items() if other != label for m in ms}
        assert not mirrored & others, label


DOTS = SyntheticSpec(kind="dots", classes=8, videos_per_class=2, frames=6, size=32, val_fraction=0.5)


def test_dots_dataset_has_one_class_per_compass_direction(tmp_path):
    labels = make_motion_dataset(DOTS, tmp_path / "raw", seed=0)
    _, *rows = _rows(labels)
    assert sorted({label for _, label, _ in rows}) == sorted(DIRECTIONS) and len(rows) == 16
    frames, _ = read_video(labels.parent / rows[0][0])
    assert frames.shape == (6, 32, 32, 3) and frames.std() > 10


def test_a_single_dots_frame_shows_uniform_dot_positions_for_every_class():
    quantiles = np.linspace(0.1, 0.9, 9)
    rng = np.random.default_rng(0)
    for label, direction in DIRECTIONS.items():
        positions = np.concatenate([dot_tracks(rng, direction, 8, 64).reshape(-1, 2) for _ in range(200)]) / 64
        for axis in (0, 1):
            assert np.allclose(np.quantile(positions[:, axis], quantiles), quantiles, atol=0.03), (label, axis)


def test_dots_drift_in_their_class_direction():
    rng = np.random.default_rng(1)
    for label, direction in DIRECTIONS.items():
        tracks = dot_tracks(rng, direction, 12, 64)
        step = (np.diff(tracks, axis=0) + 32) % 64 - 32  # undo the wrap-around
        step = step[np.linalg.norm(step, axis=2) < 5]  # leave out dots that reappeared elsewhere
        mean = step.mean(axis=0)
        heading = np.asarray(direction) / np.linalg.norm(direction)
        assert mean @ heading > 0.9 * np.linalg.norm(mean) > 0, label
