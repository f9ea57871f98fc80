"""Clips/s of the project's DALI loader against a plain PyTorch DataLoader decoding the same shards with PyAV.

    .venv/bin/python -m benchmarks.loader --workdir /tmp/d3dc-loader-bench --out benchmarks/results/loader.json

Both read the same samples in the same order, cut the same views (random start, crop, mirror) and hand out
float tensors of the same shape: DALI with `data.reader_threads` = cores threads in one process, the baseline
with `num_workers` = cores processes, each decoding with PyAV from the keyframe before the clip's start (as
DALI does from the stream the loader cuts there). Rounds alternate between the two; medians and their ratio are
reported.
`--device-id 0` on a GPU machine measures the mixed (NVDEC) decoder instead of DALI's CPU one; `--shards DIR` reads
prepared shards instead of making them, and `--no-baseline` times DALI alone (the GPU machine has no PyAV):

    python -m benchmarks.loader --device-id 0 --shards .kit/bench --frames 80 --clip-frames 64 --crop 224 --no-baseline

`--layouts 1x8 2x4 2x8 1x16cpu` times DALI alone in each layout PIPELINESxTHREADS, rounds alternating between them:
one rank whose loader runs that many pipelines (`data.pipelines`) of that many threads each (`data.reader_threads`).
It says whether the decoder's feed is limited per pipeline (two pipelines of 4 threads beat one of 8) or per device;
a layout ending in `cpu` decodes with DALI's CPU decoder on a GPU rank (`data.decoder: cpu`), the machine's cores
against NVDEC.
`--member-reads 1 8 --read-latency-ms 2` times DALI alone reading each batch's members that many at a time
(`pipeline.MEMBER_READS`), rounds alternating, with every read of a shard made that much slower first: a network
filesystem's round trip (1-5 ms on NFS or Lustre), which a rank pays about twice a clip.
`--smoke`: 12 videos of 12 frames at 32 px, 8-frame clips cropped to 24 px, batches of 2, 2 per round, 1 round.
"""

from __future__ import annotations

import argparse
import io
import itertools
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from benchmarks import data_layout, parse_args, write_report
from d3d_cluster.data import pipeline
from d3d_cluster.data.index import SampleTable
from d3d_cluster.data.order import epoch_order, train_view
from d3d_cluster.data.pipeline import RGB_MEAN, RGB_STD, ClipLoader, clip_geometry
from d3d_cluster.data.schema import FLOW_EXT, RGB_EXT, Manifest, frame_to_flow
from d3d_cluster.spec import DataSpec, PrepSpec, SyntheticSpec

SMOKE = {"frames": 12, "size": 32, "videos": 12, "clip_frames": 8, "crop": 24, "batch": 2, "batches": 2, "rounds": 1}


def make_shards(workdir: Path, frames: int, size: int, videos: int) -> Path:
    """The synthetic motion dataset of `videos` videos in 4 classes, made and prepared once per size under
    workdir (a folder named for the size: a rerun with other sizes never measures old data); shards of an older
    schema are prepared again."""
    from dataprep.prepare import prepare_dataset
    from dataprep.sources import load_source

    dataset = workdir / f"{videos}-videos-{frames}-frames-{size}px"
    shards = dataset / "shards"
    try:
        Manifest.load(shards)
    except (FileNotFoundError, ValueError):
        synthetic = SyntheticSpec(classes=4, videos_per_class=videos // 4, frames=frames, size=size)
        prep = PrepSpec(synthetic=synthetic, short_side=size, flow={"algorithm": "farneback"}, shard_samples=16)
        prepare_dataset(prep, load_source(prep, dataset), shards, progress=False)
    return shards


class PyAVClips(Dataset):
    """The baseline: one clip per index, decoded and augmented in the worker with PyAV and numpy."""

    def __init__(self, shards: Path, data: DataSpec, modalities: tuple[str, ...], seed: int, clips: int):
        manifest = Manifest.load(shards)
        self.manifest, self.shards = manifest, shards
        self.geometry = clip_geometry(manifest, shards, data)
        self.fps, self.data, self.modalities, self.seed, self.clips = manifest.fps, data, modalities, seed, clips
        self.samples = manifest.splits["train"].samples
        self.table = None

    def __len__(self) -> int:
        """As many clips as the run reads, over as many epochs as that takes: workers start once."""
        return self.clips

    def _frames(self, blob: np.ndarray, start: int) -> np.ndarray:
        geometry = self.geometry
        wanted = range(start, start + (geometry.clip_frames - 1) * geometry.stride + 1, geometry.stride)
        import av  # here only: the GPU machine, which runs --no-baseline, has no PyAV

        with av.open(io.BytesIO(blob.tobytes())) as container:
            stream = container.streams.video[0]
            container.seek(int(start / self.fps / stream.time_base), stream=stream, backward=True, any_frame=False)
            frames = []
            for frame in container.decode(stream):
                index = round(frame.pts * stream.time_base * self.fps)
                if index in wanted:
                    frames.append(frame.to_ndarray(format="rgb24"))
                if index >= wanted[-1]:
                    break
        return np.stack(frames)

    def __getitem__(self, item: int):
        if self.table is None:  # opened in the worker, after the fork
            self.table = SampleTable.of_split(self.manifest, self.shards, "train")
        epoch, position = divmod(item, self.samples)
        sample = int(epoch_order(self.samples, self.seed, epoch, shuffle=True)[position])
        geometry = self.geometry
        view = train_view(geometry, self.table.frames[sample], self.seed, epoch, sample, None, (0.75, 4 / 3))
        top, left, side = int(view.top), int(view.left), geometry.crop
        clips = {}
        for modality in self.modalities:
            frames = self._frames(self.table.read(sample, RGB_EXT if modality == "rgb" else FLOW_EXT), view.start)
            if modality == "rgb":
                clip = (frames[:, top:top + side, left:left + side].astype(np.float32) - RGB_MEAN) / RGB_STD
            else:
                clip = frame_to_flow(frames)[:, top:top + side, left:left + side].astype(np.float32) / 127.5 - 1.0
            if view.flip:
                clip = clip[:, :, ::-1]
                if modality == "flow":
                    clip = clip * np.array([-1.0, 1.0], dtype=np.float32)
            clips[modality] = torch.from_numpy(np.ascontiguousarray(clip.transpose(3, 0, 1, 2)))
        return clips, self.table.label(sample)


def _slow_reads(seconds: float) -> None:
    """Every pread of this process (the loader's reads of its shards) waits `seconds` first, as on NFS."""
    read = os.pread

    def slow(*args):
        time.sleep(seconds)
        return read(*args)

    os.pread = slow


def time_dali(shards: Path, data: DataSpec, modalities, batches: int, device_id: int | None) -> float:
    """Clips/s of one rank's loader over `batches` batches after the first of each of its pipelines (which pays for
    building it)."""
    loader = ClipLoader(shards, "train", data, modalities=modalities, rank=0, world=1, seed=0, train=True,
                        device_id=device_id, epochs=10**6)
    try:
        stream = loader.batches()
        for _ in range(data.pipelines):
            next(stream)
        started = time.perf_counter()
        clips = sum(len(batch.labels) for batch in itertools.islice(stream, batches))
        if device_id is not None:
            torch.cuda.synchronize()
        return clips / (time.perf_counter() - started)
    finally:
        loader.close()


def time_pyav(shards: Path, data: DataSpec, modalities, batches: int, workers: int) -> float:
    dataset = PyAVClips(shards, data, modalities, seed=0, clips=(batches + 1) * data.batch_size)
    loader = DataLoader(dataset, batch_size=data.batch_size, num_workers=workers, prefetch_factor=2)
    clips, started = 0, None
    for clips_batch, _ in loader:
        if started is None:  # the first batch pays for starting the workers
            started = time.perf_counter()
            continue
        clips += len(next(iter(clips_batch.values())))
    return clips / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="/tmp/d3dc-loader-bench")
    parser.add_argument("--out", default="benchmarks/results/loader.json")
    parser.add_argument("--frames", type=int, default=48, help="frames per stored video")
    parser.add_argument("--size", type=int, default=128, help="stored frame size")
    parser.add_argument("--videos", type=int, default=32)
    parser.add_argument("--clip-frames", type=int, default=16)
    parser.add_argument("--crop", type=int, default=112)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--batches", type=int, default=24, help="timed batches per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--cores", type=int, default=os.cpu_count())
    parser.add_argument("--device-id", type=int, default=None, help="GPU for DALI's mixed decoder")
    parser.add_argument("--shards", type=Path, help="prepared shards to read (default: make them under --workdir)")
    parser.add_argument("--baseline", action=argparse.BooleanOptionalAction, default=True,
                        help="also time the PyAV DataLoader")
    parser.add_argument("--member-reads", type=int, nargs="+", metavar="N",
                        help="time DALI alone with each number of a batch's members read at once")
    parser.add_argument("--read-latency-ms", type=float, default=0.0,
                        help="added before every read of a shard (a network filesystem's round trip)")
    parser.add_argument("--layouts", nargs="+", metavar="PIPELINESxTHREADS[cpu]",
                        help="time DALI alone in each layout (1x8 2x4 1x16cpu), instead of against the baseline")
    args = parse_args(parser, SMOKE)
    try:
        layouts = {layout: data_layout(layout) for layout in args.layouts or []}
    except argparse.ArgumentTypeError as error:
        parser.error(f"--layouts: {error}")

    shards = args.shards or make_shards(Path(args.workdir), args.frames, args.size, args.videos)
    data = DataSpec(clip_frames=args.clip_frames, crop_size=args.crop, batch_size=args.batch,
                    reader_threads=args.cores)
    torch.set_num_threads(1)
    if args.read_latency_ms:
        _slow_reads(args.read_latency_ms / 1000)
    results = {}
    for modalities in (("rgb",), ("rgb", "flow")):
        name = "+".join(modalities)
        # Decoded frames: every modality's clip is its own stream of clip_frames frames.
        frames_per_clip = args.clip_frames * len(modalities)
        if args.member_reads:
            rates = {reads: [] for reads in args.member_reads}
            for _ in range(args.rounds):
                for reads in args.member_reads:
                    pipeline.MEMBER_READS = reads
                    rates[reads].append(time_dali(shards, data, modalities, args.batches, args.device_id))
            results[name] = {f"member_reads_{reads}": {"dali_clips_per_second": r, "dali_median": statistics.median(r)}
                             for reads, r in rates.items()}
            first = statistics.median(rates[args.member_reads[0]])
            print(f"{name} ({args.read_latency_ms:g} ms a read): " + ", ".join(
                f"{reads} at a time {statistics.median(r):.1f} clips/s ({statistics.median(r) / first:.2f}x)"
                for reads, r in rates.items()), flush=True)
            continue
        if layouts:
            rates = {layout: [] for layout in layouts}
            for _ in range(args.rounds):
                for layout, settings in layouts.items():
                    rates[layout].append(time_dali(shards, data.model_copy(update=settings), modalities, args.batches, args.device_id))
            results[name] = {layout: {"dali_clips_per_second": r, "dali_median": statistics.median(r),
                                      "dali_frames_per_second": statistics.median(r) * frames_per_clip}
                             for layout, r in rates.items()}
            print(f"{name}: " + ", ".join(f"{layout} {entry['dali_median']:.1f} clips/s "
                                          f"({entry['dali_frames_per_second']:.0f} frames/s)"
                                          for layout, entry in results[name].items()), flush=True)
            continue
        dali, pyav = [], []
        for _ in range(args.rounds):
            dali.append(time_dali(shards, data, modalities, args.batches, args.device_id))
            if args.baseline:
                pyav.append(time_pyav(shards, data, modalities, args.batches, args.cores))
        results[name] = {"dali_clips_per_second": dali, "dali_median": statistics.median(dali),
                         "dali_frames_per_second": statistics.median(dali) * frames_per_clip}
        line = (f"{name}: DALI {results[name]['dali_median']:.1f} clips/s "
                f"({results[name]['dali_frames_per_second']:.0f} decoded frames/s)")
        if pyav:
            results[name].update(pyav_clips_per_second=pyav, pyav_median=statistics.median(pyav),
                                 ratio=statistics.median(dali) / statistics.median(pyav))
            line += f", PyAV DataLoader {results[name]['pyav_median']:.1f} clips/s, ratio {results[name]['ratio']:.2f}"
        print(line, flush=True)
    report = {"args": {**vars(args), "shards": str(shards)}, "machine": platform.processor() or platform.machine(),
              "cores": os.cpu_count(),
              "decoder": "mixed" if args.device_id is not None else "cpu", "date": time.strftime("%Y-%m-%d"),
              "results": results}
    write_report(report, args.out)


if __name__ == "__main__":
    main()
