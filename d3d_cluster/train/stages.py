"""The three stages of a D3D run. They share one loop and differ only by input and loss.

- teacher : S3D-G on optical flow, cross-entropy.
- student : S3D-G on RGB, cross-entropy + lambda x a distillation term to the frozen teacher (its logits, or
            its map at a layer; squared error or KL, see `models.distill`), the teacher
            seeing the flow of the very same augmented clip, in eval mode and without gradients; or, with
            `student.distill.precompute`, its outputs for every clip computed once before training
            (`teacher_outputs`), so that training decodes no flow and runs no teacher.
- baseline: the student with lambda = 0 and no teacher: what RGB alone reaches, for comparison.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from d3d_cluster.data.pipeline import Batch, to_device
from d3d_cluster.models import S3DG, D3DLoss, FeatureDistillation, d3d_loss, teacher_target
from d3d_cluster.models.weights import InitReport, load_s3dg, load_weights
from d3d_cluster.spec import DistillSpec, ModelSpec, Spec, StageSpec
from d3d_cluster.train.teacher_outputs import DIRECTORY_NAME, TeacherOutputs, precompute_teacher_outputs

STAGES = ("teacher", "student", "baseline")
STAGE_INPUT = {"teacher": "flow", "student": "rgb", "baseline": "rgb"}
INPUT_CHANNELS = {"rgb": 3, "flow": 2}
EXPORT_NAME = "model.pt"


def model_arguments(model: ModelSpec, modality: str, num_classes: int) -> dict:
    """`S3DG`'s keyword arguments for a stage's network (also written into exports to rebuild it)."""
    return dict(num_classes=num_classes, in_channels=INPUT_CHANNELS[modality], width=model.width,
                gating=model.gating, dropout=model.dropout)


def build_model(model: ModelSpec, modality: str, num_classes: int) -> S3DG:
    return S3DG(**model_arguments(model, modality, num_classes))


def build_network(spec: Spec, settings: StageSpec, modality: str, num_classes: int,
                  initialised: Callable[[InitReport], None] = lambda report: None) -> S3DG:
    """The network a stage trains, initialised from the stage's `init` file when the spec names one; what that
    loaded and left fresh goes to `initialised`."""
    network = build_model(spec.model, modality, num_classes)
    if settings.init.path:
        initialised(load_weights(network, spec.path(settings.init.path), settings.init.format, settings.init.head))
    return network


@dataclass
class Stage:
    name: str
    modality: str  # what the trained network sees
    settings: StageSpec
    distill: DistillSpec | None = None  # set with a teacher source
    teacher: S3DG | None = None  # the frozen teacher, run on each batch's flow
    precomputed: TeacherOutputs | None = None  # or its outputs, computed before training

    @property
    def distilled(self) -> bool:
        return self.teacher is not None or self.precomputed is not None

    @property
    def modalities(self) -> tuple[str, ...]:
        """What the loader must decode: the teacher's flow comes along when the teacher runs live."""
        return (self.modality, "flow") if self.teacher is not None else (self.modality,)

    @property
    def unusable_samples(self) -> list[int]:
        """Samples the loader must leave out from the start: those whose flow the precompute pass could not decode
        (the live teacher's loader skips them too, as it finds them)."""
        return self.precomputed.unusable if self.precomputed is not None else []

    def inputs(self, batch: Batch) -> torch.Tensor:
        return getattr(batch, self.modality)

    def trainable(self, network: S3DG) -> nn.Module:
        """What the engine trains: the network, with the projection of its map when a layer's features are distilled."""
        if self.distilled and self.distill.target != "logits":
            layer = self.distill.target
            channels = (self.teacher.endpoint_channels[layer] if self.teacher is not None
                        else self.precomputed.channels)
            return FeatureDistillation(network, channels, layer)
        return network

    @staticmethod
    def logits(outputs) -> torch.Tensor:
        """The class scores among the trainable module's `outputs`."""
        return outputs[0] if isinstance(outputs, tuple) else outputs

    def teacher_output(self, batch: Batch, device: torch.device | None = None) -> torch.Tensor:
        """The frozen teacher's logits or map for the batch's clips: stored (read onto `device`, by default left on
        the host), or computed on their flow (on the flow's device)."""
        if self.precomputed is not None:
            return self.precomputed.targets(batch.epochs, batch.samples, device or torch.device("cpu"))
        with torch.no_grad():
            return teacher_target(self.teacher, batch.flow, self.distill.target)

    def loss(self, outputs, batch: Batch) -> D3DLoss:
        """`outputs` of the trainable module: logits, or (logits, projected map)."""
        logits, matched = self.logits(outputs), outputs[1] if isinstance(outputs, tuple) else None
        labels = to_device(batch.labels, logits.device)  # the loop moved them already; a caller may not have
        if not self.distilled:
            return d3d_loss(logits.float(), labels)
        teacher_output = to_device(self.teacher_output(batch, logits.device), logits.device)
        return d3d_loss(logits.float(), labels, teacher_output.float(), self.distill.weight,
                        student_output=None if matched is None else matched.float(), kind=self.distill.loss,
                        temperature=self.distill.temperature)


def load_frozen_teacher(spec: Spec, teacher_dir: Path, num_classes: int, device: torch.device) -> S3DG:
    weights = teacher_dir / EXPORT_NAME
    if not weights.is_file():
        raise FileNotFoundError(f"{weights}: no exported teacher; the teacher stage must finish first")
    teacher = build_model(spec.model, "flow", num_classes)
    load_s3dg(teacher, weights)
    teacher.to(device).eval()
    teacher.requires_grad_(False)
    return teacher


def stage_settings(spec: Spec, name: str) -> StageSpec:
    """The spec section a stage trains with: the baseline trains as the student does, without its teacher."""
    if name not in STAGES:
        raise ValueError(f"unknown stage {name!r} (expected one of {', '.join(STAGES)})")
    return spec.teacher if name == "teacher" else spec.student


def build_stage(spec: Spec, name: str, run_dir: Path, num_classes: int, device: torch.device) -> Stage:
    settings = stage_settings(spec, name)
    if name == "student":
        teacher = load_frozen_teacher(spec, run_dir / "teacher", num_classes, device)
        return Stage(name, STAGE_INPUT[name], settings, spec.student.distill, teacher)
    return Stage(name, STAGE_INPUT[name], settings)


def with_precomputed_teacher(stage: Stage, spec: Spec, run_dir: Path, rank: int, world: int,
                             device_id: int | None) -> Stage:
    """The student reading its teacher's stored outputs, computed first (by every rank, a share each) where they
    are missing or stale; the teacher network is then let go."""
    outputs = precompute_teacher_outputs(spec, stage.teacher, run_dir / "teacher" / EXPORT_NAME,
                                         run_dir / stage.name / DIRECTORY_NAME, rank, world, device_id)
    return replace(stage, teacher=None, precomputed=outputs)
