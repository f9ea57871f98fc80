"""The three stages of a D3D run. They share one loop and differ only by input and loss.

- teacher : S3D-G on optical flow, cross-entropy.
- student : S3D-G on RGB, cross-entropy + lambda x squared error to the frozen teacher's logits, the teacher
            seeing the flow of the very same augmented clip.
- baseline: the student with lambda = 0 and no teacher: what RGB alone reaches, for comparison.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from d3d_cluster.data.pipeline import Batch
from d3d_cluster.models import S3DG, d3d_loss
from d3d_cluster.spec import ModelSpec, Spec, StageSpec

STAGES = ("teacher", "student", "baseline")
STAGE_INPUT = {"teacher": "flow", "student": "rgb", "baseline": "rgb"}
INPUT_CHANNELS = {"rgb": 3, "flow": 2}
EXPORT_NAME = "model.pt"


def build_model(model: ModelSpec, modality: str, num_classes: int) -> S3DG:
    return S3DG(num_classes=num_classes, in_channels=INPUT_CHANNELS[modality], width=model.width,
                gating=model.gating, dropout=model.dropout)


@dataclass
class Stage:
    name: str
    modality: str  # what the trained network sees
    settings: StageSpec
    distill_weight: float = 0.0
    teacher: nn.Module | None = None

    @property
    def modalities(self) -> tuple[str, ...]:
        """What the loader must decode: the teacher's flow comes along when there is a teacher."""
        return (self.modality, "flow") if self.teacher is not None else (self.modality,)

    def inputs(self, batch: Batch) -> torch.Tensor:
        return getattr(batch, self.modality)

    def loss(self, logits: torch.Tensor, batch: Batch):
        teacher_logits = None
        if self.teacher is not None:
            with torch.no_grad():
                teacher_logits = self.teacher(batch.flow)
        return d3d_loss(logits, batch.labels.to(logits.device), teacher_logits, self.distill_weight)


def load_frozen_teacher(spec: Spec, teacher_dir: Path, num_classes: int, device: torch.device) -> nn.Module:
    weights = teacher_dir / EXPORT_NAME
    if not weights.is_file():
        raise FileNotFoundError(f"{weights}: no exported teacher; the teacher stage must finish first")
    teacher = build_model(spec.model, "flow", num_classes)
    teacher.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    teacher.to(device).eval()
    teacher.requires_grad_(False)
    return teacher


def build_stage(spec: Spec, name: str, run_dir: Path, num_classes: int, device: torch.device) -> Stage:
    if name == "teacher":
        return Stage(name, STAGE_INPUT[name], spec.teacher)
    if name == "baseline":
        return Stage(name, STAGE_INPUT[name], spec.student)
    if name == "student":
        teacher = load_frozen_teacher(spec, run_dir / "teacher", num_classes, device)
        return Stage(name, STAGE_INPUT[name], spec.student, spec.student.distill.weight, teacher)
    raise ValueError(f"unknown stage {name!r} (expected one of {', '.join(STAGES)})")
