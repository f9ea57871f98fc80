"""Raw videos -> WebDataset shards of VP9 RGB + TV-L1 flow, checked by DALI, described by a manifest.

How `d3dc prep` uses it (a source first, so a bad listing fails before any work):

    dataset = load_source(spec.prep, Path(spec.workdir))                      # dataprep.sources
    prepare_dataset(spec.prep, dataset, out_dir, workers=N, min_frames=spec.data.clip_frames + 1)

On a cluster, a Slurm job array of K tasks, then one finalize step once every task has ended:

    run_array_task(spec.prep, dataset, out_dir, task=i, tasks=K, min_frames=...)   # shards i, i+K, ...
    finalize(spec.prep, dataset, out_dir, min_frames=...)                          # manifest + summary

Submit small arguments (the spec and paths) and call `load_source` inside each task: it is a pure
function of the listings, so every task plans the same shards; a pickled Dataset of Kinetics would be
tens of megabytes per task. `finalize` refuses, listing them, while shards are missing; rerunning the
array (or `prepare_dataset`) redoes only those. Progress: a tqdm bar locally, a line per shard on stdout
in array tasks (their Slurm logs), and a summary at the end (videos per split, rejects by reason, time),
also written to `summary.json`.

Each split's records are shuffled with `prep.seed` and cut into shards of consecutive records, so samples
are mixed across shards without holding the dataset in memory (see `dataprep.shards` for one shard).
A video that fails anywhere is not written: it is listed in `rejects.jsonl` with a reason (missing, empty,
unreadable, too short, size mismatch, undecodable, label unknown, label mismatch, error) and a detail.

Frame counts may differ: the manifest records each sample's, so clips are cut from the whole of each video. The
`min_frames` argument (clip_frames + 1) rejects shorter videos, or loops them to that length with `prep.loop_short`.
Frame sizes may not differ, as the loader reshapes flow with the manifest's height and width: with
`prep.frame_size` every video is scaled and centre-cropped to it; without, the first readable video sets
the size and a video that resizes to another size is rejected.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from multiprocessing import get_context
from pathlib import Path
from typing import Callable, Iterable

import cv2
import numpy as np
from tqdm import tqdm

from d3d_cluster.data import schema
from d3d_cluster.files import replace_atomically, write_json_atomically
from d3d_cluster.spec import PrepSpec
from dataprep import video
from dataprep.flow import flow_settings
from dataprep.shards import ShardJob, finished, reject, wds2idx, write_shard
from dataprep.sources import Dataset, VideoRecord

REJECTS_NAME = "rejects.jsonl"
SUMMARY_NAME = "summary.json"


class MissingShards(RuntimeError):
    """Finalize was asked for a manifest while some shards are not (or not completely) written."""


def _frame_size(prep: PrepSpec, records: list[VideoRecord]) -> tuple[int, int]:
    """The one stored frame size: prep.frame_size, or the resized size of the first readable video."""
    if prep.frame_size:
        return tuple(prep.frame_size)
    for record in records:
        try:
            return video.short_side_shape(*video.frame_size(record.path), prep.short_side)
        except video.VideoError:
            continue
    return (prep.short_side, prep.short_side)  # nothing is readable: every video will be rejected anyway


def _relative(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return str(path)


def plan_shards(prep: PrepSpec, dataset: Dataset, out_dir: Path, min_frames: int = 2) -> list[ShardJob]:
    """Every shard of the dataset, train then val: each split's records shuffled, then cut into shards."""
    if min_frames < 2:
        raise ValueError(f"min_frames must be at least 2 (flow needs a frame pair), got {min_frames}")
    size = _frame_size(prep, dataset.records)
    settings = prep.model_dump(include={"fps", "short_side", "frame_size", "loop_short", "keyframe_interval",
                                        "crf", "flow_crf", "flow"})
    jobs = []
    for split_index, split in enumerate(schema.SPLITS):
        members = [(f"{split}_{i:06d}", record, _relative(record.path, dataset.root))
                   for i, record in enumerate(dataset.records) if record.split == split]
        order = np.random.default_rng([prep.seed, split_index]).permutation(len(members))
        shuffled = [members[j] for j in order]
        for number, start in enumerate(range(0, len(shuffled), prep.shard_samples)):
            samples = shuffled[start : start + prep.shard_samples]
            identity = {"schema": schema.SCHEMA_VERSION, "settings": settings, "classes": dataset.classes, "size": size,
                        "min_frames": min_frames,
                        "samples": [(key, source, record.label) for key, record, source in samples]}
            fingerprint = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()
            jobs.append(ShardJob(Path(out_dir), f"{split}-{number:06d}", samples, prep, dataset.classes, size,
                                 min_frames, fingerprint))
    return jobs


def _init_worker() -> None:
    cv2.setNumThreads(1)  # one process per core already; OpenCV's threads would only contend


def _run(jobs: list[ShardJob], workers: int) -> Iterable[tuple[str, dict]]:
    """(name, sidecar) of each job as it completes: in this process for one worker, else in spawned processes."""
    if workers == 1:
        yield from map(write_shard, jobs)
        return
    pool = ProcessPoolExecutor(workers, mp_context=get_context("spawn"), initializer=_init_worker)
    try:
        for future in as_completed([pool.submit(write_shard, job) for job in jobs]):
            yield future.result()
    except BrokenProcessPool:
        raise RuntimeError(f"a prep worker process died (its error, if any, is above); rerun to resume: "
                           f"finished shards in {jobs[0].out_dir} are kept") from None
    finally:
        pool.shutdown(cancel_futures=True)  # on an error, stop rather than finish every queued shard


def prepare_dataset(prep: PrepSpec, dataset: Dataset, out_dir: Path, *, workers: int | None = None,
                    progress: bool = True, min_frames: int = 2) -> schema.Manifest:
    """Every shard with `workers` processes (default prep.workers), then the manifest; resumes a partial run."""
    started = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    jobs = plan_shards(prep, dataset, out_dir, min_frames)
    sidecars = {job.name: finished(job) for job in jobs}
    todo = [job for job in jobs if sidecars[job.name] is None]
    if todo:
        wds2idx()
        done = _run(todo, min(workers or prep.workers, len(todo)))
        for name, sidecar in tqdm(done, total=len(todo), desc="shards", unit="shard", disable=not progress):
            sidecars[name] = sidecar
    return _finish(prep, dataset, jobs, sidecars, out_dir, len(todo), time.perf_counter() - started, progress)


def run_array_task(prep: PrepSpec, dataset: Dataset, out_dir: Path, task: int, tasks: int, *,
                   workers: int = 1, min_frames: int = 2,
                   on_shard: Callable[[str, dict], None] | None = None) -> list[str]:
    """Task `task` of `tasks` (0-based): writes shards task, task + tasks, ... that are not finished yet,
    printing a line per shard (and passing its sidecar to `on_shard`); returns the names it wrote. Writes no
    manifest (see `finalize`)."""
    if not 0 <= task < tasks:
        raise ValueError(f"array task {task} is not in 0..{tasks - 1}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    mine = plan_shards(prep, dataset, out_dir, min_frames)[task::tasks]
    todo = [job for job in mine if finished(job) is None]
    tag = f"[prep task {task + 1}/{tasks}]"
    print(f"{tag} {len(mine)} shards, {len(mine) - len(todo)} already finished, {len(todo)} to write", flush=True)
    if todo:
        wds2idx()
    written = []
    for count, (name, sidecar) in enumerate(_run(todo, min(workers, len(todo) or 1)), start=1):
        written.append(name)
        print(f"{tag} {name}: {sidecar['samples']} written, {len(sidecar['rejects'])} rejected "
              f"in {sidecar['seconds']:.1f} s ({count}/{len(todo)})", flush=True)
        if on_shard:
            on_shard(name, sidecar)
    return written


def finalize(prep: PrepSpec, dataset: Dataset, out_dir: Path, *, min_frames: int = 2,
             progress: bool = True) -> schema.Manifest:
    """The manifest, rejects.jsonl and summary of shards written by array tasks; refuses while any is missing."""
    out_dir = Path(out_dir)
    jobs = plan_shards(prep, dataset, out_dir, min_frames)
    sidecars = {job.name: finished(job) for job in jobs}
    missing = [name for name, sidecar in sidecars.items() if sidecar is None]
    if missing:
        raise MissingShards(f"{out_dir}: {len(missing)} of {len(jobs)} shards are not finished: {', '.join(missing)}; "
                            f"rerun the array tasks (finished shards are skipped), then finalize")
    return _finish(prep, dataset, jobs, sidecars, out_dir, None, None, progress)


def _finish(prep: PrepSpec, dataset: Dataset, jobs: list[ShardJob], sidecars: dict, out_dir: Path,
            written_now: int | None, wall: float | None, progress: bool) -> schema.Manifest:
    """Manifest, rejects.jsonl and summary from the sidecars alone, so reused shards are never re-read."""
    splits = {}
    for job in jobs:
        split = job.name.split("-")[0]
        info = splits.setdefault(split, schema.SplitInfo(class_counts={label: 0 for label in dataset.classes}))
        sidecar = sidecars[job.name]
        if sidecar["samples"]:
            info.shards.append(schema.ShardInfo(f"{job.name}.tar", f"{job.name}.idx", sidecar["samples"],
                                                sidecar["sha256"], sidecar["frames"], sidecar["labels"],
                                                sidecar["checksums"]))
            info.samples += sidecar["samples"]
            for label, count in sidecar["class_counts"].items():
                info.class_counts[label] += count
    rejects = [reject(r.record, _relative(r.record.path, dataset.root), r.reason, r.detail) for r in dataset.rejects]
    rejects += [line for job in jobs for line in sidecars[job.name]["rejects"]]
    replace_atomically(out_dir / REJECTS_NAME, lambda tmp: tmp.write_text("".join(json.dumps(r) + "\n" for r in rejects)))
    written = [sidecars[job.name] for job in jobs if sidecars[job.name]["samples"]]
    if not written:
        raise RuntimeError(f"no video could be prepared; the reasons are in {out_dir / REJECTS_NAME}")
    manifest = schema.Manifest(
        classes=dataset.classes,
        min_frames=min(min(sidecar["frames"]) for sidecar in written),
        height=jobs[0].size[0],
        width=jobs[0].size[1],
        fps=prep.fps,
        keyframe_interval=prep.keyframe_interval,
        flow=flow_settings(prep.flow),
        splits=splits,
        rejects=len(rejects),
    )
    manifest.save(out_dir)
    summary = {
        "videos_written": {split: info.samples for split, info in splits.items()},
        "shards": {split: len(info.shards) for split, info in splits.items()},
        "rejects": dict(Counter(line["reason"] for line in rejects).most_common()),
        "shards_written_now": written_now,
        "shards_reused": None if written_now is None else len(jobs) - written_now,
        "wall_seconds": None if wall is None else round(wall, 1),
        "shard_seconds": round(sum(sidecars[job.name]["seconds"] for job in jobs), 1),
        "videos": sum(sidecars[job.name]["videos"] for job in jobs),
    }
    write_json_atomically(out_dir / SUMMARY_NAME, summary)
    if progress:
        print(summary_text(out_dir, summary), flush=True)
    return manifest


def summary_text(out_dir: Path, summary: dict) -> str:
    splits = ", ".join(f"{split} {count} videos in {summary['shards'][split]} shards"
                       for split, count in summary["videos_written"].items())
    reasons = ", ".join(f"{reason} {count}" for reason, count in summary["rejects"].items())
    rejected = sum(summary["rejects"].values())
    rate = summary["videos"] / summary["shard_seconds"] if summary["shard_seconds"] else 0.0
    lines = [f"prepared {out_dir}: {splits}",
             f"rejected {rejected}" + (f": {reasons} (see {REJECTS_NAME})" if rejected else ""),
             f"shard work {summary['shard_seconds']:.0f} s for {summary['videos']} videos ({rate:.2f} videos/s per worker)"]
    if summary["wall_seconds"] is not None:
        lines.append(f"{summary['shards_written_now']} shards written, {summary['shards_reused']} reused, "
                     f"{summary['wall_seconds']:.0f} s wall")
    return "\n".join(lines)
