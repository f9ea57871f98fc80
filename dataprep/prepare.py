"""Raw videos -> WebDataset shards of VP9 RGB + TV-L1 flow, checked by DALI, described by a manifest.

Each split's records are shuffled with `prep.seed` and cut into shards of consecutive records, so
samples are mixed across shards without holding the dataset in memory; a shard is the unit of parallel
work and of resumption. A shard is finished when its sidecar `<split>-NNNNNN.json` (written last) holds
the fingerprint of this run's settings and samples, and its .tar and .idx exist; anything else is redone.

A video that fails anywhere is not written; it is listed in `rejects.jsonl` with the reason.
Frame counts may differ: the manifest's `frames` is the minimum over written samples, which every sample
can supply (each sample's own count is in its json); `min_frames` (clip_frames + 1) rejects short ones.
Frame sizes may not differ, as the loader reshapes flow with the manifest's height and width: the first
readable video in the CSV sets the size, and a video that resizes to another size is rejected.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from multiprocessing import get_context
from pathlib import Path
from typing import NamedTuple

import cv2
import numpy as np
import webdataset
from tqdm import tqdm

from d3d_cluster.data import schema
from d3d_cluster.files import replace_atomically
from d3d_cluster.spec import PrepSpec
from dataprep import video
from dataprep.flow import compute_flow, flow_settings
from dataprep.sources import VideoRecord, read_labels_csv

REJECTS_NAME = "rejects.jsonl"


class _Job(NamedTuple):
    """What a worker needs for one shard; everything but out_dir and name goes into the fingerprint."""

    out_dir: Path
    name: str
    samples: list[tuple[str, VideoRecord, str]]  # key, record, source path as the CSV gives it
    prep: PrepSpec
    classes: list[str]
    size: tuple[int, int]
    min_frames: int
    fingerprint: str


class _Encoded(NamedTuple):
    key: str
    record: VideoRecord
    source: str
    rgb: bytes
    flow: bytes
    frames: int


def _wds2idx() -> str:
    """DALI's indexer from this interpreter's environment, so it matches the installed DALI."""
    beside = Path(sys.executable).parent / "wds2idx"
    found = str(beside) if beside.is_file() else shutil.which("wds2idx")
    if not found:
        raise FileNotFoundError("wds2idx not found next to the Python interpreter or on PATH (it ships with DALI)")
    return found


def _encode(record: VideoRecord, job: _Job) -> tuple[bytes, bytes, int]:
    """One raw video -> (rgb.webm, flow.webm, frames); raises with the reason on any failure."""
    prep = job.prep
    if record.label not in job.classes:
        raise video.VideoError(f"label unknown: {record.label!r} has no training videos")
    frames, fps = video.read_video(record.path)
    frames = video.resize_short_side(video.resample_fps(frames, fps, prep.fps), prep.short_side)
    if len(frames) < job.min_frames:
        raise video.VideoError(f"{len(frames)} frames at {prep.fps:g} fps, need at least {job.min_frames}")
    if frames.shape[1:3] != job.size:
        raise video.VideoError(f"resizes to {frames.shape[1:3]}, the dataset's frames are {job.size} (height, width)")
    quantized = schema.quantize_flow(compute_flow(frames, prep.flow), prep.flow.bound)
    flow_frames = np.stack([schema.flow_to_frame(pair) for pair in quantized])
    rgb = video.encode_vp9(frames, prep.fps, prep.keyframe_interval, prep.crf)
    flow = video.encode_vp9(flow_frames, prep.fps, prep.keyframe_interval, prep.flow_crf)
    return rgb, flow, len(frames)


def _write_tar(path: Path, samples: list[_Encoded], classes: list[str]) -> None:
    with open(path, "wb") as handle:
        writer = webdataset.TarWriter(handle)
        for sample in samples:
            meta = {"key": sample.key, "label": sample.record.label, "source": sample.source, "frames": sample.frames}
            writer.write({
                "__key__": sample.key,
                schema.RGB_EXT: sample.rgb,
                schema.FLOW_EXT: sample.flow,
                schema.LABEL_EXT: str(classes.index(sample.record.label)).encode("ascii"),
                schema.META_EXT: json.dumps(meta).encode(),
            })
        writer.close()


def _reject(record: VideoRecord, source: str, reason: str) -> dict:
    return {"path": source, "label": record.label, "split": record.split, "reason": reason}


def _write_shard(job: _Job) -> tuple[str, dict]:
    """Worker: encodes, DALI-checks and writes one shard; returns its sidecar."""
    sidecar_path = job.out_dir / f"{job.name}.json"
    sidecar_path.unlink(missing_ok=True)
    encoded, rejects = [], []
    for key, record, source in job.samples:
        try:
            encoded.append(_Encoded(key, record, source, *_encode(record, job)))
        except Exception as error:  # whatever goes wrong with one video costs only that video
            reason = str(error) if isinstance(error, video.VideoError) else f"{type(error).__name__}: {error}"
            rejects.append(_reject(record, source, reason))
    counts = video.dali_decodes([blob for sample in encoded for blob in (sample.rgb, sample.flow)])
    written = []
    for sample, rgb_count, flow_count in zip(encoded, counts[::2], counts[1::2]):
        checks = ((schema.RGB_EXT, rgb_count, sample.frames), (schema.FLOW_EXT, flow_count, sample.frames - 1))
        problems = [
            f"DALI {'cannot decode' if got is None else f'decodes {got} frames from'} {ext}, expected {want}"
            for ext, got, want in checks
            if got != want
        ]
        if problems:
            rejects.append(_reject(sample.record, sample.source, "; ".join(problems)))
        else:
            written.append(sample)
    tar, index = job.out_dir / f"{job.name}.tar", job.out_dir / f"{job.name}.idx"
    sidecar = {
        "fingerprint": job.fingerprint,
        "samples": len(written),
        "class_counts": {label: sum(sample.record.label == label for sample in written) for label in job.classes},
        "rejects": rejects,
    }
    if written:
        replace_atomically(tar, lambda tmp: _write_tar(tmp, written, job.classes))
        replace_atomically(index, lambda tmp: subprocess.run([_wds2idx(), tar, tmp], check=True, capture_output=True))
        sidecar.update(sha256=schema.sha256_of(tar), frames=min(sample.frames for sample in written))
    else:
        tar.unlink(missing_ok=True)
        index.unlink(missing_ok=True)
    replace_atomically(sidecar_path, lambda tmp: tmp.write_text(json.dumps(sidecar, indent=1) + "\n"))
    return job.name, sidecar


def _finished(job: _Job) -> dict | None:
    """The sidecar of a shard an earlier run completed with the same settings and samples, else None."""
    try:
        sidecar = json.loads((job.out_dir / f"{job.name}.json").read_text())
    except (OSError, ValueError):
        return None
    if sidecar.get("fingerprint") != job.fingerprint:
        return None
    files = (job.out_dir / f"{job.name}.tar", job.out_dir / f"{job.name}.idx")
    if sidecar["samples"] and not all(path.is_file() for path in files):
        return None
    return sidecar


def _frame_size(records: list[VideoRecord], short_side: int) -> tuple[int, int]:
    """The resized size of the first readable video in CSV order: the one size every sample must have."""
    for record in records:
        try:
            return video.short_side_shape(*video.frame_size(record.path), short_side)
        except video.VideoError:
            continue
    return (short_side, short_side)  # nothing is readable: every video will be rejected anyway


def _source(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return str(path)


def _jobs(prep: PrepSpec, records: list[VideoRecord], classes: list[str], root: Path, out_dir: Path,
          size: tuple[int, int], min_frames: int) -> dict[str, list[_Job]]:
    """Each split's records shuffled, then cut into shards of consecutive records."""
    settings = prep.model_dump(include={"fps", "short_side", "keyframe_interval", "crf", "flow_crf", "flow"})
    jobs = {}
    for split_index, split in enumerate(schema.SPLITS):
        members = [(f"{split}_{i:06d}", r, _source(r.path, root)) for i, r in enumerate(records) if r.split == split]
        if not members:
            continue
        order = np.random.default_rng([prep.seed, split_index]).permutation(len(members))
        shuffled = [members[j] for j in order]
        jobs[split] = []
        for number, start in enumerate(range(0, len(shuffled), prep.shard_samples)):
            samples = shuffled[start : start + prep.shard_samples]
            identity = {"settings": settings, "classes": classes, "size": size, "min_frames": min_frames,
                        "samples": [(key, source, record.label) for key, record, source in samples]}
            fingerprint = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()
            name = f"{split}-{number:06d}"
            jobs[split].append(_Job(out_dir, name, samples, prep, classes, size, min_frames, fingerprint))
    return jobs


def _init_worker() -> None:
    cv2.setNumThreads(1)  # one process per core already; OpenCV's threads would only contend


def prepare_dataset(
    prep: PrepSpec, labels_csv: Path, out_dir: Path, progress: bool = True, min_frames: int = 2
) -> schema.Manifest:
    """Writes shards, indexes, sidecars, rejects.jsonl and the manifest under out_dir; resumes a partial run."""
    if min_frames < 2:
        raise ValueError(f"min_frames must be at least 2 (flow needs a frame pair), got {min_frames}")
    records, classes = read_labels_csv(labels_csv)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    size = _frame_size(records, prep.short_side)
    jobs = _jobs(prep, records, classes, Path(labels_csv).resolve().parent, out_dir, size, min_frames)
    sidecars = {job.name: _finished(job) for split_jobs in jobs.values() for job in split_jobs}
    todo = [job for split_jobs in jobs.values() for job in split_jobs if sidecars[job.name] is None]
    if todo:
        _wds2idx()
        workers = min(prep.workers, len(todo))
        pool = ProcessPoolExecutor(workers, mp_context=get_context("spawn"), initializer=_init_worker)
        try:
            futures = [pool.submit(_write_shard, job) for job in todo]
            done = tqdm(as_completed(futures), total=len(todo), desc="shards", unit="shard", disable=not progress)
            for future in done:
                name, sidecar = future.result()
                sidecars[name] = sidecar
        except BrokenProcessPool:
            raise RuntimeError(
                f"a prep worker process died (its error, if any, is above); rerun to resume: "
                f"finished shards in {out_dir} are kept"
            ) from None
        finally:
            pool.shutdown(cancel_futures=True)  # on an error, stop rather than finish every queued shard
    manifest = _manifest(prep, classes, jobs, sidecars, size, out_dir)
    if progress:
        splits = manifest.splits.items()
        counts = ", ".join(f"{split} {info.samples} samples in {len(info.shards)} shards" for split, info in splits)
        print(f"prepared {out_dir}: {counts}; {manifest.rejects} rejected; {len(sidecars) - len(todo)} shards reused")
    return manifest


def _manifest(prep: PrepSpec, classes: list[str], jobs: dict, sidecars: dict, size: tuple[int, int],
              out_dir: Path) -> schema.Manifest:
    """Built from the sidecars alone, so reused shards are never re-read; also writes rejects.jsonl."""
    splits = {}
    for split, split_jobs in jobs.items():
        info = splits[split] = schema.SplitInfo(class_counts={label: 0 for label in classes})
        for job in split_jobs:
            sidecar = sidecars[job.name]
            if sidecar["samples"]:
                shard = schema.ShardInfo(f"{job.name}.tar", f"{job.name}.idx", sidecar["samples"], sidecar["sha256"])
                info.shards.append(shard)
                info.samples += sidecar["samples"]
                for label, count in sidecar["class_counts"].items():
                    info.class_counts[label] += count
    ordered = [sidecars[job.name] for split_jobs in jobs.values() for job in split_jobs]
    rejects = [reject for sidecar in ordered for reject in sidecar["rejects"]]
    replace_atomically(out_dir / REJECTS_NAME, lambda tmp: tmp.write_text("".join(json.dumps(r) + "\n" for r in rejects)))
    written = [sidecar for sidecar in ordered if sidecar["samples"]]
    if not written:
        raise RuntimeError(f"no video could be prepared; the reasons are in {out_dir / REJECTS_NAME}")
    manifest = schema.Manifest(
        classes=classes,
        frames=min(sidecar["frames"] for sidecar in written),
        height=size[0],
        width=size[1],
        fps=prep.fps,
        keyframe_interval=prep.keyframe_interval,
        flow=flow_settings(prep.flow),
        splits=splits,
        rejects=len(rejects),
    )
    manifest.save(out_dir)
    return manifest
