"""How much of a real stage's time goes to waiting for data: a teacher stage and then a student stage (which reads
RGB and flow and runs the frozen teacher), each `--ranks` ranks (one by default) through the real job path (local
executor, DeepSpeed, the DALI loader: on the GPU machine its mixed decoder), on prepared shards. From rank 0's train log, after the first
`--settle` steps (cuDNN's algorithm timing, DALI's warm-up): the median step time, clips/s and the share of the
step time spent waiting for the batch.
`--layouts 1x8 4x4 1x16cpu` runs both stages once per data layout of a rank, as `benchmarks.loader`'s layouts:
PIPELINESxTHREADS (`data.pipelines`, `data.reader_threads`), `cpu` after it for DALI's CPU decoder in place of the
mixed one (`data.decoder`); each in a run of its own, stage by stage in turn (the teachers, then the students),
writing the figures after every stage: a run cut short still has the pairs it finished.

    python -m benchmarks.data_wait --shards .kit/bench --clip-frames 64 --crop 224 --batch 8 --width 1.0 \\
        --layouts 1x8 2x8 4x4 1x16cpu --out benchmarks/results/data_wait_h100.json

`--smoke`: tiny shards made here (PyAV), 8-frame clips at 24 px on the CPU.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from benchmarks import data_layout, parse_args
from d3d_cluster.data.schema import Manifest
from d3d_cluster.launch.pipeline import run_stage
from d3d_cluster.rundir import TRAIN_LOG_NAME, RunDir
from d3d_cluster.spec import Spec
from d3d_cluster.train.curves import read_train_log

SMOKE = {"clip_frames": 8, "crop": 24, "batch": 2, "width": 0.25, "steps": 4, "settle": 1, "layouts": ["1x4", "2x4"]}


def stage_figures(run: RunDir, stage: str, settle: int) -> dict:
    records = read_train_log(run.path / stage / TRAIN_LOG_NAME)
    timed = records[settle:] or records
    step = [r["step_seconds"] for r in timed]
    wait = [r["data_wait_seconds"] for r in timed]
    return {"steps": len(records), "timed_steps": len(timed), "median_step_s": statistics.median(step),
            "median_clips_per_s": statistics.median(r["clips_per_second"] for r in timed),
            "data_wait_share": sum(wait) / sum(step), "median_data_wait_s": statistics.median(wait)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", type=Path, help="prepared shards (default with --smoke: made under --workdir)")
    parser.add_argument("--workdir", type=Path, help="where the run goes (default: a temporary folder)")
    parser.add_argument("--clip-frames", type=int, default=64)
    parser.add_argument("--crop", type=int, default=224)
    parser.add_argument("--batch", type=int, default=8, help="clips per step and rank")
    parser.add_argument("--ranks", type=int, default=1, help="ranks on this machine (the quickstart's CPU runs 2)")
    parser.add_argument("--width", type=float, default=1.0)
    parser.add_argument("--layouts", nargs="+", default=["1x4"], metavar="PIPELINESxTHREADS[cpu]",
                        help="data layouts of a rank, one run each (2x4: two DALI pipelines of 4 threads; 1x16cpu: "
                             "DALI's CPU decoder on 16 threads)")
    parser.add_argument("--steps", type=int, default=24, help="steps per stage, at least")
    parser.add_argument("--settle", type=int, default=4, help="first steps left out of the figures")
    parser.add_argument("--out", default="benchmarks/results/data_wait.json")
    args = parse_args(parser, SMOKE)
    try:
        layouts = {layout: data_layout(layout) for layout in args.layouts}
    except argparse.ArgumentTypeError as error:
        parser.error(f"--layouts: {error}")

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="d3dc-data-wait-"))
    shards = args.shards
    if shards is None:
        from benchmarks.loader import make_shards

        shards = make_shards(workdir / "data", frames=12, size=32, videos=12)
    # Whole epochs of at least --steps steps (the last step of an epoch may be short).
    manifest = Manifest.load(shards)
    epochs = -(-args.steps * args.batch * args.ranks // manifest.splits["train"].samples)
    runs = {layout: RunDir.create(Spec.model_validate({
        "name": f"data-wait-{layout}", "workdir": str(workdir),
        "prep": {"short_side": min(manifest.height, manifest.width), "synthetic": {"frames": manifest.min_frames}},
        "data": {"shards": str(shards.resolve()), "clip_frames": args.clip_frames, "crop_size": args.crop,
                 "batch_size": args.batch, **settings},
        "model": {"width": args.width}, "teacher": {"epochs": epochs}, "student": {"epochs": epochs},
        "deepspeed": {"global_batch_size": args.batch * args.ranks}, "checkpoint": {"every_steps": 10**6},
        "cluster": {"executor": "local", "tasks_per_node": args.ranks}})) for layout, settings in layouts.items()}
    gpu = torch.cuda.is_available()
    report = {"date": time.strftime("%Y-%m-%d"), "args": {**vars(args), "shards": str(shards), "workdir": str(workdir)},
              "machine": f"{platform.node()}, " + (torch.cuda.get_device_name(0) if gpu else "CPU"),
              "decoder": "mixed, cpu where the layout says" if gpu else "cpu", "results": {}}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    for stage in ("teacher", "student"):
        for layout, run in runs.items():
            run_stage(run, stage, echo=lambda line: None)
            figures = stage_figures(run, stage, args.settle)
            report["results"].setdefault(layout, {})[stage] = figures
            print(f"{stage}, {layout}: {json.dumps(figures)}", flush=True)
            Path(args.out).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
