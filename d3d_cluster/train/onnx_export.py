"""An exported network as ONNX, for serving stacks that run ONNX rather than PyTorch, and the check that it computes
what PyTorch computes.

torch.onnx's dynamo exporter writes the file (torch 2.13's TorchScript exporter fails to trace S3D-G), with the
batch axis dynamic: a serving stack batches clips of several videos.
onnx, onnxscript and onnxruntime are imported here only, where a user asks for ONNX: a training node never needs them.
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

import numpy as np
import torch

ONNX_INPUT, ONNX_OUTPUT = "clips", "logits"
STACK_TRACE = "pkg.torch.onnx.stack_trace"  # each node's Python stack at export: the exporting machine's paths
TOLERANCE = 1e-4  # largest absolute difference of a logit, onnxruntime against PyTorch, that an export accepts


class BadOnnx(ValueError):
    """An ONNX file that onnxruntime cannot load, or whose logits are not the network's."""


def write_onnx(network: torch.nn.Module, path: Path, clip_shape: list[int]) -> None:
    """`network` (in eval mode, fp32, on the CPU) as one self-contained ONNX file of (any, *clip_shape) clips."""
    example = torch.zeros(2, *clip_shape)  # not 1: the exporter would take a batch of 1 for a constant
    batch = torch.export.Dim("batch")
    # The exporter's notices about torch's own internals (torchvision absent, deprecated pytree types) say nothing
    # about this network.
    registration = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registration.level
    registration.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            torch.onnx.export(network, (example,), str(path), dynamo=True, input_names=[ONNX_INPUT],
                              output_names=[ONNX_OUTPUT], dynamic_shapes={"x": {0: batch}}, external_data=False,
                              verbose=False)
    finally:
        registration.setLevel(level)
    _drop_stack_traces(path)


def _drop_stack_traces(path: Path) -> None:
    """A deployed file should not carry the file names of the machine that exported it; the nodes keep their module
    names and hierarchy, which is what debugging a graph needs."""
    import onnx

    model = onnx.load(str(path))
    for node in [*model.graph.node, *(node for function in model.functions for node in function.node)]:
        kept = [entry for entry in node.metadata_props if entry.key != STACK_TRACE]
        del node.metadata_props[:]
        node.metadata_props.extend(kept)
    onnx.save(model, str(path))


def onnx_session(path: Path, threads: int | None = None):
    """An onnxruntime session of the file on the CPU, with `threads` threads (default: the cores this process may
    use)."""
    import onnxruntime
    from onnxruntime.capi import onnxruntime_pybind11_state as state

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads or len(os.sched_getaffinity(0))
    try:
        return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except (state.Fail, state.InvalidArgument, state.InvalidGraph, state.InvalidProtobuf, state.NoSuchFile,
            state.RuntimeException) as error:  # plain Exceptions, no common base
        raise BadOnnx(f"{path}: onnxruntime cannot load it: {error}") from None


def onnx_logits(session, clips: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(session.run([ONNX_OUTPUT], {ONNX_INPUT: clips.float().cpu().numpy()})[0])


@torch.no_grad()
def check_onnx(path: Path, network: torch.nn.Module, clips: torch.Tensor, tolerance: float = TOLERANCE) -> dict:
    """onnxruntime's logits of `clips` against those of `network` (eval mode, fp32, CPU) in PyTorch; raises
    `BadOnnx` past `tolerance`. The clips run as one batch and the first alone: the batch axis must be free."""
    session = onnx_session(path)
    expected = network(clips).numpy()
    difference = float(max(np.abs(onnx_logits(session, clips).numpy() - expected).max(),
                           np.abs(onnx_logits(session, clips[:1]).numpy() - expected[:1]).max()))
    if not difference <= tolerance:  # NaN fails too
        raise BadOnnx(f"{path}: onnxruntime's logits differ from PyTorch's by up to {difference:.3g} on "
                           f"{len(clips)} clips (tolerance {tolerance:g}): the file does not compute this network")
    return {"clips": len(clips), "max_abs_logit_difference": difference, "tolerance": tolerance}


def onnx_opset(path: Path) -> int:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return next(entry.version for entry in model.opset_import if entry.domain in ("", "ai.onnx"))
