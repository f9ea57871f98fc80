"""Optical flow between consecutive frames: TV-L1 as D3D's teacher was trained on, Farneback for speed.

Parameters not in FlowSpec stay at OpenCV's defaults; `flow_settings` reads them back so the manifest
records what was actually used, not what we believe the defaults are.
"""

from __future__ import annotations

import cv2
import numpy as np

from d3d_cluster.spec import FlowSpec

FARNEBACK = {"pyr_scale": 0.5, "levels": 3, "winsize": 9, "iterations": 3, "poly_n": 5, "poly_sigma": 1.1}


def _tvl1(spec: FlowSpec):
    tvl1 = cv2.optflow.DualTVL1OpticalFlow_create()
    tvl1.setScalesNumber(spec.scales)
    tvl1.setWarpingsNumber(spec.warps)
    return tvl1


def compute_flow(frames: np.ndarray, spec: FlowSpec) -> np.ndarray:
    """(F, H, W, 3) RGB uint8 -> (F-1, H, W, 2) float32 pixels (x, y) from frame i to frame i+1."""
    if len(frames) < 2:
        raise ValueError(f"flow needs at least 2 frames, got {len(frames)}")
    gray = [cv2.cvtColor(np.ascontiguousarray(frame), cv2.COLOR_RGB2GRAY) for frame in frames]
    pairs = zip(gray[:-1], gray[1:])
    if spec.algorithm == "tvl1":
        tvl1 = _tvl1(spec)
        flows = [tvl1.calc(prev, nxt, None) for prev, nxt in pairs]
    else:
        flows = [cv2.calcOpticalFlowFarneback(prev, nxt, None, flags=0, **FARNEBACK) for prev, nxt in pairs]
    return np.stack(flows).astype(np.float32)


def flow_settings(spec: FlowSpec) -> dict:
    """What the manifest records: algorithm, bound and every parameter as the algorithm ran with it."""
    if spec.algorithm == "farneback":
        return {"algorithm": "farneback", "bound": spec.bound, **FARNEBACK}
    tvl1 = _tvl1(spec)
    return {
        "algorithm": "tvl1",
        "bound": spec.bound,
        "scales": tvl1.getScalesNumber(),
        "warps": tvl1.getWarpingsNumber(),
        "tau": tvl1.getTau(),
        "lambda": tvl1.getLambda(),
        "theta": tvl1.getTheta(),
        "gamma": tvl1.getGamma(),
        "epsilon": tvl1.getEpsilon(),
        "inner_iterations": tvl1.getInnerIterations(),
        "outer_iterations": tvl1.getOuterIterations(),
        "scale_step": tvl1.getScaleStep(),
        "median_filtering": tvl1.getMedianFiltering(),
    }
