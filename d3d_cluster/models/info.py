"""Parameters and multiply-adds of an S3D-G for one input clip, layer by layer (`d3dc model-info`).

Multiply-adds are torch's FLOP counter (`torch.utils.flop_counter.FlopCounterMode`) halved: it counts a
multiply-add as 2 FLOPs and counts only convolutions and matrix products (pooling, BatchNorm, ReLU and the
gates' elementwise products are not counted). That is the convention of the S3D-G paper's "FLOPs" and of
torchvision's S3D entry (17.979 G for 16x224x224, which this count reproduces), so the figures compare
directly. The network is built on the meta device: nothing is allocated or computed, so a 64x224x224 clip
is counted in a second.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode

from d3d_cluster.models.s3dg import S3DG


@dataclass(frozen=True)
class LayerCost:
    name: str
    output_shape: tuple[int, ...]  # (C, T, H, W) for one clip, or (classes,) for the head
    parameters: int
    multiply_adds: int  # for one clip


@dataclass(frozen=True)
class ModelInfo:
    input_shape: tuple[int, int, int, int]  # (C, T, H, W)
    layers: tuple[LayerCost, ...]

    @property
    def parameters(self) -> int:
        return sum(layer.parameters for layer in self.layers)

    @property
    def multiply_adds(self) -> int:
        return sum(layer.multiply_adds for layer in self.layers)

    def to_dict(self) -> dict:
        return {"input_shape": list(self.input_shape), "parameters": self.parameters,
                "multiply_adds": self.multiply_adds, "layers": [asdict(layer) for layer in self.layers]}


def _count(run, *args) -> tuple[torch.Tensor, int]:
    counter = FlopCounterMode(display=False)
    with counter:
        out = run(*args)
    return out, counter.get_total_flops() // 2


def _parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def model_info(num_classes: int, in_channels: int, frames: int, size: int, width: float = 1.0,
               gating: bool = True) -> ModelInfo:
    """Cost of one (in_channels, frames, size, size) clip through `S3DG(num_classes, in_channels, width, gating)`."""
    with torch.device("meta"):
        model = S3DG(num_classes, in_channels=in_channels, width=width, gating=gating).eval()
    x = torch.empty(1, in_channels, frames, size, size, device="meta")
    layers = []
    with torch.no_grad():
        for name, layer in model.base.named_children():
            x, multiply_adds = _count(layer, x)
            layers.append(LayerCost(name, tuple(x.shape[1:]), _parameters(layer), multiply_adds))
        logits, multiply_adds = _count(model.head, x)
    head_parameters = _parameters(model) - sum(layer.parameters for layer in layers)
    layers.append(LayerCost("head", tuple(logits.shape[1:]), head_parameters, multiply_adds))
    return ModelInfo((in_channels, frames, size, size), tuple(layers))
