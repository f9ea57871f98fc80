"""One DALI pipeline per rank: encoded clips in, augmented float clips on the device out.

The loader chooses the samples and their views (`order`) and feeds the encoded bytes through
`external_source`; DALI decodes (on the GPU with NVDEC when `device_id` is set, else on the CPU), cuts the
clip at the chosen start frame, crops, mirrors and normalizes. RGB and flow of a sample share one view,
and a mirrored flow has its x component negated, since mirroring reverses horizontal motion.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, NamedTuple

import numpy as np
import torch
from nvidia.dali import fn, types
from nvidia.dali.pipeline import Pipeline
from nvidia.dali.plugin.pytorch import feed_ndarray

from d3d_cluster.data.index import SampleTable
from d3d_cluster.data.order import View, center_view, epoch_order, rank_batches, train_view
from d3d_cluster.data.schema import FLOW_EXT, RGB_EXT, Manifest

# Kinetics RGB statistics (0-255 scale), as video models trained on Kinetics normalize.
RGB_MEAN = (110.2, 100.6, 96.0)
RGB_STD = (58.1, 56.5, 55.3)
MODALITIES = ("rgb", "flow")


class Batch(NamedTuple):
    rgb: torch.Tensor | None  # (N, 3, T, S, S) float32
    flow: torch.Tensor | None  # (N, 2, T, S, S) float32 in [-1, 1]
    labels: torch.Tensor  # (N,) int64
    samples: torch.Tensor  # (N,) int64 sample ids in the split's SampleTable


@dataclass(frozen=True)
class ClipShape:
    frames: int  # T, frames per clip
    crop: int  # S, square crop side
    video_frames: int  # RGB frames per stored video (flow has one fewer)
    height: int
    width: int

    @property
    def max_start(self) -> int:
        return self.video_frames - 1 - self.frames


def clip_shape(manifest: Manifest, shard_dir, clip_frames: int, crop_size: int) -> ClipShape:
    """The clip geometry, refused with the shard directory named if the stored videos cannot supply it."""
    if manifest.frames < clip_frames + 1:
        raise ValueError(f"{shard_dir}: videos have {manifest.frames} frames; data.clip_frames = {clip_frames} "
                         f"needs {clip_frames + 1} (flow lies between frames)")
    if crop_size > min(manifest.height, manifest.width):
        raise ValueError(f"{shard_dir}: data.crop_size = {crop_size} exceeds the stored "
                         f"{manifest.height}x{manifest.width} frames")
    return ClipShape(clip_frames, crop_size, manifest.frames, manifest.height, manifest.width)


class _BatchSource:
    """DALI's external source: yields the encoded members and view parameters of the planned batches."""

    def __init__(self, table: SampleTable, modalities: tuple[str, ...], plan: Iterator[tuple[int, np.ndarray, list[View]]]):
        self.table, self.modalities, self.plan = table, modalities, plan

    def __call__(self):
        epoch, samples, views = next(self.plan)  # StopIteration ends the stream
        columns = [
            [np.array(self.table.label(s), dtype=np.int64) for s in samples],
            [np.array(s, dtype=np.int64) for s in samples],
            [np.array(v.start, dtype=np.int32) for v in views],
            [np.array(v.crop_x, dtype=np.float32) for v in views],
            [np.array(v.crop_y, dtype=np.float32) for v in views],
            [np.array(v.flip, dtype=np.int32) for v in views],
            [np.array([-1.0 if v.flip else 1.0, 1.0], dtype=np.float32).reshape(2, 1, 1, 1) for v in views],
        ]
        for modality in self.modalities:
            ext = RGB_EXT if modality == "rgb" else FLOW_EXT
            columns.append([self.table.read(s, ext) for s in samples])
        return tuple(columns)


def _build_pipeline(source: _BatchSource, shape: ClipShape, modalities, batch_size: int, threads: int,
                    device_id: int | None, seed: int) -> Pipeline:
    decoder = "cpu" if device_id is None else "mixed"
    pipe = Pipeline(batch_size=batch_size, num_threads=threads, device_id=device_id, seed=seed, prefetch_queue_depth=2)
    with pipe:
        labels, samples, start, crop_x, crop_y, flip, flow_sign, *encoded = fn.external_source(
            source=source, num_outputs=7 + len(modalities), batch=True,
            dtype=[types.INT64, types.INT64, types.INT32, types.FLOAT, types.FLOAT, types.INT32, types.FLOAT]
            + [types.UINT8] * len(modalities),
        )
        crop = dict(crop=(shape.crop, shape.crop), crop_pos_x=crop_x, crop_pos_y=crop_y, mirror=flip,
                    output_layout="CFHW", dtype=types.FLOAT)
        outputs = []
        for modality, blob in zip(modalities, encoded):
            video = fn.decoders.video(blob, device=decoder, start_frame=start, sequence_length=shape.frames)
            if modality == "rgb":
                outputs.append(fn.crop_mirror_normalize(video, mean=list(RGB_MEAN), std=list(RGB_STD), **crop))
            else:
                halves = fn.reshape(video[:, :, :, 0], shape=[shape.frames, shape.height, 2, shape.width])
                flow = fn.transpose(halves, perm=[0, 1, 3, 2], output_layout="FHWC")
                flow = fn.crop_mirror_normalize(flow, mean=[127.5, 127.5], std=[127.5, 127.5], **crop)
                outputs.append(flow * (flow_sign if device_id is None else flow_sign.gpu()))
        pipe.set_outputs(labels, samples, *outputs)
    pipe.build()
    return pipe


def _to_torch(tensor_list, device: torch.device) -> torch.Tensor:
    dense = tensor_list.as_tensor()
    if device.type == "cpu":
        return torch.from_numpy(np.array(dense))
    out = torch.empty(dense.shape(), dtype=torch.float32, device=device)
    feed_ndarray(dense, out, cuda_stream=torch.cuda.current_stream(device))
    return out


class ClipLoader:
    """Batches of one split for one rank, epoch after epoch, in the order `order` prescribes."""

    def __init__(self, shard_dir, split: str, *, modalities: tuple[str, ...], clip_frames: int, crop_size: int,
                 batch_size: int, rank: int, world: int, seed: int, train: bool, threads: int = 1,
                 device_id: int | None = None, first_epoch: int = 0, epochs: int = 1):
        unknown = set(modalities) - set(MODALITIES)
        if unknown or not modalities:
            raise ValueError(f"modalities must be a non-empty subset of {MODALITIES}, got {modalities}")
        manifest = Manifest.load(shard_dir)
        self.shape = clip_shape(manifest, shard_dir, clip_frames, crop_size)
        self.table = SampleTable(*manifest.shard_paths(shard_dir, split))
        self.modalities, self.batch_size, self.rank, self.world = tuple(modalities), batch_size, rank, world
        self.seed, self.train = seed, train
        self.device = torch.device("cpu") if device_id is None else torch.device("cuda", device_id)
        self.first_epoch, self.end_epoch, self._next_epoch = first_epoch, first_epoch + epochs, first_epoch
        source = _BatchSource(self.table, self.modalities, self._plan())
        self.pipe = _build_pipeline(source, self.shape, self.modalities, batch_size, threads, device_id, seed)

    def batches(self, epoch: int) -> list[np.ndarray]:
        order = epoch_order(len(self.table), self.seed, epoch, shuffle=self.train)
        return rank_batches(order, self.rank, self.world, self.batch_size, drop_last=self.train)

    def __len__(self) -> int:
        """Batches per epoch on this rank (the same on every rank when training)."""
        return len(self.batches(self.first_epoch))

    def _plan(self):
        for epoch in range(self.first_epoch, self.end_epoch):
            for samples in self.batches(epoch):
                if self.train:
                    views = [train_view(self.seed, epoch, int(s), self.shape.max_start) for s in samples]
                else:
                    views = [center_view(self.shape.max_start)] * len(samples)
                yield epoch, samples, views

    def epoch(self, epoch: int) -> Iterator[Batch]:
        """Epochs must be read in order: the pipeline prefetches across their boundary."""
        if epoch != self._next_epoch or epoch >= self.end_epoch:
            raise ValueError(f"epoch {epoch} requested; the loader is at epoch {self._next_epoch} of "
                             f"[{self.first_epoch}, {self.end_epoch})")
        self._next_epoch += 1
        for _ in range(len(self.batches(epoch))):
            labels, samples, *videos = self.pipe.run()
            tensors = dict(zip(self.modalities, (_to_torch(v, self.device) for v in videos)))
            yield Batch(tensors.get("rgb"), tensors.get("flow"),
                        torch.from_numpy(np.array(labels.as_tensor())),
                        torch.from_numpy(np.array(samples.as_tensor())))

    def close(self) -> None:
        del self.pipe
        self.table.close()
