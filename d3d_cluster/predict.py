"""`d3dc predict`: an exported RGB network (the student, or the baseline) on raw video files. No optical flow is
computed: that is the point of D3D.

A video is read as dataprep reads a source video (any container and codec PyAV decodes), brought to the stored
geometry the network was trained on (the export's spec: frame rate, short side or frame size), encoded and decoded
as the shards and the loader do (VP9 at the spec's quality, DALI's CPU decoder), and cut into the evaluation's
views (`data.order.eval_views`: `clips` clips spread evenly over the video, the centre crop), each
normalised as the loader normalises RGB. The video's scores are the mean softmax over its clips, as evaluation
scores a validation video.

Over many videos (`score_videos`), threads read and cut the next videos while the network scores the clips of
several videos in one pass, through PyTorch or onnxruntime (the export's ONNX file).
"""

from __future__ import annotations

import json
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch
import yaml

from d3d_cluster.data.order import Geometry, View, eval_views
from d3d_cluster.data.pipeline import RGB_MEAN, RGB_STD, stored_geometry
from d3d_cluster.models import S3DG
from d3d_cluster.models.weights import load_s3dg
from d3d_cluster.spec import Spec
from d3d_cluster.train.engine import autocast, prepare_device

BACKENDS = ("torch", "onnx")


@dataclass
class ExportedModel:
    network: S3DG | None  # the torch backend's
    classes: list[str]
    spec: Spec
    device: torch.device
    session: object | None = None  # the onnx backend's onnxruntime session (on the CPU)

    @classmethod
    def load(cls, directory: str | Path, device: torch.device | None = None, backend: str = "torch",
             threads: int | None = None) -> "ExportedModel":
        """The network `d3dc export` wrote into `directory`, run by PyTorch on `device` (default: a GPU where there
        is one) or by onnxruntime on the CPU. `threads`: the CPU threads the network may use (default: every core;
        for PyTorch this sets the process's intra-op threads)."""
        directory = Path(directory)
        info_path = directory / "model.json"
        if not info_path.is_file():
            raise FileNotFoundError(f"{info_path}: not an export directory (make one with d3dc export RUN --stage "
                                    f"student)")
        info = json.loads(info_path.read_text())
        if info["input"]["modality"] != "rgb":
            raise ValueError(f"{directory}: the exported {info['stage']} reads {info['input']['modality']}; predict "
                             f"runs an RGB network (the student or the baseline), which needs no optical flow")
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r} (expected one of {', '.join(BACKENDS)})")
        spec = Spec.model_validate(yaml.safe_load((directory / "spec.yaml").read_text()))
        if backend == "onnx":
            from d3d_cluster.train.onnx_export import onnx_session

            if "onnx" not in info:
                raise FileNotFoundError(f"{directory}: no ONNX file in this export (export with --format onnx)")
            return cls(None, list(info["classes"]), spec, torch.device("cpu"),
                       onnx_session(directory / info["onnx"]["file"], threads))
        network = S3DG(**info["s3dg"])
        load_s3dg(network, directory / info["weights"]["torch"])
        if device is None:
            device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
        prepare_device(device, spec.model.precision)  # predictions in the precision the network was trained in
        if threads is not None:
            torch.set_num_threads(threads)
        return cls(network.to(device).eval(), list(info["classes"]), spec, device)

    def stored_frames(self, frames: np.ndarray, fps: float) -> np.ndarray:
        """A video given as (F, H, W, 3) RGB uint8 frames at `fps` as dataprep stores it: the spec's frame rate and
        geometry, looped to a clip's length when shorter (before the codec; flow is computed from these)."""
        from dataprep.video import fit_frames, loop_frames, resample_fps

        prep = self.spec.prep
        frames = fit_frames(resample_fps(frames, fps, prep.fps), prep.short_side,
                            tuple(prep.frame_size) if prep.frame_size else None)
        return loop_frames(frames, self.spec.data.clip_span)

    def rgb_clips(self, stored: np.ndarray, count: int) -> torch.Tensor:
        """(count, 3, T, S, S) normalised clips of stored frames, through the shards' codec and the loader's
        decoder: DALI's colour conversion and VP9's artifacts differ from PyAV's decode of the source by a few levels
        a pixel, which moved a network's scores by 0.1."""
        from dataprep.video import dali_decode, encode_vp9

        prep = self.spec.prep
        frames = dali_decode(encode_vp9(stored, prep.fps, prep.keyframe_interval, prep.crf))
        geometry = stored_geometry(*frames.shape[1:3], self.spec.data)
        crops = view_crops(frames, geometry, eval_views(geometry, len(frames), count, 1)).astype(np.float32)
        normalised = (crops - np.array(RGB_MEAN, np.float32)) / np.array(RGB_STD, np.float32)
        return torch.from_numpy(np.ascontiguousarray(normalised.transpose(0, 4, 1, 2, 3)))

    def clips(self, frames: np.ndarray, fps: float, count: int) -> torch.Tensor:
        """(count, 3, T, S, S) normalised clips of a video given as (F, H, W, 3) RGB uint8 frames at `fps`."""
        return self.rgb_clips(self.stored_frames(frames, fps), count)

    def read_clips(self, path: str | Path, count: int) -> torch.Tensor:
        from dataprep.video import read_video

        return self.clips(*read_video(path), count)

    @torch.no_grad()
    def logits(self, clips: torch.Tensor) -> torch.Tensor:
        """(N, classes) float32 logits on the CPU of (N, 3, T, S, S) clips, by the model's backend."""
        if self.session is not None:
            from d3d_cluster.train.onnx_export import onnx_logits

            return onnx_logits(self.session, clips)
        with autocast(self.device):
            return self.network(clips.to(self.device)).float().cpu()

    def probabilities(self, path: str | Path, clips: int) -> np.ndarray:
        """The class probabilities of one video file: the mean softmax over its clips."""
        return torch.softmax(self.logits(self.read_clips(path, clips)), dim=1).mean(dim=0).numpy()

    def top(self, probabilities: np.ndarray, k: int) -> list[dict]:
        best = np.argsort(-probabilities, kind="stable")[: min(k, len(self.classes))]
        return [{"class": self.classes[c], "probability": float(probabilities[c])} for c in best]


def view_crops(frames: np.ndarray, geometry: Geometry, views: list[View]) -> np.ndarray:
    """(views, T, S, S, channels): each view's frames at the clip's stride, its box cut out (crop-sized boxes,
    unmirrored: the evaluation's views). Frame i of a flow array is the flow from frame i to i + 1."""
    side = geometry.crop
    return np.stack([frames[view.start: view.start + geometry.reach + 1: geometry.stride,
                            int(view.top): int(view.top) + side, int(view.left): int(view.left) + side]
                     for view in views])


@dataclass
class Scored:
    """One video's result: its class probabilities from `clips` clips, or why it could not be read."""

    video: str
    clips: int = 0
    probabilities: np.ndarray | None = None
    error: str | None = None


def score_videos(model: ExportedModel, videos: Iterable[str], clips: int, batch_clips: int = 16,
                 workers: int = 2) -> Iterator[Scored]:
    """Each video's scores, in the order given, as soon as they are known. `workers` threads read and cut videos
    ahead; the network scores whole videos' clips together, at least `batch_clips` clips a pass (the last pass
    fewer). A video that cannot be read (`VideoError`) is reported with its reason; the others are scored."""
    from dataprep.video import VideoError

    def prepare(video: str) -> torch.Tensor | str:
        try:
            return model.read_clips(video, clips)
        except VideoError as error:
            return str(error)

    listed = iter(videos)
    ahead = max(2 * workers, -(-batch_clips // clips) + workers)  # a pass's videos, and the next ones being read
    with ThreadPoolExecutor(workers, thread_name_prefix="predict-read") as pool:
        reading = deque((video, pool.submit(prepare, video)) for video in islice(listed, ahead))
        group: list[tuple[str, torch.Tensor | str]] = []
        while reading:
            video, future = reading.popleft()
            following = next(listed, None)
            if following is not None:
                reading.append((following, pool.submit(prepare, following)))
            group.append((video, future.result()))
            if sum(len(got) for _, got in group if not isinstance(got, str)) >= batch_clips or not reading:
                yield from _score_group(model, group)
                group = []


def _score_group(model: ExportedModel, group: list[tuple[str, torch.Tensor | str]]) -> Iterator[Scored]:
    """One network pass over the clips of the group's readable videos; its results in the group's order."""
    batches = [got for _, got in group if not isinstance(got, str)]
    probabilities = iter(torch.softmax(model.logits(torch.cat(batches)), dim=1).split([len(b) for b in batches])
                         if batches else ())
    for video, got in group:
        yield (Scored(video, error=got) if isinstance(got, str)
               else Scored(video, len(got), next(probabilities).mean(dim=0).numpy()))
