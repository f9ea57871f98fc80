"""Dataprep throughput, videos/s per core, with TV-L1 flow against Farneback on the same videos, in one run.

    .venv/bin/python -m benchmarks.dataprep --videos 4 --workers 2 --out benchmarks/results/dataprep.json

(as a module: run as a script, this file would shadow the `dataprep` package)

Makes `--videos` motion videos of `--frames` frames (64) at `--frame-size` (256x340; H.264, like downloaded
clips), then prepares them with each flow setting. Per core: each video through the real per-video work (decode,
resample, resize, flow, quantize, VP9 encode, DALI check) in this process on one thread, after a warm-up; the rate
is 1 / median seconds. Wall: the real `prepare_dataset` with `--workers` processes (one video per shard),
process start and shard writing included. Flow alone is timed on the first video to show its share.
`--smoke`: 2 videos of 8 frames at 32x42.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

from benchmarks import parse_args, write_report
from d3d_cluster.spec import FlowSpec, PrepSpec
from dataprep.flow import compute_flow
from dataprep.prepare import plan_shards, prepare_dataset
from dataprep.shards import encode
from dataprep.sources.labels_csv import read_labels_csv
from dataprep.synthetic import CLASSES, render_video
from dataprep.video import dali_decodes, read_video, write_h264

SETTINGS = {  # name: flow settings
    "tvl1 (jobs/: OpenCV defaults, 5 scales x 5 warps)": FlowSpec(algorithm="tvl1", scales=5, warps=5),
    "tvl1 (quickstart: 3 scales x 3 warps)": FlowSpec(algorithm="tvl1", scales=3, warps=3),
    "farneback": FlowSpec(algorithm="farneback"),
}
SMOKE = {"videos": 2, "frames": 8, "frame_size": [32, 42]}


def make_videos(folder: Path, count: int, frames: int, height: int, width: int) -> Path:
    """`count` motion videos of height x width (a square render with the top and bottom cut) and their labels CSV."""
    rows = []
    top = (width - height) // 2
    for number in range(count):
        label = CLASSES[number % len(CLASSES)]
        video = render_video(np.random.default_rng([7, number]), label, frames, width)[:, top:top + height]
        write_h264(folder / f"{number:03d}.mp4", video, 25)
        rows.append(f"{number:03d}.mp4,{label},train\n")
    (folder / "labels.csv").write_text("path,label,split\n" + "".join(rows))
    return folder / "labels.csv"


def per_core(prep: PrepSpec, dataset, min_frames: int) -> tuple[list[float], float]:
    """Seconds per video in this process on one thread, after a warm-up (DALI's pipeline is built once per
    process): encode (decode, resize, flow, VP9) plus the DALI check. Also flow alone on the first video."""
    cv2.setNumThreads(1)
    job = plan_shards(prep, dataset, Path(tempfile.gettempdir()), min_frames)[0]
    dali_decodes(list(encode(dataset.records[0], job)[:2]))
    seconds = []
    for record in dataset.records:
        started = time.perf_counter()
        rgb, flow, _ = encode(record, job)
        dali_decodes([rgb, flow])
        seconds.append(time.perf_counter() - started)
    frames = read_video(dataset.records[0].path)[0]
    started = time.perf_counter()
    compute_flow(frames, prep.flow)
    return seconds, time.perf_counter() - started


def measure(name: str, flow: FlowSpec, labels: Path, workers: int, work: Path, min_frames: int,
            short_side: int) -> dict:
    prep = PrepSpec(source="csv", short_side=short_side, flow=flow, shard_samples=1, workers=workers)
    dataset = read_labels_csv(labels)
    seconds, flow_seconds = per_core(prep, dataset, min_frames)
    started = time.perf_counter()
    manifest = prepare_dataset(prep, dataset, work / name.split()[0] / f"{flow.scales}x{flow.warps}",
                               progress=False, min_frames=min_frames)
    wall = time.perf_counter() - started
    result = {
        "videos": manifest.splits["train"].samples,
        "frame_size": [manifest.height, manifest.width],
        "frames": manifest.min_frames,
        "seconds_per_video": seconds,
        "videos_per_second_per_core": 1 / statistics.median(seconds),
        "flow_seconds_first_video": flow_seconds,
        "wall_seconds": wall,
        "videos_per_second_wall": len(dataset.records) / wall,
    }
    print(f"{name}: {result['videos_per_second_per_core']:.3f} videos/s per core "
          f"(median {statistics.median(seconds):.1f} s per video, flow alone {flow_seconds:.1f} s); "
          f"{result['videos_per_second_wall']:.3f} videos/s wall with {workers} worker processes", flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--videos", type=int, default=4)
    parser.add_argument("--frames", type=int, default=64)
    parser.add_argument("--frame-size", type=int, nargs=2, default=[256, 340], metavar=("HEIGHT", "WIDTH"),
                        help="even, height at most width")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", default="benchmarks/results/dataprep.json")
    args = parse_args(parser, SMOKE)
    height, width = args.frame_size

    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="d3dc-bench-dataprep-") as tmp:
        work = Path(tmp)
        labels = make_videos(work, args.videos, args.frames, height, width)
        results = {name: measure(name, flow, labels, args.workers, work, args.frames, height)
                   for name, flow in SETTINGS.items()}
    farneback = results["farneback"]["videos_per_second_per_core"]
    report = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.node()} {platform.machine()}, {len(os.sched_getaffinity(0))} cores",
        "videos": args.videos,
        "frames": args.frames,
        "workers": args.workers,
        "load_average_1min_before_after": [load_before[0], os.getloadavg()[0]],  # a shared machine: others' work slows this
        "settings": results,
        "tvl1_slowdown_vs_farneback": {name: farneback / result["videos_per_second_per_core"]
                                       for name, result in results.items() if name != "farneback"},
    }
    write_report(report, args.out)
    print(json.dumps(report["tvl1_slowdown_vs_farneback"], indent=2))


if __name__ == "__main__":
    main()
