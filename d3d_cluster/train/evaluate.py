"""Validation predictions: gathered from every rank without duplicates, stored per stage, and scored.

Predictions are stored as logits per sample key, so that ensembles (the paper's student + teacher two-stream
score) are computed afterwards from the files, by averaging softmax scores of the same videos.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from d3d_cluster.data.pipeline import ClipLoader
from d3d_cluster.data.schema import Manifest
from d3d_cluster.files import replace_atomically
from d3d_cluster.launch.rundir import SUMMARY_NAME
from d3d_cluster.models.weights import load_s3dg
from d3d_cluster.spec import Spec
from d3d_cluster.train.loop import predict
from d3d_cluster.train.stages import EXPORT_NAME, STAGE_INPUT, build_model

PREDICTIONS_NAME = "predictions.npz"


@dataclass
class Predictions:
    keys: np.ndarray  # (N,) str, sorted
    logits: np.ndarray  # (N, classes) float32: log of the mean softmax over the video's views
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


def gather_predictions(samples: torch.Tensor, views: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor,
                       keys: list[str], views_per_video: int, skipped: list[int] = ()) -> Predictions | None:
    """All ranks call this; rank 0 gets one prediction per video, the others None.

    A video's score is the mean softmax over its views (the papers' multi-clip, multi-crop testing), stored as
    its log so that `logits` stays a valid logit array. Every view of every video must arrive exactly once,
    except videos some rank skipped as corrupt, which are left out and counted in the error if views are missing.
    """
    local = (samples.numpy(), views.numpy(), logits.numpy(), labels.numpy(), list(skipped))
    if dist.is_available() and dist.is_initialized():
        parts: list = [None] * dist.get_world_size()
        dist.all_gather_object(parts, local)
        if dist.get_rank() != 0:
            return None
    else:
        parts = [local]
    all_samples, all_views, all_logits, all_labels = (np.concatenate([p[i] for p in parts]) for i in range(4))
    skipped_videos = {int(s) for p in parts for s in p[4]}
    pairs = all_samples * views_per_video + all_views
    if len(np.unique(pairs)) != len(pairs):
        raise RuntimeError("evaluation read some views twice")
    expected = sorted(set(range(len(keys))) - skipped_videos)
    counts = np.bincount(all_samples, minlength=len(keys))
    incomplete = [keys[s] for s in expected if counts[s] != views_per_video]
    if incomplete:
        raise RuntimeError(f"evaluation is missing views of {len(incomplete)} videos, e.g. {incomplete[:3]}")
    probabilities = np.zeros((len(keys), all_logits.shape[1]), dtype=np.float64)
    np.add.at(probabilities, all_samples, softmax(all_logits))
    label_of = np.zeros(len(keys), dtype=np.int64)
    label_of[all_samples] = all_labels
    by_key = sorted(expected, key=lambda s: keys[s])
    return Predictions(
        keys=np.array([keys[s] for s in by_key]),
        logits=np.log(probabilities[by_key] / views_per_video).astype(np.float32),
        labels=label_of[by_key],
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


def evaluate_stage(spec: Spec, run_path: Path, stage: str, rank: int, world: int,
                   device: torch.device) -> Predictions | None:
    """A trained stage's exported network on every view of the validation split, each rank reading its share;
    rank 0 gets the gathered predictions, the others None."""
    weights = run_path / stage / EXPORT_NAME
    if not weights.is_file():
        raise FileNotFoundError(f"{weights}: stage {stage} has not finished training")
    shards = spec.path(spec.data.shards)
    modality = STAGE_INPUT[stage]
    network = build_model(spec.model, modality, len(Manifest.load(shards).classes))
    load_s3dg(network, weights)
    network.to(device)
    val = ClipLoader(shards, "val", spec.data, modalities=(modality,), train=False, rank=rank, world=world,
                     seed=spec.seed, device_id=device.index if device.type == "cuda" else None)
    try:
        return gather_predictions(*predict(network, modality, val, device), keys=val.table.keys,
                                  views_per_video=len(val.views), skipped=val.skipped_samples)
    finally:
        val.close()


def results_table(run_path: Path, stages: tuple[str, ...]) -> dict:
    """The run's table: each evaluated stage's accuracy and training throughput, and the two-stream ensemble."""
    summaries = {stage: json.loads((run_path / stage / SUMMARY_NAME).read_text()) for stage in stages}
    predictions = {stage: Predictions.load(run_path / stage) for stage in stages}
    models = {
        stage: {"input": STAGE_INPUT[stage], "top1": predictions[stage].top1(),
                "clips_per_second": summaries[stage]["clips_per_second"], "wall_seconds": summaries[stage]["wall_seconds"]}
        for stage in stages
    }
    if {"teacher", "student"} <= set(stages):
        models["student+teacher"] = {"input": "rgb+flow",
                                     "top1": ensemble_top1(predictions["student"], predictions["teacher"])}
    reference = next(iter(predictions.values()))
    return {"run": run_path.name, "val_samples": len(reference.labels),
            "chance": 1.0 / reference.logits.shape[1], "models": models}
