"""D3D objective (Stroud et al., WACV 2020, "D3D: Distilled 3D Networks").

The RGB student is trained on

    L = CE(s, y) + lambda * D(s', t')

where s are the student's logits and (s', t') what is matched of student and frozen flow teacher:

- target ``logits`` (the paper's default): s' = s, t' = the teacher's logits;
- target a layer (``mixed_5c``, ``conv_2c``, ...): s' = a trained 1x1x1 projection of the student's map at that
  layer, t' = the teacher's map there (`FeatureDistillation` holds the projection next to the student). A low
  layer hands the student the teacher's local motion, position by position (the teacher's conv_2c decodes flow
  best, see `d3dc probe`), where the logits give it one vector a clip.

and D is

- ``mse``: the squared error averaged over all elements (``mse_loss``), so lambda does not scale with batch
  size, class count or feature-map size;
- ``kl`` (logits only): Hinton et al.'s KL(softmax(t'/T) || softmax(s'/T)) x T^2, averaged over clips; the
  T^2 keeps its gradients on the scale of the cross-entropy's as T changes.
"""
from __future__ import annotations

import math
from typing import Literal, NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import nn

from d3d_cluster.models.s3dg import S3DG


class D3DLoss(NamedTuple):
    total: torch.Tensor
    cross_entropy: torch.Tensor
    distillation: torch.Tensor


def distillation_term(student: torch.Tensor, teacher: torch.Tensor, kind: Literal["mse", "kl"] = "mse",
                      temperature: float = 1.0) -> torch.Tensor:
    """D(student, teacher); the teacher side is detached, so no gradient can ever reach the teacher."""
    if teacher.shape != student.shape:
        raise ValueError(f"teacher output {tuple(teacher.shape)} does not match student output {tuple(student.shape)}")
    teacher = teacher.detach().to(student.dtype)
    if kind == "mse":
        return F.mse_loss(student, teacher)
    if kind == "kl":
        if not (math.isfinite(temperature) and temperature > 0):
            raise ValueError(f"temperature must be a finite number > 0, got {temperature}")
        log_p_student = F.log_softmax(student / temperature, dim=1)
        log_p_teacher = F.log_softmax(teacher / temperature, dim=1)
        kl = F.kl_div(log_p_student, log_p_teacher, log_target=True, reduction="batchmean")
        return kl * temperature**2
    raise ValueError(f"unknown distillation loss {kind!r} (expected mse or kl)")


def d3d_loss(
    student_logits: torch.Tensor,
    labels: torch.Tensor,
    teacher_output: Optional[torch.Tensor] = None,
    weight: float = 0.0,
    *,
    student_output: Optional[torch.Tensor] = None,
    kind: Literal["mse", "kl"] = "mse",
    temperature: float = 1.0,
) -> D3DLoss:
    """CE plus ``weight`` x D(student_output, teacher_output); ``student_output`` defaults to the logits.

    With ``weight == 0`` or no teacher the distillation term is exactly 0 and ``total`` is the CE.
    """
    if not (math.isfinite(weight) and weight >= 0):
        raise ValueError(f"distillation weight must be a finite number >= 0, got {weight}")
    cross_entropy = F.cross_entropy(student_logits, labels)
    if teacher_output is None or weight == 0:
        return D3DLoss(cross_entropy, cross_entropy, cross_entropy.new_zeros(()))
    matched = student_logits if student_output is None else student_output
    distillation = distillation_term(matched, teacher_output, kind, temperature)
    return D3DLoss(cross_entropy + weight * distillation, cross_entropy, distillation)


def teacher_target(teacher: S3DG, flow: torch.Tensor, target: str) -> torch.Tensor:
    """What the student matches of the teacher on these clips: its logits, or its map at the layer `target`."""
    if target == "logits":
        return teacher(flow)
    return teacher.endpoints(flow, (target,))[target]


class FeatureDistillation(nn.Module):
    """The student together with the 1x1x1 projection of its map at `layer` onto the teacher's channels there.

    This is the module the engine trains, so the projection is optimised (and checkpointed) with the student;
    only ``network`` is exported, which keeps ``model.pt`` a plain S3D-G state dict.
    """

    def __init__(self, network: S3DG, teacher_channels: int, layer: str = "mixed_5c"):
        super().__init__()
        self.network, self.layer = network, layer
        self.projection = nn.Conv3d(network.endpoint_channels[layer], teacher_channels, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits, projected map at `layer`), in one pass."""
        last = self.network.endpoint_names[-1]
        maps = self.network.endpoints(x, (self.layer, last))
        return self.network.head(maps[last]), self.projection(maps[self.layer])
