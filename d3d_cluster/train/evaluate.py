"""Validation predictions: gathered from every rank without duplicates, stored per stage, and scored.

Predictions are stored as logits per sample key, so that ensembles (the paper's student + teacher two-stream
score) are computed afterwards from the files, by averaging softmax scores of the same videos.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from d3d_cluster.files import replace_atomically

PREDICTIONS_NAME = "predictions.npz"


@dataclass
class Predictions:
    keys: np.ndarray  # (N,) str, sorted
    logits: np.ndarray  # (N, classes) float32
    labels: np.ndarray  # (N,) int64

    def save(self, directory: Path) -> Path:
        def write(tmp: Path) -> None:
            with tmp.open("wb") as handle:  # a handle: given a name, savez would append ".npz"
                np.savez(handle, keys=self.keys, logits=self.logits, labels=self.labels)

        return replace_atomically(directory / PREDICTIONS_NAME, write)

    @classmethod
    def load(cls, directory: Path) -> "Predictions":
        path = Path(directory) / PREDICTIONS_NAME
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no predictions (is {directory} a finished stage directory?)")
        with np.load(path) as data:
            return cls(data["keys"], data["logits"], data["labels"])

    def top1(self) -> float:
        return float((self.logits.argmax(axis=1) == self.labels).mean())


def gather_predictions(samples: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor,
                       keys: list[str]) -> Predictions | None:
    """All ranks call this; rank 0 gets every sample exactly once (ranks pad with repeats), others None."""
    local = (samples.numpy(), logits.numpy(), labels.numpy())
    if dist.is_available() and dist.is_initialized():
        parts: list = [None] * dist.get_world_size()
        dist.all_gather_object(parts, local)
        if dist.get_rank() != 0:
            return None
    else:
        parts = [local]
    all_samples = np.concatenate([p[0] for p in parts])
    unique, first = np.unique(all_samples, return_index=True)
    if len(unique) != len(keys):
        raise RuntimeError(f"evaluation saw {len(unique)} distinct samples of {len(keys)}")
    order = np.argsort([keys[i] for i in unique])
    first = first[order]
    return Predictions(
        keys=np.array([keys[i] for i in all_samples[first]]),
        logits=np.concatenate([p[1] for p in parts])[first],
        labels=np.concatenate([p[2] for p in parts])[first],
    )


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def ensemble_top1(*members: Predictions) -> float:
    """Top-1 of the average softmax score of several models over the same videos."""
    reference = members[0]
    for other in members[1:]:
        if not np.array_equal(other.keys, reference.keys):
            raise ValueError("ensemble members were evaluated on different samples")
    scores = sum(softmax(member.logits) for member in members)
    return float((scores.argmax(axis=1) == reference.labels).mean())


def ensemble_report(stage_dirs: list[Path]) -> dict:
    """Members' and ensemble's top-1 for finished stage directories of any runs, as the D3D paper reports
    ensembles: student + teacher (two-stream), or student + student (two students trained with other seeds)."""
    if len(stage_dirs) < 2:
        raise ValueError("an ensemble needs at least two stage directories")
    members = {str(d): Predictions.load(Path(d)) for d in stage_dirs}
    first, *others = members
    for other in others:
        if not np.array_equal(members[other].keys, members[first].keys):
            raise ValueError(f"{other} and {first} were evaluated on different samples: "
                             f"an ensemble needs the same validation split")
    return {"val_samples": len(members[first].keys), "members": {name: p.top1() for name, p in members.items()},
            "ensemble_top1": ensemble_top1(*members.values())}
