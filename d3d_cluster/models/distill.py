"""D3D objective (Stroud et al., WACV 2020, "D3D: Distilled 3D Networks").

The RGB student is trained on

    L = CE(s, y) + lambda * ||s - t||^2

where s and t are the student's and the frozen flow teacher's logits: the
squared error on logits transfers the teacher's motion features without
running flow at test time. The squared error is averaged over all elements
(``mse_loss``), so lambda does not scale with batch size or class count.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F


class D3DLoss(NamedTuple):
    total: torch.Tensor
    cross_entropy: torch.Tensor
    distillation: torch.Tensor


def d3d_loss(
    student_logits: torch.Tensor,
    labels: torch.Tensor,
    teacher_logits: Optional[torch.Tensor] = None,
    weight: float = 0.0,
) -> D3DLoss:
    """CE plus ``weight`` x MSE to the teacher's logits.

    The teacher's logits are detached here, so a caller that forgets
    ``torch.no_grad`` still cannot update the teacher. With ``weight == 0`` or
    no teacher the distillation term is exactly 0 and ``total`` is the CE.
    """
    if not (math.isfinite(weight) and weight >= 0):
        raise ValueError(f"distillation weight must be a finite number >= 0, got {weight}")
    cross_entropy = F.cross_entropy(student_logits, labels)
    if teacher_logits is None or weight == 0:
        return D3DLoss(cross_entropy, cross_entropy, cross_entropy.new_zeros(()))
    if teacher_logits.shape != student_logits.shape:
        raise ValueError(
            f"teacher logits {tuple(teacher_logits.shape)} do not match "
            f"student logits {tuple(student_logits.shape)}"
        )
    distillation = F.mse_loss(student_logits, teacher_logits.detach().to(student_logits.dtype))
    return D3DLoss(cross_entropy + weight * distillation, cross_entropy, distillation)
