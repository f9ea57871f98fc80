"""Which clip each rank reads, and how it is cut: pure functions of (seed, epoch, item).

Keeping the order and the augmentation out of DALI makes them reproducible and resumable: an epoch is a
permutation of the split's items (an item is one view of one video: one clip when training, each of the
clips x crops of a video when evaluating). Two ways of cutting steps from it:
- training (`rank_windows`): the epochs' orders, one after another, form one stream, and every step is a full window
  of world x batch items of it. An epoch's remainder opens the next epoch's first step, so no step is smaller
  (a small step's loss, BatchNorm statistics and update are noise), every clip is still used once per epoch in order,
  and only the last epoch's remainder, fewer items than a step, is left out;
- whole epochs (`rank_steps`: evaluation, the teacher's precompute pass, the probe): every item of an epoch exactly
  once, the last step smaller, and a remainder of fewer items than ranks joined to the last full step.
Either way, no rank takes more than `step_capacity(batch)` items in a step, and the resume position is how many
items of the epoch's order the world has consumed, whatever the number of ranks, so a run may resume on another
number of ranks (or another batch size) and still see every remaining item exactly once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np


def epoch_order(num_items: int, seed: int, epoch: int, shuffle: bool) -> np.ndarray:
    """The world's item order for one epoch."""
    if not shuffle:
        return np.arange(num_items)
    return np.random.default_rng([seed, epoch]).permutation(num_items)


def step_capacity(batch_size: int) -> int:
    """The most items a rank takes in one step of either plan: its batch, one more where the fewer-than-ranks
    remainder of a whole epoch joins its last step. The loader's pipelines are built for it."""
    return batch_size + 1


def global_steps(remaining: int, world: int, batch_size: int) -> list[int]:
    """How many items each global step of the rest of a whole epoch takes: every item exactly once.

    Full steps take world x batch items. A remainder of at least one item per rank makes a last, smaller step; a
    smaller one joins the last full step instead (a rank then gets one clip more than its batch), so every rank has
    a clip in every step and all ranks run the same steps.
    """
    if remaining == 0:
        return []
    if remaining < world:
        raise ValueError(f"{remaining} items cannot be shared among {world} ranks (fewer items than ranks)")
    full, rest = divmod(remaining, world * batch_size)
    sizes = [world * batch_size] * full
    if rest >= world or not sizes:
        sizes.append(rest)
    elif rest:
        sizes[-1] += rest
    return sizes


def rank_steps(order: np.ndarray, position: int, rank: int, world: int,
               batch_size: int) -> list[tuple[np.ndarray, int]]:
    """This rank's items for each remaining global step of a whole epoch, with the world position after the step.

    A step's items are dealt round-robin, so ranks' shares differ by at most one item.
    """
    steps, start = [], position
    for size in global_steps(len(order) - position, world, batch_size):
        steps.append((order[start : start + size][rank::world], start + size))
        start += size
    return steps


def window_count(items: int, epoch: int, position: int, end_epoch: int, world: int, batch_size: int) -> int:
    """Full training steps left from (epoch, position) to the end of `end_epoch - 1`."""
    return max(0, (end_epoch - epoch) * items - position) // (world * batch_size)


def rank_windows(orders: Callable[[int], np.ndarray], items: int, epoch: int, position: int, end_epoch: int,
                 rank: int, world: int, batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray, tuple[int, int]]]:
    """This rank's share of each remaining full training step: (each clip's epoch, its item, the world's (epoch,
    position) after the step). `orders(e)` is epoch e's order; every rank takes exactly `batch_size` items a step."""
    window = world * batch_size
    for _ in range(window_count(items, epoch, position, end_epoch, world, batch_size)):
        epochs, chosen = [], []
        needed = window
        while needed:
            taken = orders(epoch)[position : position + needed]
            epochs.append(np.full(len(taken), epoch))
            chosen.append(taken)
            needed -= len(taken)
            position += len(taken)
            if position == items:
                epoch, position = epoch + 1, 0
        yield np.concatenate(epochs)[rank::world], np.concatenate(chosen)[rank::world], (epoch, position)


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
