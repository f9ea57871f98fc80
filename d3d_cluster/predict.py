"""`d3dc predict`: an exported RGB network (the student, or the baseline) on raw video files. No optical flow is
computed: that is the point of D3D.

A video is read as dataprep reads a source video (any container and codec PyAV decodes), brought to the stored
geometry the network was trained on (the export's spec: frame rate, short side or frame size), encoded and decoded
as the shards and the loader do (VP9 at the spec's quality, DALI's CPU decoder), and cut into the evaluation's
views (`data.order.eval_views`: `clips` clips spread evenly over the video, the centre crop), each
normalised as the loader normalises RGB. The video's scores are the mean softmax over its clips, as evaluation
scores a validation video.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import yaml

from d3d_cluster.data.order import Geometry, eval_views
from d3d_cluster.data.pipeline import RGB_MEAN, RGB_STD
from d3d_cluster.models import S3DG
from d3d_cluster.models.weights import load_s3dg
from d3d_cluster.spec import Spec
from d3d_cluster.train.engine import autocast, prepare_device


@dataclass
class ExportedModel:
    network: S3DG
    classes: list[str]
    spec: Spec
    device: torch.device

    @classmethod
    def load(cls, directory: str | Path, device: torch.device | None = None) -> "ExportedModel":
        """The network `d3dc export` wrote into `directory`, on `device` (default: a GPU where there is one)."""
        directory = Path(directory)
        info_path = directory / "model.json"
        if not info_path.is_file():
            raise FileNotFoundError(f"{info_path}: not an export directory (make one with d3dc export RUN --stage "
                                    f"student)")
        info = json.loads(info_path.read_text())
        if info["input"]["modality"] != "rgb":
            raise ValueError(f"{directory}: the exported {info['stage']} reads {info['input']['modality']}; predict "
                             f"runs an RGB network (the student or the baseline), which needs no optical flow")
        spec = Spec.model_validate(yaml.safe_load((directory / "spec.yaml").read_text()))
        network = S3DG(**info["s3dg"])
        load_s3dg(network, directory / info["weights"]["torch"])
        if device is None:
            device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
        prepare_device(device, spec.model.precision)  # predictions in the precision the network was trained in
        return cls(network.to(device).eval(), list(info["classes"]), spec, device)

    def clips(self, frames: np.ndarray, fps: float, count: int) -> torch.Tensor:
        """(count, 3, T, S, S) normalised clips of a video given as (F, H, W, 3) RGB uint8 frames at `fps`."""
        from dataprep.video import dali_decode, encode_vp9, fit_frames, loop_frames, resample_fps

        prep, data = self.spec.prep, self.spec.data
        frames = fit_frames(resample_fps(frames, fps, prep.fps), prep.short_side,
                            tuple(prep.frame_size) if prep.frame_size else None)
        frames = loop_frames(frames, data.clip_span)  # a video shorter than a clip is looped, as prep can loop
        # Through the shards' codec and the loader's decoder: DALI's colour conversion and VP9's artifacts differ
        # from PyAV's decode of the source by a few levels a pixel, which moved a network's scores by 0.1.
        frames = dali_decode(encode_vp9(frames, prep.fps, prep.keyframe_interval, prep.crf))
        geometry = Geometry(frames.shape[1], frames.shape[2], data.clip_frames, data.frame_stride, data.crop_size)
        mean, std = np.array(RGB_MEAN, np.float32), np.array(RGB_STD, np.float32)
        out = []
        for view in eval_views(geometry, len(frames), count, 1):
            top, left, side = int(view.top), int(view.left), data.crop_size
            last = view.start + geometry.reach
            clip = frames[view.start: last + 1: geometry.stride, top: top + side, left: left + side]
            out.append(((clip.astype(np.float32) - mean) / std).transpose(3, 0, 1, 2))
        return torch.from_numpy(np.stack(out))

    @torch.no_grad()
    def probabilities(self, path: str | Path, clips: int) -> np.ndarray:
        """The class probabilities of one video file: the mean softmax over its clips."""
        from dataprep.video import read_video

        frames, fps = read_video(path)
        batch = self.clips(frames, fps, clips).to(self.device)
        with autocast(self.device):
            logits = self.network(batch).float()
        return torch.softmax(logits, dim=1).mean(dim=0).cpu().numpy()

    def top(self, probabilities: np.ndarray, k: int) -> list[dict]:
        best = np.argsort(-probabilities, kind="stable")[: min(k, len(self.classes))]
        return [{"class": self.classes[c], "probability": float(probabilities[c])} for c in best]
