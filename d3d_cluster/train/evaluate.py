"""Validation predictions: gathered from every rank without duplicates, stored per stage, and scored.

Predictions are stored as logits per sample key, so that ensembles (the paper's student + teacher two-stream
score) are computed afterwards from the files, by averaging softmax scores of the same videos. Every score in
results.json (top-1, top-5, per-class accuracy, confusion) is computed from a `Predictions`, here.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
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
from d3d_cluster.train.step_log import add_evaluation

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


# Softmax scores (float32, 64 MiB) rank 0 takes in one gather at most. Each rank adds up its own views' scores per
# video and rank 0 adds those sums a block of videos at a time, so it holds one row per video, never every view's
# logits (Kinetics-700's 35k validation videos x 30 views x 700 classes are 2.9 GB of float32: BENCHMARKS).
SCORES_PER_GATHER = 1 << 24


def gather_predictions(samples: torch.Tensor, views: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor,
                       keys: Sequence[str], views_per_video: int, skipped: list[int] = ()) -> Predictions | None:
    """All ranks call this; rank 0 gets one prediction per video, the others None.

    A video's score is the mean softmax over its views (the papers' multi-clip, multi-crop testing), stored as
    its log so that `logits` stays a valid logit array. Every view of every video must arrive exactly once,
    except videos some rank skipped as corrupt, which are left out and counted in the error if views are missing.
    A video's views may lie on several ranks: only their sums travel (`SCORES_PER_GATHER`), and the ids of every
    view. Rank 0 checks the ids after the last gather, so no rank is left waiting in one.
    """
    ids = gather_to_rank0((samples.numpy(), views.numpy(), labels.numpy(), list(skipped)))
    scores = None if ids is None else _VideoScores(ids, keys, logits.shape[1])
    for parts in _gathered_score_sums(samples.numpy(), logits.numpy(), len(keys), views_per_video):
        if scores is not None:
            scores.add(parts)
    return None if scores is None else scores.predictions(views_per_video)


def _gathered_score_sums(samples: np.ndarray, logits: np.ndarray, videos: int, views_per_video: int):
    """For each block of videos, every rank's (videos it has views of, the float32 sum of those views' softmax
    scores) on rank 0, None on the others; every rank gathers the same blocks. The views of a block are at most
    block x views_per_video rows over all ranks."""
    order = np.argsort(samples, kind="stable")
    ordered = samples[order]
    block = max(1, SCORES_PER_GATHER // (views_per_video * logits.shape[1]))
    for first in range(0, videos, block):
        low, high = np.searchsorted(ordered, (first, first + block))
        present, starts = np.unique(ordered[low:high], return_index=True)
        view_scores = softmax(logits[order[low:high]])
        sums = np.add.reduceat(view_scores, starts, axis=0, dtype=np.float64) if len(starts) else view_scores
        yield gather_to_rank0((present, sums.astype(np.float32)))


class _VideoScores:
    """Rank 0's side of `gather_predictions`: the views' ids from every rank, and one row of summed scores per
    video it will report (float64, as the sums of up to views_per_video float32 scores)."""

    def __init__(self, ids: list[tuple], keys: Sequence[str], num_classes: int):
        self.keys = keys
        self.samples, self.views, self.labels = (np.concatenate([part[i] for part in ids]) for i in range(3))
        self.skipped = {int(s) for part in ids for s in part[3]}
        self.expected = sorted(set(range(len(keys))) - self.skipped)
        self.by_key = sorted(self.expected, key=lambda s: keys[s])
        self.row_of = np.full(len(keys), -1, dtype=np.int64)  # -1: a skipped video, not reported
        self.row_of[self.by_key] = np.arange(len(self.by_key))
        self.sums = np.zeros((len(self.by_key), num_classes), dtype=np.float64)

    def add(self, parts: list[tuple[np.ndarray, np.ndarray]]) -> None:
        for videos, sums in parts:  # a rank's videos are distinct, so one indexed add per rank is exact
            rows = self.row_of[videos]
            reported = rows >= 0
            self.sums[rows[reported]] += sums[reported]

    def predictions(self, views_per_video: int) -> Predictions:
        keys = self.keys
        pairs = self.samples * views_per_video + self.views
        if len(np.unique(pairs)) != len(pairs):
            raise RuntimeError("evaluation read some views twice")
        counts = np.bincount(self.samples, minlength=len(keys))
        incomplete = [keys[s] for s in self.expected if counts[s] != views_per_video]
        if incomplete:
            raise RuntimeError(f"evaluation is missing views of {len(incomplete)} videos, e.g. {incomplete[:3]}")
        label_of = np.zeros(len(keys), dtype=np.int64)
        label_of[self.samples] = self.labels
        mean = np.divide(self.sums, views_per_video, out=self.sums)
        return Predictions(
            keys=np.array([keys[s] for s in self.by_key]),
            logits=np.log(mean, out=mean).astype(np.float32),
            labels=label_of[self.by_key],
            views=views_per_video,
            skipped=np.array(sorted(keys[s] for s in self.skipped), dtype=str),
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


def add_results_to_tensorboard(run_path: Path, results: dict, stages: tuple[str, ...]) -> None:
    """The top-1 of each stage this run evaluated (not those a study's other run owns and reports) as `eval/top1` in
    its TensorBoard run, at its last training step, the student's with the two-stream ensemble's beside it
    (`eval/top1_two_stream`): every point of a study in one chart."""
    models = results["models"]
    for stage in stages:
        scores = {"top1": models[stage]["top1"]}
        if stage == "student" and "student+teacher" in models:
            scores["top1_two_stream"] = models["student+teacher"]["top1"]
        steps = json.loads((run_path / stage / SUMMARY_NAME).read_text())["steps"]
        add_evaluation(run_path / stage, steps, scores)
