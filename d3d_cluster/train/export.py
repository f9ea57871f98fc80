"""`d3dc export`: a trained stage as files that plain PyTorch (or safetensors) and the project's `S3DG` load,
with what is needed to rebuild the network and feed it: the run's spec and a small model.json."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from d3d_cluster.data.pipeline import RGB_MEAN, RGB_STD
from d3d_cluster.data.schema import Manifest
from d3d_cluster.files import replace_atomically, write_json_atomically, write_text_atomically
from d3d_cluster.rundir import SPEC_NAME, RunDir
from d3d_cluster.models import S3DG
from d3d_cluster.models.weights import load_s3dg
from d3d_cluster.train.stages import EXPORT_NAME, STAGE_INPUT, STAGES, model_arguments

MODEL_INFO_NAME = "model.json"


def export_stage(run: RunDir, stage: str, out: Path) -> dict[str, Path]:
    """Write `<stage>.pt`, `<stage>.safetensors` (the same fp32 state dict), spec.yaml and model.json into `out`."""
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

    out.mkdir(parents=True, exist_ok=True)
    files = {"torch": out / f"{stage}.pt", "safetensors": out / f"{stage}.safetensors", "spec": out / SPEC_NAME,
             "model": out / MODEL_INFO_NAME}
    replace_atomically(files["torch"], lambda tmp: torch.save(state, tmp))
    replace_atomically(files["safetensors"], lambda tmp: save_file(state, str(tmp), metadata={"stage": stage}))
    write_text_atomically(files["spec"], (run.path / SPEC_NAME).read_text())
    write_json_atomically(files["model"], {
        "run": run.path.name,
        "stage": stage,
        "input": _input_description(spec, manifest, modality),
        "in_channels": arguments["in_channels"],
        "num_classes": arguments["num_classes"],
        "classes": manifest.classes,
        "model": spec.model.model_dump(),
        "s3dg": arguments,
        "weights": {"torch": files["torch"].name, "safetensors": files["safetensors"].name},
        "load": ["import json, torch; from d3d_cluster.models import S3DG",
                 f"model = S3DG(**json.load(open('{MODEL_INFO_NAME}'))['s3dg']).eval()",
                 f"model.load_state_dict(torch.load('{files['torch'].name}', weights_only=True))"],
    })
    return files


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
