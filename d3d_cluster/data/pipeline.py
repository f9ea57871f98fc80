"""DALI pipelines per rank: encoded clips in, augmented float clips on the device out.

The loader chooses the items and their views (`order`) and feeds the encoded bytes through
`external_source`; DALI decodes (on the GPU with NVDEC when `device_id` is set and `data.decoder` allows it, else on
the CPU) from the chosen start frame with the chosen stride, resizes the chosen box to the crop size, mirrors and
normalizes.
Each stream is first cut to the clip, from the keyframe before its start (`webm.clip_stream`): DALI's CPU decoder
would otherwise decode every frame before the start (BENCHMARKS).
RGB and flow of a sample share one view. Flow is a displacement in pixels, so it is scaled with the box
(a box resized by k moves k times as far) and its x component is negated when mirrored. Half the training clips
are mirrored unless `data.mirror` is off; a mirrored clip of a class in `data.mirror_pairs` takes its pair's label.

A rank runs `data.pipelines` pipelines, which deliver its batches in turn, each with its own CUDA stream and
`data.reader_threads` threads: DALI's mixed decoder waits for each decoded frame on its pipeline's one stream
(BENCHMARKS), so one pipeline decodes about a frame at a time. The batches are the same whatever their number.

Resume: the loader's `state()` (epoch, items the world consumed, seed, shard-list hash) is all it needs
to continue after the last batch it handed out, on any number of ranks (DALI's own checkpointing cannot
hold a video decoder: NOTES). A sample DALI cannot decode is skipped, named and counted in `skipped`:
DALI has no skip option and a failed pipeline is dead, so the loader finds the culprit by decoding the
suspects one by one and rebuilds the pipelines after it. A shard the OS cannot read (`ShardReadError`) fails the
step instead: skipping would drop sound samples, and the precompute pass would record them as unusable for good.

Reading: DALI calls `external_source`'s callback on the thread that calls `pipe.run()`, the training thread. So
the callback only hands over bytes a reader thread has already read from the shards (`_BatchSource`), a few
batches ahead of what DALI has asked for; the training thread does not wait on the disk while the device idles. A
batch's members are read `MEMBER_READS` at a time (a network filesystem answers each read after a round trip), and
batches are delivered in the plan's order.

DALI is imported where a pipeline is built: this module's types (`Batch`, `LoaderState`, `CorruptStep`) also serve
processes that read no data, such as the launcher on a login node and the model benchmark on a bare GPU machine.
"""

from __future__ import annotations

import functools
import hashlib
import sys
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Callable, Iterable, Iterator, Literal, NamedTuple

import numpy as np
import torch

from d3d_cluster.data.index import SampleTable, ShardReadError
from d3d_cluster.data.order import (Geometry, View, epoch_order, eval_views, global_steps, rank_steps, rank_windows,
                                    step_capacity, train_view, window_count)
from d3d_cluster.data.schema import FLOW_EXT, RGB_EXT, Manifest
from d3d_cluster.data.webm import clip_stream
from d3d_cluster.spec import DataSpec

# Kinetics RGB statistics (0-255 scale), as video models trained on Kinetics normalize.
RGB_MEAN = (110.2, 100.6, 96.0)
RGB_STD = (58.1, 56.5, 55.3)
MODALITIES = ("rgb", "flow")
# NVDEC decodes no VP9 frame with a side under this (cuvidGetDecoderCaps's minimum on the H100 here; DALI refuses
# smaller frames at the first batch).
NVDEC_MIN_SIDE = 128
# Batches whose members the reader thread reads beyond those DALI has taken (DALI itself asks for its
# prefetch_queue_depth batches ahead of the one `run()` returns): slack for a slow read, a few MB of memory.
READ_AHEAD = 2
# Members of a batch read at once: one pread after another, a batch of 16 RGB + flow clips waits 32 round trips of a
# network filesystem (1-5 ms each on NFS or Lustre); their order in the batch is kept whatever order they arrive in.
MEMBER_READS = 8


class CorruptStep(RuntimeError):
    """No sample of a step could be decoded: the data is bad, and reading it again will not change that."""


class Batch(NamedTuple):
    rgb: torch.Tensor | None  # (N, 3, T, S, S) float32
    flow: torch.Tensor | None  # (N, 2, T, S, S) float32, 1.0 = the flow bound (more where a box was enlarged)
    labels: torch.Tensor  # (N,) int64
    samples: torch.Tensor  # (N,) int64 sample ids in the split's SampleTable
    views: torch.Tensor  # (N,) int64 which of a video's evaluation views (0 when training)
    epochs: torch.Tensor  # (N,) int64 each clip's epoch (a training step may span two): with its sample id, it names
    # the clip's training view


@dataclass(frozen=True)
class LoaderState:
    """Where the world stands in the item order; saved with checkpoints."""

    epoch: int
    position: int  # items of this epoch's order consumed by the whole world
    seed: int
    shards: str  # hash of the split's shard list: a resume on other shards is refused

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, state: dict) -> "LoaderState":
        return cls(**state)


def shard_list_hash(manifest: Manifest, split: str) -> str:
    lines = "".join(f"{shard.path} {shard.sha256}\n" for shard in manifest.splits[split].shards)
    return hashlib.sha256(lines.encode()).hexdigest()[:16]


def clip_geometry(manifest: Manifest, shard_dir, data: DataSpec) -> Geometry:
    """The clip geometry, refused with the shard directory named if a stored video cannot supply it."""
    if manifest.min_frames < data.clip_span:
        raise ValueError(f"{shard_dir}: the shortest video has {manifest.min_frames} frames; data.clip_frames = "
                         f"{data.clip_frames} at data.frame_stride = {data.frame_stride} needs {data.clip_span} "
                         f"(flow lies between frames)")
    if data.crop_size > min(manifest.height, manifest.width):
        raise ValueError(f"{shard_dir}: data.crop_size = {data.crop_size} exceeds the stored "
                         f"{manifest.height}x{manifest.width} frames")
    return stored_geometry(manifest.height, manifest.width, data)


def stored_geometry(height: int, width: int, data: DataSpec) -> Geometry:
    """The data spec's clips over stored frames of this size (unchecked: `clip_geometry` checks a split's)."""
    return Geometry(height, width, data.clip_frames, data.frame_stride, data.crop_size)


def decodes_on_gpu(manifest: Manifest, shard_dir, data: DataSpec) -> bool:
    """Whether a GPU rank decodes these shards with NVDEC (`data.decoder`); gpu asked for frames NVDEC cannot decode
    is refused, with the shard directory named."""
    small = min(manifest.height, manifest.width) < NVDEC_MIN_SIDE
    if data.decoder == "gpu" and small:
        raise ValueError(f"{shard_dir}: data.decoder gpu: NVDEC decodes no VP9 frame smaller than "
                         f"{NVDEC_MIN_SIDE}x{NVDEC_MIN_SIDE}, and the stored frames are {manifest.height}x"
                         f"{manifest.width}; use data.decoder auto or cpu (DALI's CPU decoder)")
    return data.decoder == "gpu" or (data.decoder == "auto" and not small)


def mirrored_labels(manifest: Manifest, shard_dir, data: DataSpec) -> np.ndarray:
    """The label a mirrored clip of each class takes (`data.mirror_pairs` swapped, the rest unchanged); a pair naming
    a class the shards lack is refused."""
    mirrored = np.arange(len(manifest.classes))
    for pair in data.mirror_pairs:
        unknown = [name for name in pair if name not in manifest.classes]
        if unknown:
            raise ValueError(f"data.mirror_pairs: {unknown[0]!r} is not a class of {shard_dir} "
                             f"(classes: {', '.join(manifest.classes)})")
        first, second = (manifest.classes.index(name) for name in pair)
        mirrored[first], mirrored[second] = second, first
    return mirrored


def training_steps(manifest: Manifest, data: DataSpec, world: int, epochs: int) -> tuple[int, float]:
    """A training stage's global micro-steps, and how many make an epoch (a fraction: steps span epochs), known from
    the manifest before a loader opens; a stage too short for one full step is refused, naming the sizes."""
    samples = sum(shard.samples for shard in manifest.splits["train"].shards)  # what the loader's SampleTable holds
    steps = window_count(samples, 0, 0, epochs, world, data.batch_size)
    if steps == 0:
        raise ValueError(f"the training split has {samples} videos: {epochs} epoch(s) of them make fewer clips than "
                         f"one step of {world} ranks x data.batch_size {data.batch_size}")
    return steps, samples / (world * data.batch_size)


class _Planned(NamedTuple):
    epochs: list[int]  # each clip's epoch
    end: tuple[int, int]  # the world's (epoch, position) after this step
    samples: list[int]
    views: list[int]


class _BatchSource:
    """DALI's external sources: the encoded members and view parameters of the planned batches, in order, dealt in
    turn to the loader's pipelines (batch i to pipeline i mod `pipelines`, which the loader runs in that turn).

    Each pipeline's DALI calls its `feed` from `run()` on the training thread; the members are read on a reader
    thread of their own, in the plan's order, `read_ahead` batches beyond those the pipelines have taken (more where
    a pipeline asks for one further ahead), so a call only waits when reading falls behind. The plan is followed in
    order on the calling thread, and what it raises (the end of the stream, a step whose samples are all corrupt) is
    raised when the pipeline whose turn that batch was asks for it, never earlier. What was handed to a pipeline, or
    failed to be read for it, is remembered in its `inflight` until the loader takes the batch out, so a failure can
    be traced back to the samples DALI was working on. `close()` before the loader's shards are closed.
    """

    def __init__(self, loader: "ClipLoader", plan: Iterator[_Planned], pipelines: int = 1,
                 read_ahead: int = READ_AHEAD):
        self.loader, self.plan, self.read_ahead = loader, plan, read_ahead
        self.inflight: list[deque[_Planned]] = [deque() for _ in range(pipelines)]
        self._reads: list[deque[tuple[_Planned | None, Future | None, BaseException | None]]] = [
            deque() for _ in range(pipelines)]
        self._dealt = 0  # planned batches dealt to the pipelines
        self._planning = True  # until the plan ended or raised
        self._reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"shard-reader-rank{loader.rank}")

    def feed(self, pipeline: int):
        """The callback for `pipeline`'s external source."""
        return lambda: self._next(pipeline)

    def _read_ahead(self, wanted: int | None = None) -> None:
        """Plan and start reading until `read_ahead` batches wait beyond those taken, and one waits for `wanted`."""
        while self._planning and (sum(map(len, self._reads)) <= self.read_ahead
                                  or wanted is not None and not self._reads[wanted]):
            reads = self._reads[self._dealt % len(self._reads)]
            self._dealt += 1
            try:
                planned = next(self.plan)
            except StopIteration as end:
                self._planning = False
                reads.append((None, None, end))
            except Exception as error:  # CorruptStep: raised when its pipeline asks for that batch
                self._planning = False
                reads.append((None, None, error))
            else:
                reads.append((planned, self._reader.submit(self.loader.columns, planned), None))
                if self.loader.on_plan is not None:
                    self.loader.on_plan(np.array(planned.epochs, dtype=np.int64),
                                        np.array(planned.samples, dtype=np.int64))

    def _next(self, pipeline: int):
        self._read_ahead(pipeline)
        if not self._reads[pipeline]:
            raise StopIteration  # the plan ended on another pipeline's turn, or this one asked again after its end
        planned, read, error = self._reads[pipeline].popleft()
        if planned is None:
            raise error
        self.inflight[pipeline].append(planned)
        columns = read.result()  # what reading a damaged shard raised is raised here
        self._read_ahead()  # the next batch's read starts now, not at DALI's next call
        return columns

    def close(self) -> None:
        """Stop reading; a read under way finishes first (the shards stay open until then)."""
        self._reader.shutdown(wait=True, cancel_futures=True)
        for reads in self._reads:
            reads.clear()


def _build_pipeline(source, geometry: Geometry, modalities, max_batch: int, threads: int, device_id: int | None,
                    seed: int, resize: bool, decoder: Literal["mixed", "cpu"] = "cpu") -> Pipeline:
    """`resize`: boxes may differ from the crop size (random resized crops); otherwise they are cropped as they are.
    With a `device_id`, the clips come out on that GPU, decoded there by the `mixed` decoder (NVDEC) or on the CPU
    and copied there."""
    from nvidia.dali import fn, types
    from nvidia.dali.pipeline import Pipeline

    pipe = Pipeline(batch_size=max_batch, num_threads=threads, device_id=device_id, seed=seed,
                    prefetch_queue_depth=2)
    with pipe:
        optional = [name for name, wanted in (("box_end", resize), ("flow_scale", "flow" in modalities)) if wanted]
        labels, samples, views, box_start, flip, *rest = fn.external_source(
            source=source, num_outputs=5 + len(optional) + 2 * len(modalities), batch=True,
            dtype=[types.INT64, types.INT64, types.INT64, types.FLOAT, types.INT32]
            + [types.FLOAT] * len(optional) + [types.INT32, types.UINT8] * len(modalities),
        )
        columns = dict(zip(optional, rest))
        box_end, flow_scale, streams = columns.get("box_end"), columns.get("flow_scale"), rest[len(optional):]
        side = geometry.crop
        finish = dict(mirror=flip, output_layout="CFHW", dtype=types.FLOAT)
        if resize:
            def cut(video):
                return fn.resize(video, size=[side, side], roi_start=box_start, roi_end=box_end,
                                 interp_type=types.INTERP_LINEAR)
        else:  # a crop-sized box: cropping it in the normalize step costs nothing, a resize pass a lot (BENCHMARKS)
            finish.update(crop=(side, side), crop_pos_y=box_start[0] / max(1, geometry.height - side),
                          crop_pos_x=box_start[1] / max(1, geometry.width - side))

            def cut(video):
                return video
        outputs = []
        for modality, start, blob in zip(modalities, streams[0::2], streams[1::2]):
            video = fn.decoders.video(blob, device=decoder, start_frame=start, stride=geometry.stride,
                                      sequence_length=geometry.clip_frames)
            if device_id is not None and decoder == "cpu":
                video = video.gpu()
            if modality == "rgb":
                outputs.append(fn.crop_mirror_normalize(cut(video), mean=list(RGB_MEAN), std=list(RGB_STD), **finish))
            else:
                halves = fn.reshape(video[:, :, :, 0], shape=[geometry.clip_frames, geometry.height, 2, geometry.width])
                flow = cut(fn.transpose(halves, perm=[0, 1, 3, 2], output_layout="FHWC"))
                flow = fn.crop_mirror_normalize(flow, mean=[127.5, 127.5], std=[127.5, 127.5], **finish)
                outputs.append(flow * (flow_scale if device_id is None else flow_scale.gpu()))
        pipe.set_outputs(labels, samples, views, *outputs)
    pipe.build()
    return pipe


def pins(device: torch.device) -> bool:
    """Whether host tensors bound for `device` are put in pinned (page-locked) memory first: only for a GPU, where
    that lets the copy run asynchronously; on a CPU-only machine pinning is pointless (and fails without CUDA)."""
    return device.type == "cuda"


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`tensor` on `device` without making the host wait for the device: a host tensor goes to a GPU from pinned
    memory, asynchronously (one the loader pinned is not copied again); on the CPU it is returned as it is."""
    if not pins(device) or tensor.device.type != "cpu":
        return tensor.to(device)
    return (tensor if tensor.is_pinned() else tensor.pin_memory()).to(device, non_blocking=True)


def _to_host(tensor_list, pin: bool = False) -> torch.Tensor:
    """A CPU output of DALI (labels, sample and view ids) as a torch tensor, pinned with `pin`."""
    tensor = torch.from_numpy(np.array(tensor_list.as_tensor()))
    return tensor.pin_memory() if pin else tensor


def _to_torch(tensor_list, device: torch.device) -> torch.Tensor:
    from nvidia.dali.plugin.pytorch import feed_ndarray

    dense = tensor_list.as_tensor()
    if device.type == "cpu":
        return torch.from_numpy(np.array(dense))
    out = torch.empty(dense.shape(), dtype=torch.float32, device=device)
    feed_ndarray(dense, out, cuda_stream=torch.cuda.current_stream(device))
    return out


class ClipLoader:
    """Batches of one split for one rank, epoch after epoch, in the order `order` prescribes.

    Training reads one random view per video; evaluation reads every video's `eval_clips` x `eval_crops`
    views. Training steps are full windows over the stream of epochs (`batches()`); evaluation, and training views
    read with `whole_epochs` (the teacher's precompute pass, the probe), read each epoch whole (`epoch(e)`), every
    item exactly once. Every rank runs the same number of steps (`order`).
    `skip`: samples known to be unusable before reading starts (the student's precompute pass could not decode
    their flow); they are left out as found-corrupt ones are, so the steps stay those of the live run. `on_plan`
    is told each batch's clips (their epochs and samples, in batch order) as soon as reading them starts, a few
    batches ahead: the stored teacher outputs are read ahead from it.
    """

    def __init__(self, shard_dir, split: str, data: DataSpec, *, modalities: tuple[str, ...], rank: int, world: int,
                 seed: int, train: bool, device_id: int | None = None, first_epoch: int = 0, epochs: int = 1,
                 resume: LoaderState | None = None, skip: Iterable[int] = (), whole_epochs: bool = False,
                 on_plan: Callable[[np.ndarray, np.ndarray], object] | None = None):
        unknown = set(modalities) - set(MODALITIES)
        if unknown or not modalities:
            raise ValueError(f"modalities must be a non-empty subset of {MODALITIES}, got {modalities}")
        manifest = Manifest.load(shard_dir)
        self.geometry = clip_geometry(manifest, shard_dir, data)
        self.mirrored_labels = mirrored_labels(manifest, shard_dir, data)
        self.table = SampleTable.of_split(manifest, shard_dir, split)
        self.shards = [shard.path for shard in manifest.splits[split].shards]
        self.shard_hash = shard_list_hash(manifest, split)
        self.modalities, self.data, self.rank, self.world = tuple(modalities), data, rank, world
        self.seed, self.train, self.on_plan = seed, train, on_plan
        self.windows = train and not whole_epochs  # training steps: full windows over the stream of epochs
        self._order = functools.lru_cache(maxsize=2)(self._epoch_order)  # the plan reads an epoch's order per step
        self._member_reads = ThreadPoolExecutor(MEMBER_READS, thread_name_prefix=f"shard-reader-rank{rank}-member")
        self.views_per_video = 1 if train else data.eval_clips * data.eval_crops
        self.resizes = train and data.crop_area is not None
        self.device = torch.device("cpu") if device_id is None else torch.device("cuda", device_id)
        self.device_id, self.first_epoch, self.end_epoch = device_id, first_epoch, first_epoch + epochs
        self.decoder = "mixed" if device_id is not None and decodes_on_gpu(manifest, shard_dir, data) else "cpu"
        if device_id is not None and self.decoder == "cpu" and rank == 0:
            why = "data.decoder cpu" if data.decoder == "cpu" else (f"the stored {manifest.height}x{manifest.width} "
                                                                     f"frames are under NVDEC's minimum side, "
                                                                     f"{NVDEC_MIN_SIDE}")
            print(f"loader: DALI's CPU decoder, clips copied to cuda:{device_id} ({why})", file=sys.stderr, flush=True)
        position = 0
        if resume is not None:
            self._check_resumable(resume, shard_dir, split)
            first_epoch, position = resume.epoch, resume.position
        self._consumed = (first_epoch, position)  # epoch and world position after the last batch handed out
        self._next_epoch = first_epoch
        self.skipped: list[dict] = []  # corrupt samples: key, shard, modality, error
        self._corrupt: set[int] = set(skip)  # samples known unusable before reading (`skip`) or found corrupt
        self._start_pipelines()

    def _check_resumable(self, state: LoaderState, shard_dir, split: str) -> None:
        if state.shards != self.shard_hash:
            raise ValueError(f"{shard_dir}: the {split} shards changed since the checkpoint was taken "
                             f"(shard list hash {state.shards}, now {self.shard_hash})")
        if state.seed != self.seed:
            raise ValueError(f"resume state has seed {state.seed}, the loader {self.seed}: the order would differ")
        if not self.first_epoch <= state.epoch <= self.end_epoch:
            raise ValueError(f"resume state at epoch {state.epoch} is outside [{self.first_epoch}, {self.end_epoch}]")

    @property
    def skipped_samples(self) -> list[int]:
        return sorted(self._corrupt)

    @property
    def items(self) -> int:
        return len(self.table) * self.views_per_video

    def state(self) -> LoaderState:
        """The resume state after the last batch handed out; an epoch's end reads as the next epoch's start, and a
        training stream with no full step left as the end of its last epoch (its remainder is not read)."""
        epoch, position = self._consumed
        if position == self.items or (self.windows and self.steps_left() == 0):
            epoch, position = (epoch + 1, 0) if not self.windows else (self.end_epoch, 0)
        return LoaderState(epoch, position, self.seed, self.shard_hash)

    def _epoch_order(self, epoch: int) -> np.ndarray:
        return epoch_order(self.items, self.seed, epoch, shuffle=self.train)

    def steps_left(self) -> int:
        """Steps from the last batch handed out to the loader's end; the same on every rank."""
        epoch, position = self._consumed
        if self.windows:
            return window_count(self.items, epoch, position, self.end_epoch, self.world, self.data.batch_size)
        return sum(len(global_steps(self.items - (position if e == epoch else 0), self.world, self.data.batch_size))
                   for e in range(epoch, self.end_epoch))

    @property
    def steps_per_epoch(self) -> float:
        """A fraction where training steps span epochs."""
        if self.windows:
            return self.items / (self.world * self.data.batch_size)
        return len(global_steps(self.items, self.world, self.data.batch_size))

    def _plan(self, epoch: int, position: int) -> Iterator[_Planned]:
        if self.windows:
            steps = rank_windows(self._order, self.items, epoch, position, self.end_epoch, self.rank, self.world,
                                 self.data.batch_size)
        else:
            steps = ((np.full(len(items), e), items, (e, end))
                     for e in range(epoch, self.end_epoch)
                     for items, end in rank_steps(self._order(e), position if e == epoch else 0, self.rank,
                                                  self.world, self.data.batch_size))
        views = self.views_per_video
        for epochs, items, end in steps:
            chosen = [(int(e), int(item) // views, int(item) % views) for e, item in zip(epochs, items)]
            kept = [clip for clip in chosen if clip[1] not in self._corrupt]
            if not kept:
                raise CorruptStep(f"rank {self.rank}: every sample of a step is corrupt: "
                                  f"{[self.table.keys[s] for _, s, _ in chosen]}")
            yield _Planned([e for e, _, _ in kept], end, [s for _, s, _ in kept], [v for _, _, v in kept])

    def _view(self, epoch: int, sample: int, view: int) -> View:
        frames = self.table.frames[sample]
        if self.train:
            area = tuple(self.data.crop_area) if self.data.crop_area else None
            return train_view(self.geometry, frames, self.seed, epoch, sample, area, tuple(self.data.crop_aspect),
                              self.data.mirror)
        return eval_views(self.geometry, frames, self.data.eval_clips, self.data.eval_crops)[view]

    def columns(self, planned: _Planned, modalities: tuple[str, ...] | None = None) -> tuple:
        """What `_BatchSource` hands to DALI for one planned batch."""
        views = [self._view(e, s, v) for e, s, v in zip(planned.epochs, planned.samples, planned.views)]
        side = self.geometry.crop
        columns = [
            [np.array(self.mirrored_labels[label] if v.flip else label, dtype=np.int64)
             for label, v in zip(map(self.table.label, planned.samples), views)],
            [np.array(s, dtype=np.int64) for s in planned.samples],
            [np.array(v, dtype=np.int64) for v in planned.views],
            [np.array([v.top, v.left], dtype=np.float32) for v in views],
            [np.array(v.flip, dtype=np.int32) for v in views],
        ]
        if self.resizes:
            columns.append([np.array([v.top + v.height, v.left + v.width], dtype=np.float32) for v in views])
        modalities = modalities or self.modalities
        exts = [RGB_EXT if modality == "rgb" else FLOW_EXT for modality in modalities]
        members = iter(self._member_reads.map(lambda read: self.table.read(*read),
                                              [(s, ext) for ext in exts for s in planned.samples]))
        if "flow" in modalities:
            columns.append([np.array([(-1.0 if v.flip else 1.0) * side / v.width, side / v.height],
                                     dtype=np.float32).reshape(2, 1, 1, 1) for v in views])
        for _ in modalities:
            cut = [self._clip_stream(next(members), v.start, self.geometry.reach) for v in views]
            columns += [[np.array(start, dtype=np.int32) for start, _ in cut], [stream for _, stream in cut]]
        return tuple(columns)

    @staticmethod
    def _clip_stream(blob: np.ndarray, start: int, span: int) -> tuple[int, np.ndarray]:
        """(start frame, stream) DALI decodes a clip of frames `start`..`start + span` from: the stream cut to the
        clip from the keyframe before it, or the whole stream where it cannot be cut (as a damaged one)."""
        cut = clip_stream(blob, start, start + span)
        return (start, blob) if cut is None else (cut[1], cut[0])

    def _start_pipelines(self) -> None:
        self._source = _BatchSource(self, self._plan(*self._consumed), self.data.pipelines)
        self._turn = 0  # the pipeline that delivers the next batch
        self.pipes = [self._pipeline(self._source.feed(pipeline), self.modalities, step_capacity(self.data.batch_size),
                                     self.data.reader_threads)
                      for pipeline in range(self.data.pipelines)]

    def _pipeline(self, source, modalities: tuple[str, ...], max_batch: int, threads: int):
        """A pipeline on this loader's device with its decoder: its batches' and a suspect's alike (a stream only
        NVDEC rejects is corrupt for a GPU rank, however well the CPU decodes it)."""
        return _build_pipeline(source, self.geometry, modalities, max_batch, threads, self.device_id, self.seed,
                               self.resizes, self.decoder)

    def epoch(self, epoch: int) -> Iterator[Batch]:
        """One whole epoch's batches (not for training windows, which span epochs: `batches()`). Epochs must be read
        in order: the pipeline prefetches across their boundary."""
        if self.windows:
            raise TypeError("a training loader's steps span epochs: read them with batches(), or build the loader "
                            "with whole_epochs=True")
        if epoch != self._next_epoch or epoch >= self.end_epoch:
            raise ValueError(f"epoch {epoch} requested; the loader is at epoch {self._next_epoch} of "
                             f"[{self.first_epoch}, {self.end_epoch})")
        self._next_epoch += 1
        position = self._consumed[1] if self._consumed[0] == epoch else 0
        for _ in range(len(global_steps(self.items - position, self.world, self.data.batch_size))):
            yield self._batch()

    def batches(self) -> Iterator[Batch]:
        """Every remaining batch, to the loader's end."""
        for _ in range(self.steps_left()):
            yield self._batch()

    def _batch(self) -> Batch:
        outputs, planned = self._run()
        self._consumed = planned.end
        labels, samples, views, *videos = outputs
        tensors = dict(zip(self.modalities, (_to_torch(v, self.device) for v in videos)))
        # Labels go on to the device (the loss, the accuracy); sample, view and epoch ids are used on the host.
        return Batch(tensors.get("rgb"), tensors.get("flow"), _to_host(labels, pins(self.device)), _to_host(samples),
                     _to_host(views), torch.tensor(planned.epochs, dtype=torch.int64))

    def _run(self) -> tuple[tuple, _Planned]:
        """The next batch's outputs, from the pipeline whose turn it is, and its plan."""
        turn = self._turn
        try:
            outputs = self.pipes[turn].run()
        except ShardReadError:  # the OS failed, not the data: the step fails, nothing is skipped
            raise
        except Exception:  # DALI's own errors, and whatever reading a damaged shard raised in the source
            self._source.close()  # nothing reads while the suspects are decoded, and the plan is made again
            suspects = sorted({s for inflight in self._source.inflight for planned in inflight for s in planned.samples}
                              - self._corrupt)
            corrupt = {s: reason for s in suspects if (reason := self._decode_error(s)) is not None}
            if not corrupt:
                raise
            for sample, (modality, reason) in corrupt.items():
                shard = self.shards[self.table.members[sample][RGB_EXT if modality == "rgb" else FLOW_EXT].tar]
                record = {"key": self.table.keys[sample], "shard": shard, "modality": modality, "error": reason}
                self.skipped.append(record)
                print(f"loader rank {self.rank}: skipping corrupt sample {record['key']} ({modality}) in {shard}: "
                      f"{reason}", file=sys.stderr, flush=True)
            self._corrupt.update(corrupt)
            del self.pipes
            self._start_pipelines()
            return self._run()
        self._turn = (turn + 1) % len(self.pipes)
        return outputs, self._source.inflight[turn].popleft()

    def _decode_error(self, sample: int) -> tuple[str, str] | None:
        """Decode one sample alone, each modality on its own, with the loader's own decoder (a stream only NVDEC
        rejects is corrupt for this loader): which one fails, and why."""
        planned = _Planned([self._consumed[0]], self._consumed, [sample], [0])
        for modality in self.modalities:
            try:
                columns = self.columns(planned, (modality,))
                self._pipeline(lambda: columns, (modality,), 1, 1).run()
            except ShardReadError:
                raise
            except Exception as error:
                return modality, (str(error).strip().splitlines() or [type(error).__name__])[0][:300]
        return None

    def close(self) -> None:
        self._source.close()
        self._member_reads.shutdown(wait=True)
        del self.pipes
        self.table.close()
