"""Validation predictions: gathered from every rank without duplicates, stored per stage, and scored.

Predictions are stored as logits per sample key, so that ensembles (the paper's student + teacher two-stream
score) are computed afterwards from the files, by averaging softmax scores of the same videos. Every score in
results.json (top-1, top-5, per-class accuracy, confusion) is computed from a `Predictions`, here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from d3d_cluster.collectives import gather_to_rank0
from d3d_cluster.data.pipeline import ClipLoader
from d3d_cluster.data.schema import Manifest
from d3d_cluster.files import replace_atomically
from d3d_cluster.rundir import SUMMARY_NAME, RunDir
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
    views: int  # views averaged into each video's score (eval_clips x eval_crops)
    skipped: np.ndarray = field(default_factory=lambda: np.array([], dtype=str))  # keys of videos not decoded

    def save(self, directory: Path) -> Path:
        def write(tmp: Path) -> None:
            with tmp.open("wb") as handle:  # a handle: given a name, savez would append ".npz"
                np.savez(handle, keys=self.keys, logits=self.logits, labels=self.labels, views=self.views,
                         skipped=self.skipped)

        return replace_atomically(directory / PREDICTIONS_NAME, write)

    @classmethod
    def load(cls, directory: Path) -> "Predictions":
        path = Path(directory) / PREDICTIONS_NAME
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no predictions (is {directory} a finished stage directory?)")
        with np.load(path) as data:
            missing = sorted({"keys", "logits", "labels", "views"} - set(data.files))
            if missing:
                raise ValueError(f"{path}: no {', '.join(missing)} array (written by an older version: evaluate again)")
            skipped = data["skipped"] if "skipped" in data.files else np.array([], dtype=str)
            return cls(data["keys"], data["logits"], data["labels"], int(data["views"]), skipped)

    @property
    def num_classes(self) -> int:
        return self.logits.shape[1]

    def top_k(self, k: int) -> float:
        """Videos whose label is among the k best scores; k is capped at the class count. A stable sort ranks
        tied scores by class index, as argmax does, so top_k(1) is the argmax's accuracy."""
        best = np.argsort(-self.logits, axis=1, kind="stable")[:, : min(k, self.num_classes)]
        return float((best == self.labels[:, None]).any(axis=1).mean())

    def top1(self) -> float:
        return self.top_k(1)

    def confusion(self) -> np.ndarray:
        """Video counts: rows are true classes, columns predicted ones."""
        matrix = np.zeros((self.num_classes, self.num_classes), dtype=np.int64)
        np.add.at(matrix, (self.labels, self.logits.argmax(axis=1)), 1)
        return matrix

    def report(self, classes: list[str]) -> dict:
        """The scores results.json holds for one model; a class without validation videos has accuracy None.
        Videos that could not be decoded are not scored: `top1` is over the scored ones, `top1_all_videos`
        counts the skipped ones as wrong, so that a damaged split cannot raise a score by losing videos."""
        if len(classes) != self.num_classes:
            raise ValueError(f"predictions have {self.num_classes} classes, the class list {len(classes)}")
        confusion = self.confusion()
        videos = confusion.sum(axis=1)
        per_class = {name: float(confusion[c, c] / videos[c]) if videos[c] else None for c, name in enumerate(classes)}
        correct = int(np.trace(confusion))
        return {"videos": len(self.keys), "skipped_videos": len(self.skipped), "skipped": self.skipped.tolist(),
                "views_per_video": self.views, "top1": self.top1(), "top5": self.top_k(5),
                "top1_all_videos": correct / (len(self.keys) + len(self.skipped)),
                "per_class": per_class, "confusion": confusion.tolist()}


def gather_predictions(samples: torch.Tensor, views: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor,
                       keys: list[str], views_per_video: int, skipped: list[int] = ()) -> Predictions | None:
    """All ranks call this; rank 0 gets one prediction per video, the others None.

    A video's score is the mean softmax over its views (the papers' multi-clip, multi-crop testing), stored as
    its log so that `logits` stays a valid logit array. Every view of every video must arrive exactly once,
    except videos some rank skipped as corrupt, which are left out and counted in the error if views are missing.
    """
    parts = gather_to_rank0((samples.numpy(), views.numpy(), logits.numpy(), labels.numpy(), list(skipped)))
    if parts is None:
        return None
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
        views=views_per_video,
        skipped=np.array(sorted(keys[s] for s in skipped_videos), dtype=str),
    )


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def ensemble(members: dict[str, Predictions]) -> Predictions:
    """The average softmax score of models evaluated on the same videos with the same views, stored as one
    model's predictions (the log of that average). A video one member could not decode (the teacher reads flow,
    the student RGB) is left out of the ensemble and counted as skipped."""
    (first_name, first), *others = members.items()
    split = set(first.keys) | set(first.skipped)
    for name, other in others:
        if set(other.keys) | set(other.skipped) != split:
            raise ValueError(f"{name} and {first_name} were evaluated on different samples: "
                             f"an ensemble needs the same validation split")
        if other.views != first.views:
            raise ValueError(f"{name} and {first_name} were evaluated with {other.views} and {first.views} views "
                             f"per video: an ensemble compares like with like")
    scored = set.intersection(*(set(member.keys) for member in members.values()))
    kept = {name: np.isin(member.keys, list(scored)) for name, member in members.items()}
    probabilities = np.mean([softmax(member.logits[kept[name]]) for name, member in members.items()], axis=0)
    return Predictions(first.keys[kept[first_name]], np.log(probabilities).astype(np.float32),
                       first.labels[kept[first_name]], first.views, np.array(sorted(split - scored), dtype=str))


def ensemble_report(stage_dirs: list[Path]) -> dict:
    """Members' and ensemble's top-1 for finished stage directories of any runs, as the D3D paper reports
    ensembles: student + teacher (two-stream), or student + student (two students trained with other seeds)."""
    if len(stage_dirs) < 2:
        raise ValueError("an ensemble needs at least two stage directories")
    members = {str(d): Predictions.load(Path(d)) for d in stage_dirs}
    combined = ensemble(members)
    return {"val_samples": len(combined.keys), "members": {name: p.top1() for name, p in members.items()},
            "ensemble_top1": combined.top1()}


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
                                  views_per_video=val.views_per_video, skipped=val.skipped_samples)
    finally:
        val.close()


def results_table(run_path: Path, stages: tuple[str, ...]) -> dict:
    """The run's results.json: each evaluated stage's scores and training throughput, and the two-stream
    ensemble's scores."""
    spec = RunDir(run_path).spec()
    classes = Manifest.load(spec.path(spec.data.shards)).classes
    summaries = {stage: json.loads((run_path / stage / SUMMARY_NAME).read_text()) for stage in stages}
    predictions = {stage: Predictions.load(run_path / stage) for stage in stages}
    models = {
        stage: {"input": STAGE_INPUT[stage], **predictions[stage].report(classes),
                "clips_per_second": summaries[stage]["clips_per_second"],
                "wall_seconds": summaries[stage]["wall_seconds"]}
        for stage in stages
    }
    if {"teacher", "student"} <= set(stages):
        two_stream = ensemble({"student": predictions["student"], "teacher": predictions["teacher"]})
        models["student+teacher"] = {"input": "rgb+flow", **two_stream.report(classes)}
    reference = next(iter(predictions.values()))
    return {"run": run_path.name, "val_samples": len(reference.labels), "views_per_video": reference.views,
            "classes": classes, "chance": 1.0 / len(classes), "models": models}
