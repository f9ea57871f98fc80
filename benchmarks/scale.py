"""One rank's host memory and start-up at Kinetics-700 size, on a fabricated split (issue 27, "Memory at scale").

    .venv/bin/python -m benchmarks.scale --workdir /tmp/d3dc-scale --out benchmarks/results/scale.json

The split: 550k training and 35k validation videos of 700 classes in 5,500 shards, fabricated as far as a rank's
start-up reads it: each shard's DALI index written by `format_index` at the offsets a tar of its members has (the
layout is checked against `wds2idx` on a real tar first, every run), a sparse tar of the length that index implies
(nothing reads tars at start-up), and the manifest through `Manifest.save` with every shard's frame counts, labels
and member checksums. Member sizes, frame counts and labels are drawn at Kinetics' scale (10 s clips at 25 fps).
The split is fabricated once per size in --workdir and reused.

Each measurement runs in a fresh subprocess, so that numbers do not mix; memory is tracemalloc's (Python objects
and numpy buffers) and the process's resident set (RSS):
- tables: the manifest and both splits' `SampleTable`s read as a rank's loaders read them: seconds (untraced; the
  index files are in the page cache, as right after fabrication), RSS, and traced peak and retained bytes;
- plan: one rank's steps of a training epoch and of the evaluation (`training_plan`, `evaluation_plan`: the
  planning functions `ClipLoader` calls), seconds and traced peak;
- eval: rank 0's memory in the evaluation gather at `--views` views a video, `--ranks` ranks simulated in one
  process: the other ranks run first, one after another, and spool what each of their gathers sends to disk; rank 0
  then runs with a gather that reads every rank's bytes, then unpickles them, as torch's gather_object does. Before:
  every view's logits gathered (`gather_every_view`, the code before issue 27); after: `gather_predictions`.
- side files: the bytes a training clip costs the precompute pass's teacher outputs per target, at
  jobs/kinetics400.yaml's clip geometry (computed on the meta device, in this process).
Targets: 1 GB a rank for the data plane's tables, 60 s start-up, 2 GB on rank 0 for evaluation.
`--smoke`: a split of 2,000 + 300 videos of 20 classes in 12 shards, 4 ranks, 6 views; two side-file targets.
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import math
import os
import pickle
import platform
import shutil
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np

from benchmarks import parse_args, write_report

TAR_BLOCK = 512
TAR_RECORD = 10240  # tar pads an archive to whole records of 20 blocks
TARGETS = {"tables_bytes": 1e9, "startup_seconds": 60.0, "eval_rank0_bytes": 2e9}
SMOKE = {"train_videos": 2000, "val_videos": 300, "classes": 20, "shards": 12, "ranks": 4, "views": 6,
         "side_targets": ["logits", "mixed_5c"]}


# --- the fabricated split ---------------------------------------------------------------------------------------

def tar_layout(keys: list[str], sizes: dict[str, np.ndarray]) -> tuple[list[tuple[str, dict]], int]:
    """Each sample's members at the offsets a tar writer puts them (a 512-byte header before each member, members
    in name order, data padded to whole blocks), and the tar's length."""
    samples, position = [], 0
    for sample, key in enumerate(keys):
        members = {}
        for ext in sorted(sizes):
            size = int(sizes[ext][sample])
            members[ext] = (position + TAR_BLOCK, size)
            position += TAR_BLOCK + math.ceil(size / TAR_BLOCK) * TAR_BLOCK
        samples.append((key, members))
    return samples, math.ceil((position + 2 * TAR_BLOCK) / TAR_RECORD) * TAR_RECORD


def check_layout(directory: Path) -> None:
    """`tar_layout` and `format_index` against `wds2idx` on a real tar written as prep writes shards."""
    import webdataset

    from d3d_cluster.data.index import format_index
    from d3d_cluster.data.schema import SAMPLE_EXTS
    from dataprep.shards import wds2idx

    keys = ["train_000000", "train_000001"]
    sizes = {ext: np.array([size, size + 700]) for ext, size in zip(SAMPLE_EXTS, (1000, 513, 2, 512))}
    directory.mkdir(parents=True, exist_ok=True)
    tar, index = directory / "layout.tar", directory / "layout.idx"
    with open(tar, "wb") as handle:
        writer = webdataset.TarWriter(handle, mtime=0)
        for sample, key in enumerate(keys):
            writer.write({"__key__": key, **{ext: b"x" * int(sizes[ext][sample]) for ext in sizes}})
        writer.close()
    subprocess.run([wds2idx(), tar, index], check=True, capture_output=True)
    samples, length = tar_layout(keys, sizes)
    if format_index(samples) != index.read_text() or length != tar.stat().st_size:
        raise RuntimeError(f"{index}: the fabricated index or tar length differs from wds2idx's on a real tar "
                           f"(length {length} vs {tar.stat().st_size}): fix tar_layout before measuring")


def fabricate(directory: Path, train_videos: int, val_videos: int, classes: int, shards: int, seed: int = 0) -> Path:
    """The split's manifest, indexes and sparse tars in `directory` (reused when made with the same sizes)."""
    from d3d_cluster.data.index import format_index
    from d3d_cluster.data.schema import FLOW_EXT, LABEL_EXT, META_EXT, RGB_EXT, Manifest, ShardInfo, SplitInfo

    sizes = {"train_videos": train_videos, "val_videos": val_videos, "classes": classes, "shards": shards,
             "seed": seed}
    stamp = directory / "fabricated.json"
    if stamp.is_file() and json.loads(stamp.read_text()) == sizes:
        return directory
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    names = [f"class_{c:03d}" for c in range(classes)]
    train_shards = max(1, round(shards * train_videos / (train_videos + val_videos)))
    splits = {}
    for split, videos, count in (("train", train_videos, train_shards), ("val", val_videos, shards - train_shards)):
        info = SplitInfo(class_counts={name: 0 for name in names})
        for number, members in enumerate(np.array_split(np.arange(videos), count)):
            keys = [f"{split}_{i:06d}" for i in members]
            labels = rng.integers(0, classes, len(keys))
            member_sizes = {RGB_EXT: rng.lognormal(np.log(750e3), 0.4, len(keys)).astype(np.int64),
                            FLOW_EXT: rng.lognormal(np.log(1.2e6), 0.4, len(keys)).astype(np.int64),
                            LABEL_EXT: np.array([len(str(label)) for label in labels]),
                            META_EXT: rng.integers(90, 130, len(keys))}
            samples, length = tar_layout(keys, member_sizes)
            name = f"{split}-{number:06d}"
            (directory / f"{name}.idx").write_text(format_index(samples))
            with open(directory / f"{name}.tar", "wb") as handle:
                handle.truncate(length)
            checksums = {ext: rng.integers(0, 2**32, len(keys)).tolist() for ext in sorted(member_sizes)}
            info.shards.append(ShardInfo(f"{name}.tar", f"{name}.idx", len(keys), f"{number:064x}",
                                         rng.integers(150, 301, len(keys)).tolist(), labels=labels.tolist(),
                                         checksums=checksums))
            info.samples += len(keys)
            for label in labels:
                info.class_counts[names[label]] += 1
        splits[split] = info
    Manifest(classes=names, min_frames=150, height=256, width=340, fps=25.0, keyframe_interval=8,
             flow={"algorithm": "tvl1", "bound": 20.0}, splits=splits).save(directory)
    stamp.write_text(json.dumps(sizes))
    return directory


# --- what is measured -------------------------------------------------------------------------------------------

def training_plan(items: int, seed: int, epoch: int, rank: int, world: int, batch_size: int) -> list:
    """The rank's steps of one training epoch, planned as `ClipLoader` plans them."""
    from d3d_cluster.data.order import epoch_order, rank_windows

    orders = functools.lru_cache(maxsize=2)(lambda e: epoch_order(items, seed, e, shuffle=True))
    return list(rank_windows(orders, items, epoch, 0, epoch + 1, rank, world, batch_size))


def evaluation_plan(items: int, rank: int, world: int, batch_size: int) -> list:
    """The rank's steps of the evaluation: every view of every video once, in order."""
    from d3d_cluster.data.order import epoch_order, rank_steps

    return rank_steps(epoch_order(items, 0, 0, shuffle=False), 0, rank, world, batch_size)


def gather_every_view(samples, views, logits, labels, keys, views_per_video: int, skipped=()):
    """The evaluation gather before issue 27, kept as the baseline: every view's logits gathered on rank 0."""
    from d3d_cluster.train import evaluate

    parts = evaluate.gather_to_rank0((samples.numpy(), views.numpy(), logits.numpy(), labels.numpy(), list(skipped)))
    if parts is None:
        return None
    all_samples, all_views, all_logits, all_labels = (np.concatenate([p[i] for p in parts]) for i in range(4))
    skipped_videos = {int(s) for p in parts for s in p[4]}
    pairs = all_samples * views_per_video + all_views
    if len(np.unique(pairs)) != len(pairs):
        raise RuntimeError("evaluation read some views twice")
    expected = sorted(set(range(len(keys))) - skipped_videos)
    counts = np.bincount(all_samples, minlength=len(keys))
    incomplete = [keys[s] for s in expected if counts[s] != views_per_video]
    if incomplete:
        raise RuntimeError(f"evaluation is missing views of {len(incomplete)} videos, e.g. {incomplete[:3]}")
    probabilities = np.zeros((len(keys), all_logits.shape[1]), dtype=np.float64)
    np.add.at(probabilities, all_samples, evaluate.softmax(all_logits))
    label_of = np.zeros(len(keys), dtype=np.int64)
    label_of[all_samples] = all_labels
    by_key = sorted(expected, key=lambda s: keys[s])
    return evaluate.Predictions(np.array([keys[s] for s in by_key]),
                                np.log(probabilities[by_key] / views_per_video).astype(np.float32),
                                label_of[by_key], views_per_video,
                                np.array(sorted(keys[s] for s in skipped_videos), dtype=str))


def rss() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def reset_peak_rss() -> None:
    """Start the kernel's high-water mark of this process's RSS again from its current RSS."""
    Path("/proc/self/clear_refs").write_text("5")


def peak_rss() -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM:"))


def traced(action):
    """(result, seconds, traced bytes retained, traced peak), counted from the call."""
    gc.collect()
    tracemalloc.start()
    started = time.perf_counter()
    result = action()
    seconds = time.perf_counter() - started
    retained, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return result, seconds, retained, peak


def measure_startup(config: dict) -> dict:
    """Untraced: seconds and RSS of the manifest and both tables read."""
    from d3d_cluster.data.index import SampleTable
    from d3d_cluster.data.schema import Manifest

    shards, before, seconds = Path(config["shards"]), rss(), {}
    reset_peak_rss()
    started = time.perf_counter()
    manifest = Manifest.load(shards)
    seconds["manifest"] = time.perf_counter() - started
    tables = {}
    for split in ("train", "val"):
        started = time.perf_counter()
        tables[split] = SampleTable.of_split(manifest, shards, split)
        seconds[f"{split}_table"] = time.perf_counter() - started
    del manifest
    gc.collect()
    return {"seconds": seconds, "total_seconds": sum(seconds.values()), "rss_tables_bytes": rss() - before,
            "peak_rss_bytes": peak_rss() - before, "samples": {split: len(t) for split, t in tables.items()}}


def measure_tables(config: dict) -> dict:
    """Traced: what the manifest and each table hold, and the peak while they are read."""
    from d3d_cluster.data.index import SampleTable
    from d3d_cluster.data.schema import Manifest

    shards = Path(config["shards"])
    gc.collect()
    tracemalloc.start()
    manifest = Manifest.load(shards)
    manifest_bytes, peak = tracemalloc.get_traced_memory()
    held = {}
    for split in ("train", "val"):
        before = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        held[split] = SampleTable.of_split(manifest, shards, split)
        retained, split_peak = tracemalloc.get_traced_memory()
        held[f"{split}_bytes"], peak = retained - before, max(peak, split_peak)
    del manifest
    gc.collect()
    tables = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    return {"manifest_bytes": manifest_bytes, "train_table_bytes": held["train_bytes"],
            "val_table_bytes": held["val_bytes"], "tables_bytes": tables, "peak_bytes": peak}


def measure_plan(config: dict) -> dict:
    steps, seconds, _, peak = traced(lambda: training_plan(config["train_videos"], 0, 0, 0, config["ranks"],
                                                           config["batch_size"]))
    eval_steps, eval_seconds, _, eval_peak = traced(lambda: evaluation_plan(config["val_videos"] * config["views"], 0,
                                                                            config["ranks"], config["batch_size"]))
    return {"train_steps": len(steps), "train_seconds": seconds, "train_peak_bytes": peak,
            "eval_steps": len(eval_steps), "eval_seconds": eval_seconds, "eval_peak_bytes": eval_peak}


def rank_predictions(config: dict, rank: int, video_labels: np.ndarray):
    """What `predict` hands a rank: its views' sample and view ids, random logits and labels."""
    import torch

    views = config["views"]
    items = np.concatenate([items for items, _ in evaluation_plan(config["val_videos"] * views, rank,
                                                                  config["ranks"], config["batch_size"])])
    logits = np.random.default_rng([1, rank]).standard_normal((len(items), config["classes"]), dtype=np.float32)
    samples = items // views
    return (torch.from_numpy(samples), torch.from_numpy(items % views), torch.from_numpy(logits),
            torch.from_numpy(video_labels[samples]))


def measure_eval(config: dict) -> dict:
    """Rank 0's memory in one evaluation gather, the other ranks simulated through files (module docstring)."""
    from d3d_cluster.train import evaluate

    gather = {"before": gather_every_view, "after": evaluate.gather_predictions}[config["method"]]
    spool = Path(config["spool"])
    shutil.rmtree(spool, ignore_errors=True)
    spool.mkdir(parents=True)
    video_labels = np.random.default_rng(2).integers(0, config["classes"], config["val_videos"])
    keys = [f"val_{i:06d}" for i in range(config["val_videos"])]

    def spooler(rank: int):
        rounds = iter(range(1 << 62))

        def send(value):
            (spool / f"{next(rounds):05d}-{rank:05d}.pkl").write_bytes(pickle.dumps(value, protocol=5))
        return send

    for rank in range(1, config["ranks"]):
        evaluate.gather_to_rank0 = spooler(rank)
        gather(*rank_predictions(config, rank, video_labels), keys, config["views"])
    sent = sum(path.stat().st_size for path in spool.iterdir())
    rounds = iter(range(1 << 62))

    def receive(value):
        number = next(rounds)
        buffers = [pickle.dumps(value, protocol=5)] + [(spool / f"{number:05d}-{rank:05d}.pkl").read_bytes()
                                                      for rank in range(1, config["ranks"])]
        return [pickle.loads(buffer) for buffer in buffers]

    evaluate.gather_to_rank0 = receive
    inputs = rank_predictions(config, 0, video_labels)
    before = rss()
    reset_peak_rss()
    predictions, seconds, retained, peak = traced(lambda: gather(*inputs, keys, config["views"]))
    shutil.rmtree(spool)
    return {"rank0_peak_bytes": peak, "rank0_retained_bytes": retained, "rank0_peak_rss_bytes": peak_rss() - before,
            "rank0_seconds": seconds, "gathers": next(rounds), "bytes_sent_by_other_ranks": sent,
            "videos": len(predictions.keys), "rank0_input_bytes": inputs[2].numpy().nbytes}


MEASUREMENTS = {"startup": measure_startup, "tables": measure_tables, "plan": measure_plan, "eval": measure_eval}


def in_subprocess(name: str, config: dict) -> dict:
    """One measurement in a fresh interpreter; its JSON is the last line it prints."""
    done = subprocess.run([sys.executable, "-m", "benchmarks.scale", "--measure", name, "--config", json.dumps(config)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"measurement {name} failed:\n{done.stdout[-2000:]}{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def side_files(classes: int, train_videos: int, targets: list[str]) -> dict:
    """Bytes a clip and an epoch of the precompute pass's stored teacher outputs, per target, at the Kinetics spec's
    clip geometry."""
    from d3d_cluster.spec import load_spec
    from d3d_cluster.train.teacher_outputs import output_shape, stored_dtype

    spec = load_spec(Path(__file__).parents[1] / "jobs" / "kinetics400.yaml")
    result = {}
    for target in targets:
        shape = output_shape(spec.with_overrides(**{"student.distill.target": target}), classes)
        clip = int(np.prod(shape)) * np.dtype(stored_dtype(target)).itemsize
        result[target] = {"shape": list(shape), "dtype": np.dtype(stored_dtype(target)).name, "bytes_per_clip": clip,
                          "bytes_per_epoch": clip * train_videos,
                          "bytes_per_stage": clip * train_videos * spec.student.epochs}
    return {"geometry": {"clip_frames": spec.data.clip_frames, "crop_size": spec.data.crop_size,
                         "width": spec.model.width, "epochs": spec.student.epochs}, "targets": result}


def eval_estimate_bytes(config: dict) -> int:
    """Rank 0's peak with every view's logits gathered: buffers, unpickled parts, their concatenation and softmax's
    two temporaries, each the float32 logits of every view."""
    return 5 * config["val_videos"] * config["views"] * config["classes"] * 4


def available_bytes() -> int:
    with open("/proc/meminfo") as meminfo:
        fields = dict(line.split(":") for line in meminfo)
    return int(fields["MemAvailable"].split()[0]) * 1024


def table(report: dict) -> str:
    gib = 2**30
    start, tables, plan, evaluation = report["startup"], report["tables"], report["plan"], report["eval"]
    rows = [("start-up: manifest + train + val tables, s", f"{start['total_seconds']:.1f}", "< 60"),
            ("tables retained (traced), GiB", f"{tables['tables_bytes'] / gib:.3f}", "< 0.93"),
            ("tables RSS after start-up, GiB", f"{start['rss_tables_bytes'] / gib:.3f}", "< 0.93"),
            ("start-up peak RSS, GiB", f"{start['peak_rss_bytes'] / gib:.3f}", ""),
            ("manifest object (traced), GiB", f"{tables['manifest_bytes'] / gib:.3f}", ""),
            ("training plan of an epoch: steps, s, peak MiB",
             f"{plan['train_steps']}, {plan['train_seconds']:.2f}, {plan['train_peak_bytes'] / 2**20:.1f}", ""),
            ("evaluation plan: steps, s, peak MiB",
             f"{plan['eval_steps']}, {plan['eval_seconds']:.2f}, {plan['eval_peak_bytes'] / 2**20:.1f}", "")]
    for method, result in evaluation.items():
        value = (f"skipped: {result['skipped']}" if "skipped" in result else
                 f"{result['rank0_peak_bytes'] / gib:.2f} traced, {result['rank0_peak_rss_bytes'] / gib:.2f} RSS, "
                 f"{result['rank0_seconds']:.0f} s, {result['gathers']} gathers")
        rows.append((f"eval rank 0 {method}, GiB", value, "< 1.86"))
    for target, side in report["side_files"]["targets"].items():
        rows.append((f"side file {target}: a clip, an epoch", f"{side['bytes_per_clip'] / 2**20:.3f} MiB, "
                     f"{side['bytes_per_epoch'] / 1e12:.3f} TB", ""))
    width = max(len(row[0]) for row in rows)
    return "\n".join(f"{name:<{width}}  {value:<48} {target}" for name, value, target in rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="/tmp/d3dc-scale")
    parser.add_argument("--train-videos", type=int, default=550_000)
    parser.add_argument("--val-videos", type=int, default=35_000)
    parser.add_argument("--classes", type=int, default=700)
    parser.add_argument("--shards", type=int, default=5_500)
    parser.add_argument("--ranks", type=int, default=64, help="world size: the plans' and the evaluation's")
    parser.add_argument("--batch-size", type=int, default=8, help="clips a rank, as jobs/kinetics400.yaml")
    parser.add_argument("--views", type=int, default=30, help="evaluation views a video (eval_clips x eval_crops)")
    parser.add_argument("--side-targets", nargs="+", default=None, help="default: logits and every feature layer")
    parser.add_argument("--skip-before", action="store_true", help="leave out the gather of every view (GBs)")
    parser.add_argument("--out", default="benchmarks/results/scale.json")
    parser.add_argument("--measure", choices=sorted(MEASUREMENTS), help=argparse.SUPPRESS)
    parser.add_argument("--config", help=argparse.SUPPRESS)
    args = parse_args(parser, SMOKE)
    if args.measure:
        print(json.dumps(MEASUREMENTS[args.measure](json.loads(args.config))))
        return

    from d3d_cluster.spec import FEATURE_LAYERS

    workdir = Path(args.workdir)
    check_layout(workdir / "layout")
    started = time.perf_counter()
    shards = fabricate(workdir / "shards", args.train_videos, args.val_videos, args.classes, args.shards)
    fabricate_seconds = time.perf_counter() - started
    config = {"shards": str(shards), "train_videos": args.train_videos, "val_videos": args.val_videos,
              "classes": args.classes, "ranks": args.ranks, "batch_size": args.batch_size, "views": args.views,
              "spool": str(workdir / "spool")}
    report = {"setup": {**{k: v for k, v in config.items() if k not in ("shards", "spool")}, "shards": args.shards,
                        "fabricate_seconds": fabricate_seconds, "machine": platform.machine(),
                        "cpus": os.cpu_count(), "python": platform.python_version(), "numpy": np.__version__,
                        "date": time.strftime("%Y-%m-%d")},
              "startup": in_subprocess("startup", config), "tables": in_subprocess("tables", config),
              "plan": in_subprocess("plan", config), "eval": {}}
    for method in ("before", "after"):
        need = eval_estimate_bytes(config)
        if method == "before" and (args.skip_before or need > 0.8 * available_bytes()):
            report["eval"][method] = {"skipped": f"--skip-before, or about {need / 2**30:.1f} GiB needed, "
                                                 f"{available_bytes() / 2**30:.1f} available"}
            continue
        report["eval"][method] = in_subprocess("eval", {**config, "method": method})
    report["side_files"] = side_files(args.classes, args.train_videos,
                                      args.side_targets or ["logits", *FEATURE_LAYERS])
    after = report["eval"]["after"]
    report["targets"] = TARGETS
    report["meets"] = {"tables_bytes": report["tables"]["tables_bytes"] < TARGETS["tables_bytes"],
                       "startup_seconds": report["startup"]["total_seconds"] < TARGETS["startup_seconds"],
                       "eval_rank0_bytes": max(after["rank0_peak_bytes"], after["rank0_peak_rss_bytes"])
                       < TARGETS["eval_rank0_bytes"]}
    write_report(report, args.out)
    print(table(report))


if __name__ == "__main__":
    main()
