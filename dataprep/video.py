"""Video I/O for dataprep: read anything FFmpeg reads, write VP9 that DALI decodes, and prove it decodes.

DALI's CPU decoder reads VP8/VP9 only, and one undecodable sample kills a training pipeline, so every
blob `encode_vp9` makes is decoded once by `dali_decodes` before it may enter a shard.
"""

from __future__ import annotations

import contextlib
import io
import os
import threading
from fractions import Fraction

import av
import cv2
import numpy as np

_DALI_BATCH = 16
_pipeline = None  # one DALI pipeline per process, built on first use
_pipeline_lock = threading.Lock()  # predict's reader threads share it: one run, and the read of its output, at a time


class VideoError(ValueError):
    """A video that cannot be used: `reason` is a short category for counting, the message names the file and why."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def _check_file(path: str | os.PathLike) -> None:
    """Missing and zero-byte files get their own reasons; FFmpeg would call both merely unreadable."""
    try:
        size = os.stat(path).st_size
    except FileNotFoundError:
        raise VideoError("missing", f"{path}: no such file") from None
    if size == 0:
        raise VideoError("empty", f"{path}: zero bytes")


def read_video(path: str | os.PathLike) -> tuple[np.ndarray, float]:
    """All frames of the first video stream as (F, H, W, 3) RGB uint8, and the stream's frame rate."""
    _check_file(path)
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise VideoError("unreadable", f"{path}: no video stream")
            stream = container.streams.video[0]
            rate = stream.average_rate or stream.guessed_rate
            frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(stream)]
    except av.FFmpegError as error:
        raise VideoError("unreadable", f"{path}: unreadable video: {error.strerror or error}") from None
    if not frames:
        raise VideoError("empty", f"{path}: no frames")
    if not rate:
        raise VideoError("unreadable", f"{path}: no frame rate")
    return np.stack(frames), float(rate)


def frame_size(path: str | os.PathLike) -> tuple[int, int]:
    """(height, width) of the first frame, decoding only that frame."""
    _check_file(path)
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise VideoError("unreadable", f"{path}: no video stream")
            frame = next(container.decode(container.streams.video[0]), None)
    except av.FFmpegError as error:
        raise VideoError("unreadable", f"{path}: unreadable video: {error.strerror or error}") from None
    if frame is None:
        raise VideoError("empty", f"{path}: no frames")
    return frame.height, frame.width


def write_h264(path: str | os.PathLike, frames: np.ndarray, fps: float) -> None:
    """An .mp4 like the raw videos a user brings: H.264, yuv420p (even sizes only); the same frames, the same bytes."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001))
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = "yuv420p"
        # cpu-independent: x264's SIMD MB-tree code made the bytes depend on uninitialised heap memory (12 of the
        # quickstart's 480 videos differed between two runs); it swaps in the C code, the same on every CPU.
        stream.options = {"preset": "veryfast", "crf": "12", "x264-params": "cpu-independent=1"}
        stream.codec_context.thread_count = 1  # an automatic count follows the machine's cores, and slices with it
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())


def resample_fps(frames: np.ndarray, fps_in: float, fps_out: float) -> np.ndarray:
    """Frames shown at times k / fps_out within the input's span: duplicates or drops, never blends."""
    if fps_in == fps_out:
        return frames
    span = (len(frames) - 1) / fps_in
    count = int(np.floor(span * fps_out + 1e-6)) + 1
    index = np.floor(np.arange(count) * (fps_in / fps_out) + 1e-6).astype(np.int64)
    return frames[np.minimum(index, len(frames) - 1)]


def short_side_shape(height: int, width: int, size: int) -> tuple[int, int]:
    """The (height, width) `resize_short_side` gives: aspect kept, both even because VP9 4:2:0 needs it."""
    scale = size / min(height, width)
    return max(2, 2 * round(height * scale / 2)), max(2, 2 * round(width * scale / 2))


def _resize(frames: np.ndarray, height: int, width: int) -> np.ndarray:
    if (height, width) == frames.shape[1:3]:
        return frames
    return np.stack([cv2.resize(frame, (width, height), interpolation=cv2.INTER_AREA) for frame in frames])


def resize_short_side(frames: np.ndarray, size: int) -> np.ndarray:
    return _resize(frames, *short_side_shape(*frames.shape[1:3], size))


def cover_shape(height: int, width: int, target: tuple[int, int]) -> tuple[int, int]:
    """The smallest (height, width) with the input's aspect ratio that covers `target` on both sides."""
    scale = max(target[0] / height, target[1] / width)
    return max(target[0], round(height * scale)), max(target[1], round(width * scale))


def resize_and_crop(frames: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Scaled to cover `size` (height, width) with the aspect ratio kept, then the centre `size` cut out."""
    covered = _resize(frames, *cover_shape(*frames.shape[1:3], size))
    top = (covered.shape[1] - size[0]) // 2
    left = (covered.shape[2] - size[1]) // 2
    return np.ascontiguousarray(covered[:, top : top + size[0], left : left + size[1]])


def fit_frames(frames: np.ndarray, short_side: int, frame_size: tuple[int, int] | None) -> np.ndarray:
    """The stored geometry: `frame_size` exactly when given, else the short side resized to `short_side`."""
    return resize_short_side(frames, short_side) if frame_size is None else resize_and_crop(frames, frame_size)


def loop_frames(frames: np.ndarray, count: int) -> np.ndarray:
    """The video repeated from its start until it has `count` frames (I3D's treatment of short videos)."""
    return frames[np.arange(max(count, len(frames))) % len(frames)]


def encode_vp9(frames: np.ndarray, fps: float, keyframe_interval: int, crf: int) -> bytes:
    """(F, H, W, 3) RGB uint8 -> webm bytes; short GOPs so a random temporal crop decodes few frames."""
    height, width = frames.shape[1:3]
    if height % 2 or width % 2:
        raise VideoError("unencodable", f"VP9 4:2:0 needs even frame sizes, got {width}x{height}")
    buffer = io.BytesIO()
    # bitexact: no random segment id or muxer version in the file, so the same frames give the same bytes
    with av.open(buffer, "w", format="webm", options={"fflags": "+bitexact"}) as container:
        options = {"deadline": "realtime", "cpu-used": "8", "crf": str(crf), "b:v": "0", "g": str(keyframe_interval)}
        stream = container.add_stream("libvpx-vp9", rate=Fraction(fps).limit_denominator(1001), options=options)
        stream.height, stream.width = height, width
        stream.pix_fmt = "yuv420p"
        stream.codec_context.gop_size = keyframe_interval
        # one thread: prep runs a worker per core already, and the bytes cannot hinge on libvpx's threads being exact
        stream.codec_context.thread_count = 1
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")))
        container.mux(stream.encode())
    return buffer.getvalue()


def _build_pipeline():
    from nvidia.dali import fn, pipeline_def, types  # here, so reading and writing videos never loads DALI

    @pipeline_def(batch_size=_DALI_BATCH, num_threads=1, device_id=None, prefetch_queue_depth=1, exec_dynamic=True)
    def decode():
        return fn.decoders.video(fn.external_source(name="encoded", dtype=types.UINT8, ndim=1), device="cpu")

    pipeline = decode()
    pipeline.build()
    return pipeline


def _dali_run(blobs: list[bytes]):
    """Decodes up to _DALI_BATCH blobs; a pipeline that failed is dropped, as its state is unknown."""
    global _pipeline
    if _pipeline is None:
        _pipeline = _build_pipeline()
    _pipeline.feed_input("encoded", [np.frombuffer(blob, dtype=np.uint8) for blob in blobs])
    try:
        (decoded,) = _pipeline.run()
    except RuntimeError:
        _pipeline = None
        raise
    return decoded


def dali_decodes(encoded: list[bytes]) -> list[int | None]:
    """Frame count of each blob as DALI's CPU decoder sees it; None where DALI cannot decode it.

    A failing batch is retried one blob at a time, so one bad blob costs only itself.
    """
    counts: list[int | None] = [None] * len(encoded)
    usable = [i for i, blob in enumerate(encoded) if len(blob)]  # DALI asserts on empty input
    for start in range(0, len(usable), _DALI_BATCH):
        batch = usable[start : start + _DALI_BATCH]
        with _pipeline_lock:
            try:
                decoded = _dali_run([encoded[i] for i in batch])
                for i, shape in zip(batch, decoded.shape()):
                    counts[i] = int(shape[0])
            except RuntimeError:
                for i in batch:
                    with contextlib.suppress(RuntimeError):
                        counts[i] = int(_dali_run([encoded[i]]).shape()[0][0])
    return counts


def dali_decode(encoded: bytes) -> np.ndarray:
    """One blob decoded by DALI's CPU decoder to (F, H, W, 3) uint8, as the training loader will see it."""
    with _pipeline_lock:
        return np.array(_dali_run([encoded])[0])
