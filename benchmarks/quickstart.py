"""The quickstart, with several training seeds on one prepared dataset: accuracy mean and spread, wall times.

    .venv/bin/python -m benchmarks.quickstart --seeds 0 1 2 --workdir /tmp/d3dc-bench --out benchmarks/results/quickstart.json

The dataset is made and prepared once, by `d3dc prep` in a process of its own (its time is reported on its own);
each seed then trains the teacher, the student and the RGB-only baseline from scratch with that seed (weights and
sample order). `--smoke`: seed 0 only, one epoch per stage on the tiny spec of `benchmarks.SMOKE_SPEC`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchmarks import SMOKE_SPEC, parse_args
from d3d_cluster.launch.pipeline import run_pipeline
from d3d_cluster.rundir import RunDir
from d3d_cluster.spec import Spec, load_spec

SMOKE = {"seeds": [0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--spec", help="job spec (default: the embedded quickstart)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--workdir", default="/tmp/d3dc-bench")
    parser.add_argument("--out", default="benchmarks/results/quickstart.json")
    args = parse_args(parser, SMOKE)

    spec = (load_spec(args.spec) if args.spec else Spec()).with_overrides(
        workdir=args.workdir, **{"cluster.executor": "local"}, **(SMOKE_SPEC if args.smoke else {}))
    spec_path = Path(args.workdir) / "benchmark-spec.yaml"  # what `d3dc prep` reads: the spec trained below
    spec_path.parent.mkdir(parents=True, exist_ok=True)
    spec_path.write_text(spec.to_yaml())
    started = time.time()
    subprocess.run([sys.executable, "-m", "d3d_cluster.cli", "prep", "-c", str(spec_path)], check=True)
    prep_seconds = time.time() - started

    runs = {}
    for seed in args.seeds:
        seeded = spec.with_overrides(seed=seed, name=f"{spec.name}-seed{seed}")
        began = time.time()
        results = run_pipeline(RunDir.create(seeded))
        results["wall_seconds"] = time.time() - began
        runs[seed] = results
        print(json.dumps({"seed": seed, **{m: r["top1"] for m, r in results["models"].items()}}), flush=True)

    models = runs[args.seeds[0]]["models"]
    summary = {
        model: {
            "top1_mean": statistics.mean(runs[s]["models"][model]["top1"] for s in args.seeds),
            "top1_stdev": statistics.stdev(runs[s]["models"][model]["top1"] for s in args.seeds) if len(args.seeds) > 1 else 0.0,
            "top1_per_seed": [runs[s]["models"][model]["top1"] for s in args.seeds],
            **({"wall_seconds_median": statistics.median(runs[s]["models"][model]["wall_seconds"] for s in args.seeds),
                "clips_per_second_median": statistics.median(runs[s]["models"][model]["clips_per_second"] for s in args.seeds)}
               if "wall_seconds" in models[model] else {}),
        }
        for model in models
    }
    report = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.node()} {platform.machine()}, {len(os.sched_getaffinity(0))} cores",
        "chance": runs[args.seeds[0]]["chance"],
        "val_samples": runs[args.seeds[0]]["val_samples"],
        "prep_seconds": prep_seconds,
        "train_wall_seconds_median": statistics.median(r["wall_seconds"] for r in runs.values()),
        "seeds": args.seeds,
        "models": summary,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
