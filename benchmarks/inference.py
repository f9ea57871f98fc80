"""What D3D saves at inference: the student alone against the two-stream model it replaces, per video, in one run.

    .venv/bin/python -m benchmarks.inference --run WORKDIR/runs/quickstart --out benchmarks/results/inference.json

Per spec (default: the quickstart's and Kinetics-400's), `--videos` synthetic motion videos of the spec's source
geometry are written as H.264 like downloaded clips (a synthetic spec's own frames and size; otherwise `--frames`
frames at the stored frame size), and each is predicted as the two models would, with networks of the spec's
width and classes (random weights: the cost does not depend on them), on the CPU in fp32:

- decode: `ExportedModel`'s path, as `d3dc predict` takes it: read the file, bring it to the stored geometry, store
  and decode it as the shards are (VP9, DALI), cut the evaluation's clips (`data.eval_clips`, or `--clips`);
- the student: decode + the RGB network on those clips;
- two-stream: decode + TV-L1 flow at the spec's settings (`prep.flow`, from `dataprep.flow.compute_flow`) between
  the stored frames the clips read, and only those, quantised as the shards store it + the flow network + the
  RGB network (averaging the two softmax scores costs nothing measurable).

Each part is timed once per video (the decode is the same work for both and is counted in both); medians over the
videos, after a warm-up (DALI's pipeline, each network once). The saving is the two-stream median over the
student's. `--run DIR`: a run with both stages evaluated (`results.json`) adds the accuracy of each on its held
validation split: the student's top-1 and the student + teacher ensemble's, which is the two-stream model's.
`--smoke`: 2 videos of the tiny spec of `benchmarks.SMOKE_SPEC` (Farneback flow), one thread (beside other work,
spinning OpenMP threads made a tiny network pass many times slower).
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
import torch

from benchmarks import SMOKE_SPEC, parse_args, write_report
from benchmarks.dataprep import make_videos
from d3d_cluster.data.order import eval_views
from d3d_cluster.data.pipeline import stored_geometry
from d3d_cluster.data.schema import dequantize_flow, quantize_flow
from d3d_cluster.models import S3DG
from d3d_cluster.predict import ExportedModel, view_crops
from d3d_cluster.rundir import RESULTS_NAME
from d3d_cluster.spec import Spec, load_spec
from dataprep.flow import compute_flow
from dataprep.video import read_video

SPECS = ["jobs/quickstart.yaml", "jobs/kinetics400.yaml"]
SMOKE = {"specs": ["jobs/quickstart.yaml"], "videos": 2, "threads": 1}


def source_geometry(spec: Spec, frames: int) -> tuple[int, int, int]:
    """Frames, height and width of the videos a spec's source would give."""
    if spec.prep.source == "synthetic":
        return spec.prep.synthetic.frames, spec.prep.synthetic.size, spec.prep.synthetic.size
    if spec.prep.frame_size:
        return frames, *spec.prep.frame_size
    return frames, spec.prep.short_side, 2 * round(spec.prep.short_side * 4 / 3 / 2)


def flow_clips(stored: np.ndarray, spec: Spec, count: int) -> torch.Tensor:
    """(count, 2, T, S, S) flow clips of the evaluation's views as the teacher is fed them, the flow computed only
    between the frame pairs the views read."""
    geometry = stored_geometry(*stored.shape[1:3], spec.data)
    views = eval_views(geometry, len(stored), count, 1)
    needed = sorted({view.start + k * geometry.stride for view in views for k in range(geometry.clip_frames)})
    flow = np.zeros((len(stored) - 1, *stored.shape[1:3], 2), np.float32)
    runs = np.split(np.array(needed), np.flatnonzero(np.diff(needed) > 1) + 1)  # consecutive pairs in one call
    for run in runs:
        flow[run[0]: run[-1] + 1] = compute_flow(stored[run[0]: run[-1] + 2], spec.prep.flow)
    bound = spec.prep.flow.bound
    crops = dequantize_flow(quantize_flow(view_crops(flow, geometry, views), bound), bound) / bound
    return torch.from_numpy(np.ascontiguousarray(crops.transpose(0, 4, 1, 2, 3)))


def time_video(student: ExportedModel, teacher: S3DG, path: Path, clips: int) -> dict:
    """Seconds of each part of predicting one video, both ways."""
    started = time.perf_counter()
    stored = student.stored_frames(*read_video(path))
    rgb = student.rgb_clips(stored, clips)
    decoded = time.perf_counter()
    student.logits(rgb)
    rgb_done = time.perf_counter()
    flow = flow_clips(stored, student.spec, clips)
    flow_done = time.perf_counter()
    with torch.no_grad():
        teacher(flow)
    finished = time.perf_counter()
    return {"decode_s": decoded - started, "rgb_network_s": rgb_done - decoded, "flow_s": flow_done - rgb_done,
            "flow_network_s": finished - flow_done}


def measure(spec_path: str, spec: Spec, videos: int, frames: int, clips: int | None, classes: int) -> dict:
    frames, height, width = source_geometry(spec, frames)
    clips = clips or spec.data.eval_clips
    torch.manual_seed(0)
    arguments = dict(num_classes=classes, width=spec.model.width, gating=spec.model.gating)
    student = ExportedModel(S3DG(in_channels=3, **arguments).eval(), [str(c) for c in range(classes)], spec,
                            torch.device("cpu"))
    teacher = S3DG(in_channels=2, **arguments).eval()
    with tempfile.TemporaryDirectory(prefix="d3dc-bench-inference-") as tmp:
        make_videos(Path(tmp), videos, frames, height, width)
        paths = sorted(Path(tmp).glob("*.mp4"))
        warm = student.rgb_clips(student.stored_frames(*read_video(paths[0])), clips)  # DALI's pipeline
        student.logits(warm)  # each network's first pass (flow has nothing to warm up)
        with torch.no_grad():
            teacher(torch.zeros(len(warm), 2, *warm.shape[2:]))
        timed = []
        for path in paths:
            timed.append(time_video(student, teacher, path, clips))
            print(f"{spec.name} {path.name}: " + ", ".join(f"{key} {value:.3f}" for key, value in timed[-1].items()),
                  flush=True)
    parts = {key: [video[key] for video in timed] for key in timed[0]}
    student_s = [d + r for d, r in zip(parts["decode_s"], parts["rgb_network_s"])]
    two_stream_s = [d + r + f + n for d, r, f, n in zip(parts["decode_s"], parts["rgb_network_s"], parts["flow_s"],
                                                        parts["flow_network_s"])]
    seconds = {**parts, "student": student_s, "two_stream": two_stream_s}
    result = {
        "spec": spec_path, "name": spec.name, "videos": videos,
        "source_video": {"frames": frames, "height": height, "width": width},
        "clips_per_video": clips,
        "clip": [spec.data.clip_frames, spec.data.crop_size, spec.data.crop_size], "width": spec.model.width,
        "classes": classes, "flow": spec.prep.flow.model_dump(),
        "seconds": seconds,
        "medians": {key: statistics.median(values) for key, values in seconds.items()},
        "per_video_two_stream_over_student": [t / s for t, s in zip(two_stream_s, student_s)],
    }
    result["two_stream_over_student"] = result["medians"]["two_stream"] / result["medians"]["student"]
    result["videos_per_second"] = {"student": 1 / result["medians"]["student"],
                                   "two_stream": 1 / result["medians"]["two_stream"]}
    print(f"{spec.name}: student {result['medians']['student']:.2f} s a video, two-stream "
          f"{result['medians']['two_stream']:.2f} s ({result['two_stream_over_student']:.1f}x)", flush=True)
    return result


def accuracy(run: Path) -> dict:
    """The student's and the two-stream ensemble's top-1 on the run's held validation split (its results.json)."""
    results = json.loads((run / RESULTS_NAME).read_text())
    models = results["models"]
    missing = {"student", "teacher", "student+teacher"} - set(models)
    if missing:
        raise SystemExit(f"{run / RESULTS_NAME}: no {', '.join(sorted(missing))}: evaluate the teacher and the student")
    return {"run": str(run), "val_samples": results["val_samples"], "views_per_video": results["views_per_video"],
            "student_top1": models["student"]["top1"], "two_stream_top1": models["student+teacher"]["top1"],
            "teacher_top1": models["teacher"]["top1"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--specs", nargs="+", default=SPECS, help="job specs whose geometry is measured")
    parser.add_argument("--videos", type=int, default=5, help="videos per spec (medians over them)")
    parser.add_argument("--frames", type=int, default=250, help="frames of a non-synthetic spec's videos (25 fps)")
    parser.add_argument("--clips", type=int, help="clips per video (default: the spec's data.eval_clips)")
    parser.add_argument("--classes", type=int, default=400, help="classes of a non-synthetic spec's networks")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="torch and OpenCV threads")
    parser.add_argument("--run", type=Path, help="an evaluated run (teacher and student): the accuracy of each")
    parser.add_argument("--out", default="benchmarks/results/inference.json")
    args = parse_args(parser, SMOKE)

    report_accuracy = accuracy(args.run) if args.run else None
    torch.set_num_threads(args.threads)
    cv2.setNumThreads(args.threads)
    load_before = os.getloadavg()
    results = []
    for path in args.specs:
        spec = load_spec(path, SMOKE_SPEC if args.smoke else None)
        classes = spec.prep.synthetic.classes if spec.prep.source == "synthetic" else args.classes
        results.append(measure(path, spec, args.videos, args.frames, args.clips, classes))
    report = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.node()} {platform.machine()}, {len(os.sched_getaffinity(0))} cores, "
                   f"{args.threads} threads, no GPU used",
        "torch": torch.__version__,
        "load_average_1min_before_after": [load_before[0], os.getloadavg()[0]],  # a shared machine
        "results": results,
        "accuracy": report_accuracy,
    }
    write_report(report, args.out)


if __name__ == "__main__":
    main()
