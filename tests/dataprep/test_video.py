import ctypes
import io
import os
import subprocess
import sys

import av
import cv2
import numpy as np
import pytest

from d3d_cluster.data import schema
from d3d_cluster.spec import FlowSpec
from dataprep.flow import compute_flow
from dataprep.synthetic import CLASSES, render_video
from dataprep.video import (
    VideoError,
    dali_decode,
    dali_decodes,
    encode_vp9,
    fit_frames,
    loop_frames,
    read_video,
    resample_fps,
    resize_and_crop,
    resize_short_side,
    write_h264,
)

M_PERTURB = -6  # glibc's mallopt parameter
HEAP_BYTES = (0x11, 0x5A, 0xEE, 0x80)


def _motion_video(frames=12, size=32):
    return render_video(np.random.default_rng(0), "sideways", frames, size)


def test_vp9_round_trips_through_dali_with_every_frame_and_small_pixel_error():
    colours = cv2.resize(np.random.default_rng(0).uniform(0, 255, (3, 4, 3)), (64, 32), interpolation=cv2.INTER_LINEAR)
    frames = np.stack([colours[:, shift : shift + 48] for shift in range(10)]).astype(np.uint8)  # a smooth pan
    decoded = dali_decode(encode_vp9(frames, 25.0, keyframe_interval=8, crf=10))
    assert decoded.shape == frames.shape and decoded.dtype == np.uint8
    assert np.abs(decoded.astype(int) - frames).mean() < 1.5


def test_every_gray_level_survives_vp9_and_dali_within_one():
    levels = np.kron(np.arange(256, dtype=np.uint8).reshape(16, 16), np.ones((2, 2), np.uint8))
    gray = np.repeat(levels[None, ..., None], 3, axis=3).repeat(4, axis=0)
    decoded = dali_decode(encode_vp9(gray, 25.0, keyframe_interval=8, crf=0))
    assert np.abs(decoded.astype(int) - gray).max() <= 1
    assert np.array_equal(decoded[..., 0], decoded[..., 1]) and np.array_equal(decoded[..., 0], decoded[..., 2])


def test_keyframes_come_at_most_every_keyframe_interval():
    blob = encode_vp9(_motion_video(frames=20), 25.0, keyframe_interval=4, crf=10)
    with av.open(io.BytesIO(blob)) as container:
        keys = [packet.is_keyframe for packet in container.demux(video=0) if packet.size]
    positions = np.flatnonzero(keys)
    assert len(keys) == 20 and positions[0] == 0
    assert np.diff(np.append(positions, len(keys))).max() <= 4


def test_dali_decodes_marks_only_the_bad_blobs():
    frames = _motion_video()
    good = encode_vp9(frames, 25.0, keyframe_interval=4, crf=10)
    counts = dali_decodes([good, b"not a video" * 20, good[: len(good) // 2], b"", good])
    assert counts[0] == counts[4] == 12
    assert counts[1] is None and counts[3] is None
    assert counts[2] != 12  # a truncated stream decodes short or not at all: either way it is caught


def test_resample_fps_picks_the_frames_shown_at_the_new_rate():
    frames = np.arange(30)[:, None, None, None]
    assert resample_fps(frames, 30, 30) is frames
    assert resample_fps(frames, 30, 15).ravel().tolist() == list(range(0, 30, 2))
    assert resample_fps(frames[:4], 10, 25).ravel().tolist() == [0, 0, 0, 1, 1, 2, 2, 2]


def test_resize_short_side_keeps_the_aspect_ratio_with_even_sides():
    landscape = resize_short_side(np.zeros((2, 40, 90, 3), np.uint8), 32)
    portrait = resize_short_side(np.zeros((2, 90, 40, 3), np.uint8), 33)
    assert landscape.shape == (2, 32, 72, 3)
    assert portrait.shape[1] % 2 == 0 and portrait.shape[2] % 2 == 0 and portrait.shape[2] in (32, 34)


def test_resize_and_crop_keeps_the_aspect_ratio_and_cuts_the_centre():
    stripes = np.zeros((1, 40, 120, 3), np.uint8)
    stripes[:, :, 40:80] = 255  # a white middle third
    cropped = resize_and_crop(stripes, (32, 32))
    assert cropped.shape == (1, 32, 32, 3)
    assert cropped[0, :, 4:28].min() == 255  # the centre of a 32x96 frame is inside the white third
    for shape in ((1, 90, 40, 3), (1, 20, 20, 3), (1, 64, 48, 3)):  # portrait, upscaled, exact aspect
        assert resize_and_crop(np.zeros(shape, np.uint8), (32, 48)).shape == (1, 32, 48, 3)


def test_fit_frames_uses_the_frame_size_when_given_else_the_short_side():
    frames = np.zeros((2, 40, 90, 3), np.uint8)
    assert fit_frames(frames, 32, None).shape == (2, 32, 72, 3)
    assert fit_frames(frames, 32, (24, 24)).shape == (2, 24, 24, 3)


def test_loop_frames_repeats_the_video_from_its_start():
    frames = np.arange(3)[:, None, None, None]
    assert loop_frames(frames, 7).ravel().tolist() == [0, 1, 2, 0, 1, 2, 0]
    assert len(loop_frames(frames, 2)) == 3  # never shortens


@pytest.mark.parametrize(
    "content, reason, message",
    [(None, "missing", "no such file"), (b"", "empty", "zero bytes"), (b"not a video\n", "unreadable", "unreadable video")],
)
def test_read_video_names_the_file_and_the_reason_it_cannot_be_read(tmp_path, content, reason, message):
    path = tmp_path / "clip.mp4"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(VideoError, match=f"clip.mp4: {message}") as error:
        read_video(path)
    assert error.value.reason == reason


@pytest.fixture
def busy_machine():
    """A CPU-bound process per core beside the test, so an encoder whose bytes follow load or thread timing shows it."""
    loops = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in os.sched_getaffinity(0)]
    try:
        yield
    finally:
        for loop in loops:
            loop.kill()
            loop.wait()


def _quickstart_videos(count=12):
    """`sideways` videos drawn as make_motion_dataset draws them: most of the H.264 files that differed between two
    quickstart runs were of this class."""
    return [render_video(np.random.default_rng([0, CLASSES.index("sideways"), number]), "sideways", 20, 64)
            for number in range(count)]


def _encodings_per_video(encode, videos) -> list[int]:
    """How many different results each video's encodings gave, one encoding per heap byte: glibc fills memory it
    hands out with that byte (M_PERTURB), so an encoder that reads uninitialised memory gives itself away."""
    libc = ctypes.CDLL(None)
    seen = [set() for _ in videos]
    try:
        for byte in HEAP_BYTES:
            libc.mallopt(M_PERTURB, byte)
            for encodings, frames in zip(seen, videos):
                encodings.add(encode(frames))
    finally:
        libc.mallopt(M_PERTURB, 0)
    return [len(encodings) for encodings in seen]


def test_h264_writes_the_same_bytes_whatever_the_heap_held_on_a_busy_machine(tmp_path, busy_machine):
    path = tmp_path / "video.mp4"

    def encode(frames):
        write_h264(path, frames, 25.0)
        return path.read_bytes()

    videos = _quickstart_videos()
    assert _encodings_per_video(encode, videos) == [1] * len(videos)


@pytest.mark.parametrize("content", ["rgb", "flow"])
def test_vp9_encodes_the_same_bytes_whatever_the_heap_held_on_a_busy_machine(busy_machine, content):
    videos = _quickstart_videos()
    if content == "flow":  # as a shard stores it: quantized, x and y side by side in gray
        flows = [schema.quantize_flow(compute_flow(frames, FlowSpec(algorithm="farneback")), 20.0) for frames in videos]
        videos = [np.stack([schema.flow_to_frame(pair) for pair in flow]) for flow in flows]
    assert _encodings_per_video(lambda frames: encode_vp9(frames, 25.0, 8, 10), videos) == [1] * len(videos)
