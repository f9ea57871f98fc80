"""What precomputing the teacher's outputs saves the student: the same student stage trained with its live teacher
and with `student.distill.precompute`, in one run, on one prepared dataset.

    .venv/bin/python -m benchmarks.precompute --workdir /tmp/d3dc-precompute-bench --out benchmarks/results/precompute.json

Each repeat runs three student stage jobs through the real launcher (local executor, the spec's ranks, DeepSpeed
on gloo), from one exported teacher:
- live: RGB and flow decoded, the teacher run on each batch;
- precompute: the pass over every (epoch, clip) first (flow only, teacher forward), then RGB-only training;
- reused: the precompute run's stage again, finding its side file complete (what a requeued student does).
Reported per mode, as medians over repeats: training clips/s (the loop, world throughput), the loop's seconds,
the pass's seconds, and the stage's wall time from job start to the exported model (process start, DeepSpeed
set-up, the pass and training); the ratios of those medians, and the medians of the ratios within a repeat. The teacher is a randomly initialised
S3D-G: its weights do not change what a step costs. Modes alternate their order between repeats, and the
load average is recorded: the machine may be shared.
`--smoke`: one repeat of one epoch on the tiny dataset and clips of `benchmarks.SMOKE_SPEC`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import time
from pathlib import Path

import torch

from benchmarks import SMOKE_SPEC, parse_args, prepare, write_report
from d3d_cluster.data.schema import Manifest
from d3d_cluster.launch.pipeline import run_stage
from d3d_cluster.rundir import RunDir
from d3d_cluster.spec import FEATURE_LAYERS, Spec
from d3d_cluster.train.checkpoint import CHECKPOINTS
from d3d_cluster.train.stages import EXPORT_NAME, build_model
from d3d_cluster.train.teacher_outputs import DIRECTORY_NAME, MANIFEST_NAME

MODES = ("live", "precompute", "reused")
SMOKE = {"repeats": 1, "epochs": 1}


def run_student(spec: Spec, teacher: Path, reuse: RunDir | None) -> tuple[RunDir, dict]:
    run = reuse or RunDir.create(spec)
    if reuse is None:
        shutil.copyfile(teacher, run.stage("teacher") / EXPORT_NAME)
    else:  # the finished stage's last checkpoint would resume it at its end: train again, with the side file only
        shutil.rmtree(run.stage("student") / CHECKPOINTS)
    load_before = os.getloadavg()[0]
    summary = run_stage(run, "student", echo=lambda line: None)
    side_file = run.path / "student" / DIRECTORY_NAME / MANIFEST_NAME
    pass_seconds = sum(json.loads(side_file.read_text())["seconds"].values()) if side_file.exists() and reuse is None \
        else 0.0
    return run, {"clips_per_second": summary["clips_per_second"], "loop_seconds": summary["seconds"],
                 "pass_seconds": pass_seconds, "wall_seconds": summary["wall_seconds"],
                 "load_average": [load_before, os.getloadavg()[0]]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="/tmp/d3dc-precompute-bench")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=4, help="student epochs")
    parser.add_argument("--target", choices=["logits", *FEATURE_LAYERS], default="logits")
    parser.add_argument("--out", default="benchmarks/results/precompute.json")
    args = parse_args(parser, SMOKE)

    base = Spec().with_overrides(workdir=args.workdir, **{**(SMOKE_SPEC if args.smoke else {}),
                                                          "prep.flow.algorithm": "farneback", "cluster.executor": "local",
                                                          "student.epochs": args.epochs,
                                                          "student.distill.target": args.target})
    started = time.time()
    shards = prepare(base)
    prep_seconds = time.time() - started
    teacher = Path(args.workdir) / "teacher-random.pt"
    torch.manual_seed(0)
    torch.save(build_model(base.model, "flow", len(Manifest.load(shards).classes)).state_dict(), teacher)

    stamp = time.strftime("%H%M%S")
    rows = {mode: [] for mode in MODES}
    for repeat in range(args.repeats):
        order = ("live", "precompute") if repeat % 2 == 0 else ("precompute", "live")
        for mode in order:
            spec = base.with_overrides(name=f"bench-{stamp}-{mode}-{repeat}",
                                       **{"student.distill.precompute": mode == "precompute"})
            run, row = run_student(spec, teacher, None)
            rows[mode].append(row)
            print(json.dumps({"repeat": repeat, "mode": mode, **row}), flush=True)
            if mode == "precompute":
                _, row = run_student(spec, teacher, run)
                rows["reused"].append(row)
                print(json.dumps({"repeat": repeat, "mode": "reused", **row}), flush=True)

    medians = {mode: {key: statistics.median(row[key] for row in rows[mode])
                      for key in ("clips_per_second", "loop_seconds", "pass_seconds", "wall_seconds")}
               for mode in MODES}
    live, pre, reused = (medians[mode] for mode in MODES)
    manifest = Manifest.load(shards)
    report = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.node()} {platform.machine()}, {len(os.sched_getaffinity(0))} cores, no GPU",
        "setup": {"train_clips": manifest.splits["train"].samples, "epochs": args.epochs, "target": args.target,
                  "ranks": base.world_size, "batch_per_rank": base.data.batch_size,
                  "clip": [base.data.clip_frames, base.data.crop_size, base.data.crop_size],
                  "model_width": base.model.width, "repeats": args.repeats},
        "prep_seconds": prep_seconds,
        "medians": medians,
        "ratios": {
            "training_clips_per_second_precompute_over_live": pre["clips_per_second"] / live["clips_per_second"],
            "wall_live_over_precompute_with_pass": live["wall_seconds"] / pre["wall_seconds"],
            "wall_live_over_reused": live["wall_seconds"] / reused["wall_seconds"],
            "pass_seconds_over_live_loop_seconds": pre["pass_seconds"] / live["loop_seconds"],
        },
        # Live and precompute of one repeat ran back to back: their ratios are less exposed to drifting load.
        "paired_ratio_medians": {
            "training_clips_per_second_precompute_over_live": statistics.median(
                p["clips_per_second"] / l["clips_per_second"] for p, l in zip(rows["precompute"], rows["live"])),
            "wall_live_over_precompute_with_pass": statistics.median(
                l["wall_seconds"] / p["wall_seconds"] for p, l in zip(rows["precompute"], rows["live"])),
            "wall_live_over_reused": statistics.median(
                l["wall_seconds"] / r["wall_seconds"] for r, l in zip(rows["reused"], rows["live"])),
        },
        "load_average_range": [min(min(r["load_average"]) for rs in rows.values() for r in rs),
                               max(max(r["load_average"]) for rs in rows.values() for r in rs)],
        "runs": rows,
    }
    write_report(report, args.out)
    print(json.dumps({key: report[key] for key in ("medians", "ratios", "paired_ratio_medians", "load_average_range")},
                     indent=2))


if __name__ == "__main__":
    main()
