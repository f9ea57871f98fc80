"""Helpers for dataprep tests: tiny real videos, written where a dataset's layout puts them."""

from pathlib import Path

import cv2
import numpy as np
import pytest

from d3d_cluster.spec import PrepSpec
from dataprep.video import write_h264


def write_tiny_video(path: Path, frames: int = 8, size: tuple[int, int] = (32, 32), seed: int = 0) -> Path:
    """A texture drifting right by 1 px per frame: an H.264 video of `frames` frames at 25 fps."""
    rng = np.random.default_rng(seed)
    height, width = size
    texture = cv2.resize(rng.random((8, 8, 3)), (width + frames, height), interpolation=cv2.INTER_CUBIC)
    video = np.stack([texture[:, frames - i : frames - i + width] for i in range(frames)])
    path.parent.mkdir(parents=True, exist_ok=True)
    write_h264(path, np.clip(video * 255, 0, 255).astype(np.uint8), 25)
    return path


@pytest.fixture
def tiny_video():
    return write_tiny_video


@pytest.fixture
def small_prep():
    """Settings that prepare a tiny video in well under a second: Farneback flow, 32 px, 4 videos a shard."""
    def make(**fields) -> PrepSpec:
        return PrepSpec(**{"short_side": 32, "flow": {"algorithm": "farneback"}, "shard_samples": 4, "workers": 1, **fields})
    return make
