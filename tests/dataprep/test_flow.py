import cv2
import numpy as np
import pytest

from d3d_cluster.data.schema import dequantize_flow, flow_to_frame, frame_to_flow, quantize_flow
from d3d_cluster.spec import FlowSpec
from dataprep.flow import compute_flow, flow_settings


def _texture(size=64):
    noise = np.random.default_rng(0).random((size // 4, size // 4))
    gray = cv2.resize(noise, (size, size), interpolation=cv2.INTER_CUBIC) * 255
    return np.repeat(np.clip(gray, 0, 255).astype(np.uint8)[..., None], 3, axis=2)


@pytest.mark.parametrize(
    "spec", [FlowSpec(algorithm="tvl1", scales=3, warps=3), FlowSpec(algorithm="farneback")], ids=lambda s: s.algorithm
)
def test_flow_of_a_shifted_texture_has_its_sign_and_magnitude(spec):
    texture = _texture()
    frames = np.stack([texture, np.roll(texture, 2, axis=1), np.roll(texture, (-1, 2), axis=(0, 1))])
    flow = compute_flow(frames, spec)
    inner = flow[:, 12:-12, 12:-12]  # away from the wrapped edges
    assert flow.shape == (2, 64, 64, 2) and flow.dtype == np.float32
    assert inner[0, ..., 0].mean() == pytest.approx(2, abs=0.25)
    assert inner[0, ..., 1].mean() == pytest.approx(0, abs=0.25)
    assert inner[1, ..., 1].mean() == pytest.approx(-1, abs=0.25)


def test_flow_settings_record_what_tvl1_ran_with():
    settings = flow_settings(FlowSpec(scales=3, warps=2, bound=15))
    assert settings["algorithm"] == "tvl1" and settings["bound"] == 15
    assert settings["scales"] == 3 and settings["warps"] == 2 and settings["tau"] > 0
    assert flow_settings(FlowSpec(algorithm="farneback"))["algorithm"] == "farneback"


def test_quantized_flow_round_trips_within_half_a_step_and_clips_at_the_bound():
    flow = np.random.default_rng(0).uniform(-25, 25, (4, 8, 8, 2)).astype(np.float32)
    back = dequantize_flow(quantize_flow(flow, 20.0), 20.0)
    inside = np.abs(flow) <= 20
    assert np.abs(back - flow)[inside].max() <= 20.0 / 255 + 1e-5
    assert np.array_equal(back[~inside], np.sign(flow[~inside]) * 20.0)


def test_flow_frame_is_gray_with_x_left_and_y_right_and_round_trips():
    quantized = np.random.default_rng(0).integers(0, 256, (6, 10, 2), dtype=np.uint8)
    frame = flow_to_frame(quantized)
    assert frame.shape == (6, 20, 3)
    assert np.array_equal(frame[..., 0], frame[..., 1]) and np.array_equal(frame[..., 0], frame[..., 2])
    assert np.array_equal(frame[:, :10, 0], quantized[..., 0]) and np.array_equal(frame[:, 10:, 0], quantized[..., 1])
    assert np.array_equal(frame_to_flow(frame), quantized)
