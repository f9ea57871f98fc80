import io

import av
import numpy as np
import pytest

from d3d_cluster.data.webm import CLUSTER, clip_stream
from dataprep.video import encode_vp9, write_h264

FRAMES, KEYFRAME_INTERVAL = 40, 8


def _sliding(size: int) -> np.ndarray:
    """A textured frame sliding 2 pixels a frame: every frame differs, and inter frames depend on earlier ones."""
    texture = np.random.default_rng(size).integers(0, 256, (size // 4, size // 2, 3), dtype=np.uint8)
    texture = np.kron(texture, np.ones((4, 4, 1), np.uint8))
    return np.stack([np.roll(texture, 2 * t, axis=1)[:, :size] for t in range(FRAMES)])


@pytest.fixture(scope="module", params=[32, 128], ids=["clusters-of-several-keyframes", "a-cluster-a-keyframe"])
def stream(request) -> bytes:
    """Small frames give clusters spanning several keyframe intervals (the muxer opens a new cluster at a keyframe
    only after 4 KiB), larger ones a cluster from each keyframe: the cut is made inside a cluster, or between two."""
    blob = encode_vp9(_sliding(request.param), 25.0, KEYFRAME_INTERVAL, crf=20)
    clusters = blob.count(CLUSTER.to_bytes(4, "big"))
    assert (clusters < FRAMES // KEYFRAME_INTERVAL) if request.param == 32 else clusters == FRAMES // KEYFRAME_INTERVAL
    return blob


def _dali(streams: list[tuple[bytes, int]], stride: int, frames: int) -> list[np.ndarray]:
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def(batch_size=len(streams), num_threads=1, device_id=None, prefetch_queue_depth=1, exec_dynamic=True)
    def decode():
        blob = fn.external_source(name="blob", dtype=types.UINT8, ndim=1)
        start = fn.external_source(name="start", dtype=types.INT32, ndim=0)
        return fn.decoders.video(blob, device="cpu", start_frame=start, stride=stride, sequence_length=frames)

    pipe = decode()
    pipe.build()
    pipe.feed_input("blob", [np.frombuffer(blob, np.uint8) for blob, _ in streams])
    pipe.feed_input("start", [np.array(start, np.int32) for _, start in streams])
    (decoded,) = pipe.run()
    return [np.array(decoded[i]) for i in range(len(streams))]


def _packets(blob) -> list[bool]:
    """Whether each frame of a stream is a keyframe, as FFmpeg reads it."""
    with av.open(io.BytesIO(bytes(blob))) as container:
        return [packet.is_keyframe for packet in container.demux(video=0) if packet.size]


@pytest.mark.parametrize("stride, frames", [(1, 8), (2, 6)])
def test_a_stream_cut_to_a_clip_decodes_to_the_frames_the_whole_stream_gives(stream, stride, frames):
    span = (frames - 1) * stride
    starts = [0, 3, 8, 13, 21, 24, FRAMES - 1 - span]
    cuts = [clip_stream(np.frombuffer(stream, np.uint8), start, start + span) for start in starts]
    assert all(cut is not None for cut in cuts)
    whole = _dali([(stream, start) for start in starts], stride, frames)
    from_cuts = _dali([(cut.tobytes(), start) for cut, start in cuts], stride, frames)
    for start, expected, decoded in zip(starts, whole, from_cuts):
        assert decoded.shape == expected.shape == (frames, *expected.shape[1:])
        assert np.array_equal(decoded, expected), start


def test_a_cut_stream_holds_the_frames_from_the_keyframe_before_the_start_through_the_last(stream):
    assert np.flatnonzero(_packets(stream)).tolist() == list(range(0, FRAMES, KEYFRAME_INTERVAL))
    for start, last in [(0, 7), (5, 20), (8, 8), (29, 39), (39, 39)]:
        cut, start_in_cut = clip_stream(stream, start, last)
        keyframe = start - start % KEYFRAME_INTERVAL
        keys = _packets(cut)
        assert len(keys) == last + 1 - keyframe and keys[0]
        assert start_in_cut == start - keyframe


def test_a_stream_not_laid_out_as_expected_is_left_whole(stream, tmp_path):
    write_h264(tmp_path / "clip.mp4", _sliding(32)[:12], 25.0)
    assert clip_stream((tmp_path / "clip.mp4").read_bytes(), 2, 9) is None  # not WebM
    assert clip_stream(b"\x00garbage" * 100, 2, 9) is None
    assert clip_stream(stream[: len(stream) // 2], 2, FRAMES - 1) is None  # the clip's end is missing
    assert clip_stream(stream, 2, FRAMES) is None  # a frame past the end
