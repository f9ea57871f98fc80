"""`d3dc export`: a trained stage as files that plain PyTorch (or safetensors) and the project's `S3DG` load,
with what is needed to rebuild the network and feed it: the run's spec and a small model.json; and, asked for,
as ONNX, checked by onnxruntime against PyTorch on clips of the run's own validation split before it is kept."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from d3d_cluster.data.pipeline import RGB_MEAN, RGB_STD, ClipLoader
from d3d_cluster.data.schema import Manifest
from d3d_cluster.files import replace_atomically, write_json_atomically, write_text_atomically
from d3d_cluster.rundir import SPEC_NAME, RunDir
from d3d_cluster.models import S3DG
from d3d_cluster.models.weights import load_s3dg
from d3d_cluster.train.stages import EXPORT_NAME, STAGE_INPUT, STAGES, model_arguments

MODEL_INFO_NAME = "model.json"
ONNX_CHECK_CLIPS = 8  # validation clips the ONNX file must reproduce


def export_stage(run: RunDir, stage: str, out: Path, onnx: bool = False) -> dict[str, Path]:
    """Write `<stage>.pt`, `<stage>.safetensors` (the same fp32 state dict), spec.yaml and model.json into `out`;
    with `onnx` also `<stage>.onnx`, which is kept only if onnxruntime reproduces the network's logits."""
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r} (expected one of {', '.join(STAGES)})")
    weights = run.path / stage / EXPORT_NAME
    if not weights.is_file():
        raise FileNotFoundError(f"{weights}: stage {stage} has not finished training, there is nothing to export")
    spec = run.spec()
    manifest = Manifest.load(spec.path(spec.data.shards))
    modality = STAGE_INPUT[stage]
    arguments = model_arguments(spec.model, modality, len(manifest.classes))
    network = S3DG(**arguments)
    load_s3dg(network, weights)  # strict: the file must be this spec's network
    state = {name: tensor.float().contiguous() if tensor.is_floating_point() else tensor.contiguous()
             for name, tensor in network.state_dict().items()}
    description = _input_description(spec, manifest, modality)

    out.mkdir(parents=True, exist_ok=True)
    files = {"torch": out / f"{stage}.pt", "safetensors": out / f"{stage}.safetensors", "spec": out / SPEC_NAME,
             "model": out / MODEL_INFO_NAME}
    onnx_path = out / f"{stage}.onnx"
    if onnx:  # first: a file that fails its check leaves the directory as it was
        onnx_info = _export_onnx(network.eval(), onnx_path, description["shape"], _validation_clips(spec, modality))
        files["onnx"] = onnx_path
    else:
        onnx_path.unlink(missing_ok=True)  # an earlier export's file would not be these weights
    replace_atomically(files["torch"], lambda tmp: torch.save(state, tmp))
    replace_atomically(files["safetensors"], lambda tmp: save_file(state, str(tmp), metadata={"stage": stage}))
    write_text_atomically(files["spec"], (run.path / SPEC_NAME).read_text())
    write_json_atomically(files["model"], {
        "run": run.path.name,
        "stage": stage,
        "input": description,
        "in_channels": arguments["in_channels"],
        "num_classes": arguments["num_classes"],
        "classes": manifest.classes,
        "model": spec.model.model_dump(),
        "s3dg": arguments,
        "weights": {"torch": files["torch"].name, "safetensors": files["safetensors"].name},
        "load": ["import json, torch; from d3d_cluster.models import S3DG",
                 f"model = S3DG(**json.load(open('{MODEL_INFO_NAME}'))['s3dg']).eval()",
                 f"model.load_state_dict(torch.load('{files['torch'].name}', weights_only=True))"],
        **({"onnx": onnx_info} if onnx else {}),
    })
    return files


def _validation_clips(spec, modality: str) -> torch.Tensor:
    """The first `ONNX_CHECK_CLIPS` evaluation clips of the run's validation split, as the loader makes them."""
    loader = ClipLoader(spec.path(spec.data.shards), "val", spec.data, modalities=(modality,), rank=0, world=1,
                        seed=spec.seed, train=False)
    clips: list[torch.Tensor] = []
    try:
        for batch in loader.epoch(loader.first_epoch):
            clips.append(getattr(batch, modality))
            if sum(map(len, clips)) >= ONNX_CHECK_CLIPS:
                break
    finally:
        loader.close()
    return torch.cat(clips)[:ONNX_CHECK_CLIPS]


def _export_onnx(network: S3DG, path: Path, clip_shape: list[int], clips: torch.Tensor) -> dict:
    """The network written as ONNX to `path` once onnxruntime's logits of `clips` are PyTorch's (else BadOnnx, and
    no file); what model.json says of it."""
    from d3d_cluster.train.onnx_export import ONNX_INPUT, ONNX_OUTPUT, check_onnx, onnx_opset, write_onnx

    tmp = path.with_name(path.name + ".tmp")
    try:
        write_onnx(network, tmp, clip_shape)
        check = check_onnx(tmp, network, clips)
        opset = onnx_opset(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return {"file": path.name, "opset": opset, "input": ONNX_INPUT, "output": ONNX_OUTPUT,
            "shape": ["batch", *clip_shape], "check": {"split": "val", **check},
            "load": ["import onnxruntime",
                     f"session = onnxruntime.InferenceSession('{path.name}')",
                     f"logits = session.run(None, {{'{ONNX_INPUT}': clips}})[0]  # clips: float32, as input says"]}


def _input_description(spec, manifest: Manifest, modality: str) -> dict:
    """What the network was trained on, so that a user can feed it the same: shape and normalisation."""
    shape = [3 if modality == "rgb" else 2, spec.data.clip_frames, spec.data.crop_size, spec.data.crop_size]
    if modality == "rgb":
        scale = {"normalization": "(pixel - mean) / std per channel, RGB order, pixels on the 0-255 scale",
                 "mean": list(RGB_MEAN), "std": list(RGB_STD)}
    else:
        scale = {"normalization": "optical flow (x, y) in pixels of the stored frames, clipped to +-flow_bound, "
                                  "divided by flow_bound", "flow": manifest.flow}
    return {"modality": modality, "shape": shape, "layout": "N, C, T, H, W", "frame_stride": spec.data.frame_stride,
            "stored_video": {"min_frames": manifest.min_frames, "height": manifest.height, "width": manifest.width}, **scale}
