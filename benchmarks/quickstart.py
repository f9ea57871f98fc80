"""The quickstart's claim, measured with paired seeds: does the distilled student beat the RGB-only baseline?

    .venv/bin/python -m benchmarks.quickstart --seeds 0 1 2 3 4 --probe --workdir /tmp/d3dc-bench \
        --out benchmarks/results/quickstart.json

The dataset is made and prepared once, by `d3dc prep` in a process of its own (its time is reported on its own).
The seeds are then a study, as `d3dc submit pipeline --seeds` runs it with the local executor (one run per seed,
`NAME/seed-S`, in turn): each trains the teacher, the student and the RGB-only baseline from scratch. Student and
baseline of a seed are paired: the same initial weights, the same clips in the same order, the same crops and
mirrors (a training view is a function of seed, epoch and sample), so their difference is distillation's alone; the
report's `paired` section is `d3dc compare`'s summary of those differences (`d3d_cluster.compare`), with a 95%
Student t interval. With `--probe`, `d3dc probe` then decodes optical flow from each network's layers (D3D
section 3).

`--set KEY=VALUE` changes the spec (a setting under test: `--set student.distill.weight=0.3`); the report keeps
the spec it trained. Submitting the study again trains only what has not finished (nor probes again with the same
settings), so the same command resumes an interrupted benchmark, adding `--probe` afterwards only probes, and more
seeds extend it; a change that concerns a trained stage is refused, as `d3dc submit` refuses it: another setting
needs a study of its own (`--set name=...`, or another `--workdir`), and `--reuse EARLIER_WORKDIR` copies into its
runs the stages the setting does not change (the report lists them). Several settings at once are a sweep:
`d3dc submit pipeline --seeds 0-4 --sweep KEY=V1,V2` and `d3dc compare`. `--shards DIR` trains on shards prepared
elsewhere, as `d3dc prep` of the same spec wrote them (the GPU machine cannot prepare: it lacks PyAV). `--smoke`:
seed 0 only, one epoch per stage on the tiny spec of `benchmarks.SMOKE_SPEC`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchmarks import SMOKE_SPEC, parse_args, write_report
from d3d_cluster.compare import paired_row, paired_summary, spread
from d3d_cluster.launch.study import study_points, submit_study
from d3d_cluster.rundir import RESULTS_NAME, RunDir, trained_with
from d3d_cluster.spec import ProbeSpec, Spec, load_spec, parse_assignment
from d3d_cluster.train.probe import PROBE_NAME, run_probe
from d3d_cluster.train.stages import EXPORT_NAME

SMOKE = {"seeds": [0], "probe_epochs": 1}
NETWORKS = ("teacher", "student", "baseline")


def compare_probes(probes: dict[int, dict]) -> dict:
    """EPE / zero-flow EPE per layer and network across seeds, and in how many seeds the student's features carry
    more motion (a lower ratio) than the baseline's."""
    layers = [row["layer"] for row in next(iter(probes.values()))["student"]["layers"]]

    def ratio(seed: int, network: str, layer: str) -> float:
        row = next(row for row in probes[seed][network]["layers"] if row["layer"] == layer)
        return row["epe"] / row["zero_flow_epe"]

    return {layer: {**{network: spread([ratio(s, network, layer) for s in probes]) for network in NETWORKS},
                    "student_below_baseline": sum(ratio(s, "student", layer) < ratio(s, "baseline", layer)
                                                  for s in probes)}
            for layer in layers}


def reuse_stages(run: RunDir, earlier_workdir: Path) -> None:
    """Copy into a seed's new run, before it trains, every stage that a finished run of the same seed under
    `earlier_workdir` trained with the same settings (`trained_with`), so that a setting under test retrains only
    the stages it changes: a student setting, only the student. Each copy is a `reused` event of the run."""
    spec = run.spec()
    for stage in NETWORKS:
        if (run.path / stage).exists():
            continue
        for export in sorted((earlier_workdir / "runs").glob(f"**/{stage}/{EXPORT_NAME}")):  # runs and study points
            earlier = RunDir(export.parent.parent)
            if trained_with(earlier.spec(), stage) == trained_with(spec, stage):
                shutil.copytree(earlier.path / stage, run.path / stage, ignore=shutil.ignore_patterns("submitit"))
                run.event("reused", stage=stage, source=str(earlier.path))
                break


def reused_stages(spec: Spec) -> dict[str, str]:
    return {event["stage"]: event["source"] for event in RunDir(spec.run_dir).events() if event["event"] == "reused"}


def probed(spec: Spec, network: str, settings: ProbeSpec) -> dict:
    """`d3dc probe` of one network of a seed's run; an earlier probe with the same settings is kept."""
    earlier = spec.run_dir / network / PROBE_NAME
    if earlier.is_file():
        result = json.loads(earlier.read_text())
        if result["settings"] == settings.model_dump():
            return result
    return run_probe(spec.run_dir, network, settings)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--spec", help="job spec (default: the embedded quickstart)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="a spec change, as `d3dc submit --set` takes it (repeatable)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--probe", action="store_true", help="probe each network for motion after training")
    parser.add_argument("--probe-epochs", type=int, help="decoder epochs (default: the spec's probe.epochs)")
    parser.add_argument("--workdir", default="/tmp/d3dc-bench")
    parser.add_argument("--reuse", type=Path, metavar="WORKDIR",
                        help="an earlier benchmark's workdir: its finished stages trained with the same settings as "
                             "this spec's, seed by seed, are copied instead of trained again")
    parser.add_argument("--shards", type=Path, help="prepared shards to train on (default: `d3dc prep` them)")
    parser.add_argument("--out", default="benchmarks/results/quickstart.json")
    args = parse_args(parser, SMOKE)

    changes = dict(parse_assignment(override) for override in args.overrides)
    prepared = {"data.shards": str(args.shards.resolve())} if args.shards else {}
    spec = load_spec(args.spec, {**(SMOKE_SPEC if args.smoke else {}), **changes, **prepared,
                                 "workdir": args.workdir, "cluster.executor": "local"})
    spec_path = Path(args.workdir) / "benchmark-spec.yaml"  # what `d3dc prep` reads: the spec trained below
    spec_path.parent.mkdir(parents=True, exist_ok=True)
    spec_path.write_text(spec.to_yaml())
    started = time.time()
    if not args.shards:
        subprocess.run([sys.executable, "-m", "d3d_cluster.cli", "prep", "-c", str(spec_path)], check=True)
    prep_seconds = time.time() - started
    probe_settings = (spec.with_overrides(**{"probe.epochs": args.probe_epochs}) if args.probe_epochs else spec).probe

    points = study_points(spec, args.seeds, {})
    if args.reuse:
        for point in points:
            if not point.run.path.exists():
                reuse_stages(RunDir.create(point.spec), args.reuse)
    try:
        submit_study(spec, args.seeds, {})
    except ValueError as error:  # a spec change a trained stage concerns, or seeds the study had dropped
        raise SystemExit(str(error)) from None
    runs, probes, reused = {}, {}, {}
    for point in points:
        runs[point.seed] = json.loads((point.run.path / RESULTS_NAME).read_text())
        reused[point.seed] = reused_stages(point.spec)
        if args.probe:
            probes[point.seed] = {network: probed(point.spec, network, probe_settings) for network in NETWORKS}
        print(json.dumps({"seed": point.seed, **{m: r["top1"] for m, r in runs[point.seed]["models"].items()}}),
              flush=True)

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
        "command": " ".join(["python -m benchmarks.quickstart", *sys.argv[1:]]),
        "chance": runs[args.seeds[0]]["chance"],
        "val_samples": runs[args.seeds[0]]["val_samples"],
        "prep_seconds": prep_seconds,
        "train_wall_seconds_median": statistics.median(sum(r["models"][n]["wall_seconds"] for n in NETWORKS)
                                                       for r in runs.values()),
        "seeds": args.seeds,
        "models": summary,
        "paired": paired_summary([paired_row(seed, run["models"]) for seed, run in runs.items()]),
        **({"probe": compare_probes(probes), "probe_settings": probe_settings.model_dump()} if probes else {}),
        "spec_changes": changes,
        "reused_stages": reused,
        "spec": spec.model_dump(),
    }
    write_report(report, args.out)
    print(json.dumps({key: report[key] for key in ("models", "paired", "probe") if key in report}, indent=2))


if __name__ == "__main__":
    main()
