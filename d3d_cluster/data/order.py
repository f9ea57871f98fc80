"""Which sample each rank reads, and how it is augmented: pure functions of (seed, epoch, sample).

Keeping the order and the augmentation out of DALI makes them reproducible and resumable: a batch is
fully described by its sample ids and the epoch, whatever the number of ranks or reader threads.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


def epoch_order(num_samples: int, seed: int, epoch: int, shuffle: bool) -> np.ndarray:
    """The world's sample order for one epoch."""
    if not shuffle:
        return np.arange(num_samples)
    return np.random.default_rng([seed, epoch]).permutation(num_samples)


def rank_batches(order: np.ndarray, rank: int, world: int, batch_size: int, drop_last: bool) -> list[np.ndarray]:
    """This rank's batches of an epoch.

    Training (`drop_last`) gives every rank the same number of full batches, so collectives never wait on a
    rank that ran dry; the few samples left over are different ones each epoch. Evaluation keeps every
    sample: ranks are padded by repeating samples from the start, and the caller drops duplicates by id.
    """
    if drop_last:
        per_rank = (len(order) // world) // batch_size * batch_size
        mine = order[rank::world][:per_rank]
    else:
        per_rank = math.ceil(len(order) / world)
        padded = np.resize(order, per_rank * world)
        mine = padded[rank::world]
    return [mine[start : start + batch_size] for start in range(0, len(mine), batch_size)]


@dataclass(frozen=True)
class View:
    """Where a clip is cut from its video and whether it is mirrored."""

    start: int  # first frame
    crop_x: float  # crop position, 0..1 of the free margin (DALI's crop_pos_x)
    crop_y: float
    flip: bool


def train_view(seed: int, epoch: int, sample: int, max_start: int) -> View:
    rng = np.random.default_rng([seed, epoch, sample, 1])
    return View(
        start=int(rng.integers(0, max_start + 1)),
        crop_x=float(rng.random()),
        crop_y=float(rng.random()),
        flip=bool(rng.random() < 0.5),
    )


def center_view(max_start: int) -> View:
    return View(start=max_start // 2, crop_x=0.5, crop_y=0.5, flip=False)
