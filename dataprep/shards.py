"""One shard: encode its videos, prove DALI decodes them, write tar, DALI index and sidecar.

A shard is the unit of parallel work and of resumption. Its files appear under their final names only
once complete (each is written to a temporary name and renamed), and the sidecar `<name>.json` comes
last: a shard is finished when its sidecar holds the fingerprint of this run's settings and samples and
its tar and index exist; anything else is redone.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
import webdataset

from d3d_cluster.data import schema
from d3d_cluster.files import replace_atomically, write_json_atomically
from d3d_cluster.spec import PrepSpec
from dataprep import video
from dataprep.flow import compute_flow
from dataprep.sources import VideoRecord


class ShardJob(NamedTuple):
    """What a worker needs for one shard; everything but out_dir and name is in the fingerprint."""

    out_dir: Path
    name: str
    samples: list[tuple[str, VideoRecord, str]]  # key, record, path relative to the dataset's root
    prep: PrepSpec
    classes: list[str]
    size: tuple[int, int]  # (height, width) of every stored frame
    min_frames: int
    fingerprint: str


class _Encoded(NamedTuple):
    key: str
    record: VideoRecord
    source: str
    rgb: bytes
    flow: bytes
    frames: int


def wds2idx() -> str:
    """DALI's indexer from this interpreter's environment, so it matches the installed DALI."""
    beside = Path(sys.executable).parent / "wds2idx"
    found = str(beside) if beside.is_file() else shutil.which("wds2idx")
    if not found:
        raise FileNotFoundError("wds2idx not found next to the Python interpreter or on PATH (it ships with DALI)")
    return found


def reject(record: VideoRecord, source: str, reason: str, detail: str) -> dict:
    """One line of rejects.jsonl: `reason` is the category the summary counts, `detail` says what happened."""
    return {"path": source, "label": record.label, "split": record.split, "reason": reason, "detail": detail}


def encode(record: VideoRecord, job: ShardJob) -> tuple[bytes, bytes, int]:
    """One raw video -> (rgb.webm, flow.webm, frames); raises VideoError with the reason on any failure."""
    prep = job.prep
    frames, fps = video.read_video(record.path)
    frame_size = tuple(prep.frame_size) if prep.frame_size else None
    frames = video.fit_frames(video.resample_fps(frames, fps, prep.fps), prep.short_side, frame_size)
    if frames.shape[1:3] != job.size:
        raise video.VideoError("size mismatch", f"resizes to {frames.shape[1:3]}, the dataset's frames are "
                                                f"{job.size} (height, width); set prep.frame_size for mixed sizes")
    need = 2 if prep.loop_short else job.min_frames
    if len(frames) < need:
        raise video.VideoError("too short", f"{len(frames)} frames at {prep.fps:g} fps, need at least {need}")
    if len(frames) < job.min_frames:
        # flow of the loop, seam (last frame back to the first) included, then repeated with the frames
        cycle = compute_flow(np.concatenate([frames, frames[:1]]), prep.flow)
        frames = video.loop_frames(frames, job.min_frames)
        flow = cycle[np.arange(len(frames) - 1) % len(cycle)]
    else:
        flow = compute_flow(frames, prep.flow)
    quantized = schema.quantize_flow(flow, prep.flow.bound)
    flow_frames = np.stack([schema.flow_to_frame(pair) for pair in quantized])
    rgb = video.encode_vp9(frames, prep.fps, prep.keyframe_interval, prep.crf)
    flow_video = video.encode_vp9(flow_frames, prep.fps, prep.keyframe_interval, prep.flow_crf)
    return rgb, flow_video, len(frames)


def _members(sample: _Encoded, classes: list[str]) -> dict[str, bytes]:
    """A sample's members as the tar stores them, by ext."""
    meta = {"key": sample.key, "label": sample.record.label, "source": sample.source, "frames": sample.frames}
    return {
        schema.RGB_EXT: sample.rgb,
        schema.FLOW_EXT: sample.flow,
        schema.LABEL_EXT: str(classes.index(sample.record.label)).encode("ascii"),
        schema.META_EXT: json.dumps(meta).encode(),
    }


def _write_tar(path: Path, samples: list[tuple[str, dict[str, bytes]]]) -> None:
    with open(path, "wb") as handle:
        writer = webdataset.TarWriter(handle, mtime=0)  # a fixed time: the same samples give the same bytes
        for key, members in samples:
            writer.write({"__key__": key, **members})
        writer.close()


def _dali_checked(encoded: list[_Encoded], rejects: list[dict]) -> list[_Encoded]:
    """The samples whose RGB and flow DALI's CPU decoder reads with every frame; the others go to rejects."""
    counts = video.dali_decodes([blob for sample in encoded for blob in (sample.rgb, sample.flow)])
    good = []
    for sample, rgb_count, flow_count in zip(encoded, counts[::2], counts[1::2]):
        checks = ((schema.RGB_EXT, rgb_count, sample.frames), (schema.FLOW_EXT, flow_count, sample.frames - 1))
        problems = [
            f"DALI {'cannot decode' if got is None else f'decodes {got} frames from'} {ext}, expected {want}"
            for ext, got, want in checks
            if got != want
        ]
        if problems:
            rejects.append(reject(sample.record, sample.source, "undecodable", "; ".join(problems)))
        else:
            good.append(sample)
    return good


def write_shard(job: ShardJob) -> tuple[str, dict]:
    """Encodes, DALI-checks and writes one shard; returns its name and sidecar. One bad video costs only itself."""
    started = time.perf_counter()
    sidecar_path = job.out_dir / f"{job.name}.json"
    sidecar_path.unlink(missing_ok=True)
    encoded, rejects = [], []
    for key, record, source in job.samples:
        try:
            encoded.append(_Encoded(key, record, source, *encode(record, job)))
        except video.VideoError as error:
            rejects.append(reject(record, source, error.reason, str(error)))
        except Exception as error:  # whatever else goes wrong with one video costs only that video
            rejects.append(reject(record, source, "error", f"{type(error).__name__}: {error}"))
    written = _dali_checked(encoded, rejects)
    tar, index = job.out_dir / f"{job.name}.tar", job.out_dir / f"{job.name}.idx"
    sidecar = {
        "fingerprint": job.fingerprint,
        "videos": len(job.samples),
        "samples": len(written),
        "class_counts": {label: sum(sample.record.label == label for sample in written) for label in job.classes},
        "rejects": rejects,
    }
    if written:
        members = [(sample.key, _members(sample, job.classes)) for sample in written]
        replace_atomically(tar, lambda tmp: _write_tar(tmp, members))
        replace_atomically(index, lambda tmp: subprocess.run([wds2idx(), tar, tmp], check=True, capture_output=True))
        sidecar.update(sha256=schema.sha256_of(tar), frames=[sample.frames for sample in written],
                       labels=[job.classes.index(sample.record.label) for sample in written],
                       checksums={ext: [schema.member_checksum(stored[ext]) for _, stored in members]
                                  for ext in schema.SAMPLE_EXTS})
    else:
        tar.unlink(missing_ok=True)
        index.unlink(missing_ok=True)
    sidecar["seconds"] = round(time.perf_counter() - started, 3)
    write_json_atomically(sidecar_path, sidecar, indent=1)
    return job.name, sidecar


def finished(job: ShardJob) -> dict | None:
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
