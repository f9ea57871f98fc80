"""Which clip each rank reads, and how it is cut: pure functions of (seed, epoch, item).

Keeping the order and the augmentation out of DALI makes them reproducible and resumable: an epoch is a
permutation of the split's items (an item is one view of one video: one clip when training, each of the
clips x crops of a video when evaluating), consumed front to back by the whole world in global steps. The
resume position is just how many items of that permutation the world has consumed, whatever the number of
ranks, so a run may resume on another number of ranks and still see every remaining item exactly once.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def epoch_order(num_items: int, seed: int, epoch: int, shuffle: bool) -> np.ndarray:
    """The world's item order for one epoch."""
    if not shuffle:
        return np.arange(num_items)
    return np.random.default_rng([seed, epoch]).permutation(num_items)


def global_steps(remaining: int, world: int, batch_size: int, min_per_rank: int = 1) -> list[int]:
    """How many items each global step of the rest of an epoch takes: every item exactly once.

    Full steps take world x batch items. A remainder of at least `min_per_rank` items per rank makes a last,
    smaller step; a smaller remainder joins the last full step instead (a rank then gets at most
    `min_per_rank` clips more than its batch), so no rank ever runs a step with fewer clips and all ranks run
    the same steps. Training asks for 2: BatchNorm cannot normalise a single clip.
    """
    if remaining == 0:
        return []
    if remaining < world:
        raise ValueError(f"{remaining} items cannot be shared among {world} ranks (fewer items than ranks)")
    full, rest = divmod(remaining, world * batch_size)
    sizes = [world * batch_size] * full
    if rest >= world * min_per_rank or not sizes:
        sizes.append(rest)
    elif rest:
        sizes[-1] += rest
    return sizes


def rank_steps(order: np.ndarray, position: int, rank: int, world: int, batch_size: int,
               min_per_rank: int = 1) -> list[tuple[np.ndarray, int]]:
    """This rank's items for each remaining global step of an epoch, with the world position after the step.

    A step's items are dealt round-robin, so ranks' shares differ by at most one item.
    """
    steps, start = [], position
    for size in global_steps(len(order) - position, world, batch_size, min_per_rank):
        steps.append((order[start : start + size][rank::world], start + size))
        start += size
    return steps


@dataclass(frozen=True)
class View:
    """Where a clip is cut from its video: first frame, crop box in pixels, mirrored or not."""

    start: int
    top: float
    left: float
    height: float
    width: float
    flip: bool


@dataclass(frozen=True)
class Geometry:
    """What views are cut to: the stored frames' size and the clips the model takes (videos differ in length)."""

    height: int
    width: int
    clip_frames: int
    stride: int  # temporal stride between the frames of a clip
    crop: int  # output side: clips are crop x crop

    @property
    def reach(self) -> int:
        """How far a clip's last frame lies after its first: it covers reach + 1 frames, and its flow looks one
        further (DataSpec.clip_span, reach + 2, is what a video must hold)."""
        return (self.clip_frames - 1) * self.stride

    def max_start(self, video_frames: int) -> int:
        """The last start frame whose clip, and the flow after its last frame, lie inside a video of
        `video_frames` RGB frames (flow has one fewer)."""
        last = video_frames - 2 - self.reach
        if last < 0:
            raise ValueError(f"a video of {video_frames} frames cannot hold a {self.clip_frames}-frame clip at "
                             f"stride {self.stride} (flow lies between frames)")
        return last


def train_view(geometry: Geometry, video_frames: int, seed: int, epoch: int, sample: int,
               area: tuple[float, float] | None, aspect: tuple[float, float], mirror: bool = True) -> View:
    """A random temporal crop anywhere in the video, a random (resized) spatial crop and, with `mirror`, a coin-flip
    mirror (the coin is drawn either way, so the other draws do not depend on it).

    With `area` None the box is crop x crop pixels (the plain random crop of S3D-G); otherwise its area is a
    uniform fraction of the frame's in `area` and its aspect ratio log-uniform in `aspect` (the
    Inception-style random resized crop), tried 10 times, then the largest centred square.
    """
    rng = np.random.default_rng([seed, epoch, sample, 1])
    start = int(rng.integers(0, geometry.max_start(video_frames) + 1))
    frame_h, frame_w = geometry.height, geometry.width
    height = width = float(geometry.crop)
    if area is not None:
        height = width = float(min(frame_h, frame_w))
        for _ in range(10):
            target = frame_h * frame_w * rng.uniform(*area)
            ratio = np.exp(rng.uniform(np.log(aspect[0]), np.log(aspect[1])))
            w, h = np.sqrt(target * ratio), np.sqrt(target / ratio)
            if w <= frame_w and h <= frame_h:
                height, width = float(h), float(w)
                break
    top = float(rng.uniform(0, frame_h - height)) if area is not None else float(rng.integers(0, frame_h - height + 1))
    left = float(rng.uniform(0, frame_w - width)) if area is not None else float(rng.integers(0, frame_w - width + 1))
    return View(start, top, left, height, width, flip=bool(rng.random() < 0.5) and mirror)


def eval_views(geometry: Geometry, video_frames: int, clips: int, crops: int) -> list[View]:
    """The papers' test-time views: `clips` temporal clips spread evenly over the video x `crops` crops along the
    long side."""
    last = geometry.max_start(video_frames)
    starts = np.linspace(0, last, clips).round().astype(int) if clips > 1 else [last // 2]
    side = geometry.crop
    spare_h, spare_w = geometry.height - side, geometry.width - side
    if crops == 1:
        boxes = [(spare_h // 2, spare_w // 2)]
    elif spare_w >= spare_h:
        boxes = [(spare_h // 2, left) for left in (0, spare_w // 2, spare_w)]
    else:
        boxes = [(top, spare_w // 2) for top in (0, spare_h // 2, spare_h)]
    return [View(int(start), float(top), float(left), float(side), float(side), False)
            for start in starts for top, left in boxes]
